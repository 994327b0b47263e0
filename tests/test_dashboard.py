"""The operator's and participant's view of a swarm: dashboard, ``/api/swarm``, ``/metrics``, progress bar.

A real ``zen-bootstrap`` process watches RUN_ID; real DHT peers on 127.0.0.1 join through it and publish
signed records (rounds 1 and 2, with held-out loss and bytes), and a plain hivemind peer (no validator)
stores a forged record for a PeerID that never published. The tests read what the bootstrap serves over
HTTP, load the page in headless Chromium where it is installed, and run the node's metrics endpoint and
progress bar (the latter under a pseudo-terminal). No network call is mocked.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import pty
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import hivemind
import msgpack
import psutil
import pytest
from helpers import LOCALHOST_MADDR, REPO_ROOT, NodeProcess, wait_until, write_run_config
from hivemind.utils import get_dht_time
from prometheus_client.parser import text_string_to_metric_families

from bootstrap.swarm_api import SwarmBoard
from dht import SKETCH_DIM, Capacity, NodeIdentity, PeerRecord, SwarmConfig, encode_sketch, publish_record, start_dht
from dht.ledger import LedgerSummary, ledger_key, publish_summary
from dht.records import RECORD_TAG
from dht.validator import peers_key
from node.data import generate_corpus
from node.metrics import NodeMetrics
from node.progress import RoundProgress
from node.training.report import RoundOutcome, RoundReport

RUN_ID = "dash-run"
REAL_RUN = "dash-real"  # a second run the bootstrap watches, for a real trainer (its own config)
STAGES_RUN = "dash-stages"  # a sharded run the bootstrap watches: stage servers' records
START_TIMEOUT = 60.0  # seconds zen-bootstrap may take to print its ready block
EVENT_TIMEOUT = 30.0  # seconds for a published record to show up on the dashboard
LOSSES = {1: 3.25, 2: 2.5}  # the held-out loss each trainer reports after rounds 1 and 2
ROUND_BYTES = {1: 1000, 2: 2000}


@dataclass
class Swarm:
    """A bootstrap peer, three signed trainers at round 2, and a forger that stored a bad record."""

    url: str  # the dashboard, http://127.0.0.1:PORT/
    trainers: list[NodeIdentity]
    victim: NodeIdentity  # named by the forged record, never published
    dhts: list[hivemind.DHT]  # the trainers' DHT peers
    plain: hivemind.DHT  # a peer with no validator: it stores what a forger hands it


def _record(identity: NodeIdentity, round_no: int, **fields: object) -> PeerRecord:
    values: dict[str, object] = dict(
        peer_id=identity.peer_id,
        signing_key=identity.signing_public_key,
        binding=identity.binding,
        x25519_key=identity.x25519_public_key,
        version="0.1.0",
        run_hash="ab" * 16,
        capacity=Capacity(device_kind="cpu", device_name="<b>test</b> cpu", memory_bytes=2**34),
        sketch=encode_sketch([(i % 7 + 1) / SKETCH_DIM for i in range(SKETCH_DIM)]),
        roles=("trainer",),
        round=round_no,
        state_digest=b"",
        timestamp=get_dht_time(),
        run_config=msgpack.packb({"run_id": RUN_ID, "aggregation": {"min_group_size": 3}}),
        ttl=60.0,
        eval_loss=LOSSES.get(round_no, -1.0),
        round_bytes=ROUND_BYTES.get(round_no, 0),
    )
    values.update(fields)
    return PeerRecord(**values)


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _swarm_json(url: str, query: str = "") -> dict:
    status, body = _get(url + "api/swarm" + query)
    assert status == 200, body
    return json.loads(body)


def _at_round(url: str, peers: list[NodeIdentity], round_no: int) -> bool:
    rounds = {p["peer_id"]: p["round"] for p in _swarm_json(url)["peers"]}
    return all(rounds.get(peer.peer_id) == round_no for peer in peers)


def _start_bootstrap(folder: Path, *run_ids: str) -> tuple[subprocess.Popen[str], str, str]:
    """``zen-bootstrap`` watching ``run_ids`` (none: all it stores); returns it, its multiaddr, the dashboard URL."""
    command = [sys.executable, "-m", "bootstrap.cli", "--host-maddrs", LOCALHOST_MADDR, "--http-port", "0"]
    command += ["--identity", str(folder / "bootstrap.id"), "--poll-period", "0.3"]
    command += ["--run-id", *run_ids] if run_ids else []
    with open(folder / "bootstrap.log", "w") as log:  # the child keeps its own descriptor
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
    assert process.stdout is not None
    lines: list[str] = []
    for line in process.stdout:  # the ready block comes within START_TIMEOUT (p2pd's own startup bound)
        lines.append(line.strip())
        if line.strip() == "ready":
            break
    fields = dict(line.split(": ", 1) for line in lines if ": " in line)
    maddr = next((line for line in lines if line.startswith("/ip4/127.0.0.1/")), "")
    if "dashboard" not in fields or not maddr:
        _kill_tree(process)
        pytest.fail(f"zen-bootstrap printed no ready block: {lines}; see {folder / 'bootstrap.log'}")
    return process, maddr, fields["dashboard"]


def _kill_tree(process: subprocess.Popen) -> None:
    family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    for member in family:
        member.terminate()
    _, alive = psutil.wait_procs(family, timeout=20)
    for member in alive:
        member.kill()
    process.wait(timeout=10)
    if process.stdout is not None:
        process.stdout.close()


def _stored(store: Callable[[], bool], what: str) -> None:
    """Store until a replica accepts it, as a node's heartbeat does: on a loaded machine one store's RPCs
    to its nearest peers may all time out (hivemind's 3-s wait), and the store returns False."""
    wait_until(store, EVENT_TIMEOUT, f"{what} stored", interval=0.5)


def _forge(plain: hivemind.DHT, victim: NodeIdentity, signer: NodeIdentity, run_id: str = RUN_ID) -> None:
    """Store, from a peer with no validator, a record naming ``victim`` whose body ``signer`` signed."""
    record = _record(victim, 7, eval_loss=0.5, run_config=msgpack.packb({"run_id": run_id}))
    body = msgpack.packb(dataclasses.asdict(record), use_bin_type=True)
    envelope = msgpack.packb([RECORD_TAG, body, signer.sign(RECORD_TAG.encode() + body)], use_bin_type=True)
    plain.store(peers_key(run_id), envelope, expiration_time=get_dht_time() + 30, subkey=victim.peer_id)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    """The bootstrap, three trainers that published rounds 1 then 2, and one forged record stored."""
    folder = tmp_path_factory.mktemp("dashboard")
    process, maddr, url = _start_bootstrap(folder, RUN_ID, REAL_RUN, STAGES_RUN)
    started: list[hivemind.DHT] = []
    try:
        trainers = [NodeIdentity.load_or_create(folder / f"trainer{i}") for i in range(3)]
        config = SwarmConfig(host_maddrs=[LOCALHOST_MADDR], initial_peers=[maddr])
        dhts = [start_dht(config, identity, run_ids=[RUN_ID]) for identity in trainers]
        started += dhts
        for round_no in (1, 2):  # the bootstrap must see round 1 before round 2 replaces it
            for dht, identity in zip(dhts, trainers, strict=True):
                envelope = _record(identity, round_no).sign(identity)
                _stored(lambda d=dht, e=envelope: publish_record(d, RUN_ID, e), "a trainer's record")
            wait_until(lambda r=round_no: _at_round(url, trainers, r), EVENT_TIMEOUT, f"round {round_no} listed")
        victim = NodeIdentity.load_or_create(folder / "victim")
        plain = hivemind.DHT(initial_peers=[maddr], host_maddrs=[LOCALHOST_MADDR], start=True)
        started.append(plain)
        _forge(plain, victim, trainers[0])
        yield Swarm(url=url, trainers=trainers, victim=victim, dhts=dhts, plain=plain)
    finally:
        for dht in reversed(started):
            dht.shutdown()
        _kill_tree(process)


def _metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page: (name, sorted labels) -> value, parsed by prometheus_client."""
    status, body = _get(url)
    assert status == 200, body
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def _rejected(url: str, reason: str) -> float:
    return _metrics(url + "metrics").get(("zen_bootstrap_records_rejected_total", (("reason", reason),)), 0.0)


def test_api_swarm_lists_the_signed_peers_their_cohort_and_history(swarm: Swarm) -> None:
    """/api/swarm lists each trainer's verified record, its cohort, and the loss and bytes of rounds 1 and 2."""
    # Execute
    body = _swarm_json(swarm.url)

    # Assert
    assert body["run_id"] == RUN_ID and RUN_ID in body["runs"]
    peers = {p["peer_id"]: p for p in body["peers"]}
    assert set(peers) == {t.peer_id for t in swarm.trainers}
    for peer in peers.values():
        assert peer["roles"] == ["trainer"] and peer["device"] == "cpu" and peer["round"] == 2
        assert peer["eval_loss"] == LOSSES[2] and peer["round_bytes"] == ROUND_BYTES[2] and peer["epsilon"] is None
        assert 0 <= peer["heartbeat_seconds_ago"] < 60
    assert [sorted(c["members"]) for c in body["cohorts"]] == [sorted(peers)]
    for trainer in swarm.trainers:
        rounds = [(h["round"], h["eval_loss"], h["bytes"]) for h in body["history"][trainer.peer_id]]
        assert rounds == [(r, LOSSES[r], ROUND_BYTES[r]) for r in (1, 2)]


def _summary(identity: NodeIdentity, rounds: int, samples: int, run_hash: str = "ab" * 16) -> LedgerSummary:
    return LedgerSummary(
        peer_id=identity.peer_id,
        signing_key=identity.signing_public_key,
        binding=identity.binding,
        run_id=RUN_ID,
        run_hash=run_hash,
        rounds=rounds,
        samples=samples,
        compute_seconds=10.0,
        last_round=rounds,
        receipts_digest=bytes(32),
        timestamp=get_dht_time(),
        ttl=600.0,
        display_name="Ada" if samples == 300 else "",
    )


def test_api_swarm_lists_the_contributors_shares_from_verified_summaries(swarm: Swarm) -> None:
    """Signed ledger summaries give each contributor's shares; another config's summary and one stored
    under a PeerID that did not sign it (by a peer with no validator) are not counted."""
    # Prepare
    first, second, third = swarm.trainers
    envelopes = [
        _summary(first, 2, 300).sign(first),
        _summary(second, 2, 100).sign(second),
        _summary(third, 5, 900, run_hash="cd" * 16).sign(third),  # another run config's claim
    ]
    for dht, envelope in zip(swarm.dhts, envelopes, strict=True):
        _stored(lambda d=dht, e=envelope: publish_summary(d, e), "a ledger summary")
    genuine = _summary(second, 2, 100).sign(second)
    swarm.plain.store(ledger_key(RUN_ID), genuine, get_dht_time() + 300, subkey=swarm.victim.peer_id)

    # Execute
    wait_until(lambda: len(_swarm_json(swarm.url)["contributors"]) >= 2, EVENT_TIMEOUT, "the contributors listed")
    rows = {row["peer_id"]: row for row in _swarm_json(swarm.url)["contributors"]}

    # Assert
    assert set(rows) == {first.peer_id, second.peer_id}
    assert rows[first.peer_id]["share_of_samples"] == pytest.approx(0.75) and rows[first.peer_id]["rounds"] == 2
    assert rows[second.peer_id]["share_of_samples"] == pytest.approx(0.25)
    assert rows[first.peer_id]["share_of_rounds"] == pytest.approx(0.5)
    assert rows[first.peer_id]["display_name"] == "Ada" and rows[second.peer_id]["display_name"] == ""
    assert '<table id="contributors">' in _get(swarm.url)[1].decode()


def test_a_forged_record_is_counted_and_never_served(swarm: Swarm) -> None:
    """A record whose signature does not verify shows up only as a rejection in /metrics, nowhere else."""
    # Execute
    wait_until(lambda: _rejected(swarm.url, "signature") >= 1, EVENT_TIMEOUT, "the forged record to be rejected")
    served = [_get(swarm.url + path)[1].decode() for path in ("api/swarm", "", "healthz")]

    # Assert
    assert all(swarm.victim.peer_id not in text for text in served)
    assert _swarm_json(swarm.url)["peers"] and len(_swarm_json(swarm.url)["peers"]) == 3


def test_metrics_parse_and_their_counters_move(swarm: Swarm) -> None:
    """/metrics parses with prometheus_client, counts the run's trainers, and its poll counter moves."""
    # Execute
    first = _metrics(swarm.url + "metrics")
    polls = first[("zen_bootstrap_polls_total", ())]
    # two polls on: ``first`` may have been read after a poll's last DHT call and before its count (server.py)
    later = wait_until(
        lambda: (m := _metrics(swarm.url + "metrics"))[("zen_bootstrap_polls_total", ())] > polls + 1 and m,
        EVENT_TIMEOUT,
        "two more polls",
    )

    # Assert
    assert first[("zen_bootstrap_run_peers", (("role", "trainer"), ("run", RUN_ID)))] == 3
    assert first[("zen_bootstrap_runs", ())] >= 1
    assert first[("zen_bootstrap_peers_connected", ())] >= 3
    assert later[("zen_bootstrap_dht_requests_total", ())] > first[("zen_bootstrap_dht_requests_total", ())]


def _served(url: str, kind: str) -> float:
    return _metrics(url + "metrics").get(("zen_bootstrap_dht_requests_served_total", (("kind", kind),)), 0.0)


def test_metrics_count_the_dht_requests_the_bootstrap_serves(swarm: Swarm) -> None:
    """The DHT requests other peers make to the bootstrap are counted by kind, and a trainer's store moves them."""
    # Prepare
    trainer, dht = swarm.trainers[0], swarm.dhts[0]
    wait_until(lambda: _served(swarm.url, "store") >= 1, EVENT_TIMEOUT, "the trainers' stores to be counted")
    stores, finds = _served(swarm.url, "store"), _served(swarm.url, "find")

    # Execute
    envelope = _record(trainer, 2).sign(trainer)
    _stored(lambda: publish_record(dht, RUN_ID, envelope), "a trainer's record")
    dht.get(peers_key(RUN_ID), latest=True)  # a lookup: find requests to the peers nearest the key

    # Assert
    wait_until(lambda: _served(swarm.url, "store") > stores, EVENT_TIMEOUT, "another served store")
    wait_until(lambda: _served(swarm.url, "find") > finds, EVENT_TIMEOUT, "another served find")
    sent = _metrics(swarm.url + "metrics")
    assert sent[("zen_bootstrap_dht_requests_sent_total", (("kind", "find"),))] >= 1  # its own polls' lookups
    assert sent[("zen_bootstrap_dht_requests_served_total", (("kind", "other"),))] == 0


@pytest.mark.parametrize(
    ("path", "status"),
    [
        pytest.param("api/swarm?run=no-such-run", 404, id="unknown-run"),
        pytest.param("api/swarm?run=" + "x" * 300, 400, id="long-value"),
        pytest.param("api/swarm?" + "&".join(f"k{i}=v" for i in range(20)), 400, id="many-fields"),
        pytest.param("api/swarm?run=%00%01", 400, id="control-characters"),
        pytest.param("nothing/here", 404, id="unknown-path"),
    ],
)
def test_malformed_requests_get_a_4xx_and_the_peer_keeps_serving(swarm: Swarm, path: str, status: int) -> None:
    """Bad paths and queries are answered 4xx; the bootstrap serves normally afterwards."""
    # Execute
    got, body = _get(swarm.url + path)

    # Assert
    assert got == status and "error" in json.loads(body)
    assert _get(swarm.url + "healthz")[0] == 200


def test_page_is_self_contained_and_writes_record_data_as_text(swarm: Swarm) -> None:
    """GET / is one HTML page with no external asset and no innerHTML; a CSP forbids other origins."""
    # Execute
    with urllib.request.urlopen(swarm.url, timeout=10) as response:
        page, policy = response.read().decode(), response.headers["Content-Security-Policy"]

    # Assert
    assert page.startswith("<!doctype html>") and "api/swarm" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "innerHTML" not in page and "outerHTML" not in page and "insertAdjacentHTML" not in page
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium package is not installed")
def test_headless_chromium_shows_the_trainers_and_their_rounds(swarm: Swarm, tmp_path: Path) -> None:
    """The page, run by headless Chromium, lists the 3 trainers and their round; a screenshot is written."""
    # Prepare
    browser = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
    browser += ["--virtual-time-budget=10000", "--window-size=1280,1000", f"--user-data-dir={tmp_path / 'profile'}"]

    # Execute
    dom = subprocess.run([*browser, "--dump-dom", swarm.url], capture_output=True, text=True, timeout=60).stdout
    shot = tmp_path / "dashboard.png"
    subprocess.run([*browser, f"--screenshot={shot}", swarm.url], capture_output=True, timeout=60)

    # Assert
    assert all(trainer.peer_id in dom for trainer in swarm.trainers), dom[-2000:]
    rows = re.findall(r"<tr><td>(12D3KooW\w+)</td><td>trainer</td><td>([^<]*)</td><td[^>]*>(\d+)</td>", dom)
    assert sorted(row[0] for row in rows) == sorted(t.peer_id for t in swarm.trainers)
    assert {row[2] for row in rows} == {"2"}
    assert all(row[1] == "cpu (&lt;b&gt;test&lt;/b&gt; cpu)" for row in rows)  # record text stays text
    assert swarm.victim.peer_id not in dom
    assert dom.count("<polyline") == 4  # one loss line per trainer, one bytes line
    assert shot.exists() and shot.stat().st_size > 1000


def test_without_run_id_the_runs_it_stores_are_listed(tmp_path: Path) -> None:
    """With no --run-id, a run with a signed record is found and shown; a forged record invents no run."""
    # Prepare
    process, maddr, url = _start_bootstrap(tmp_path)
    started: list[hivemind.DHT] = []
    try:
        trainer = NodeIdentity.load_or_create(tmp_path / "trainer")
        config = SwarmConfig(host_maddrs=[LOCALHOST_MADDR], initial_peers=[maddr])
        started.append(dht := start_dht(config, trainer, run_ids=[RUN_ID]))
        started.append(plain := hivemind.DHT(initial_peers=[maddr], host_maddrs=[LOCALHOST_MADDR], start=True))

        # Execute
        _forge(plain, NodeIdentity.load_or_create(tmp_path / "victim"), trainer, run_id="ghost-run")
        envelope = _record(trainer, 1).sign(trainer)
        _stored(lambda: publish_record(dht, RUN_ID, envelope), "a record")
        rejected = wait_until(lambda: _rejected(url, "signature"), EVENT_TIMEOUT, "the forged record's rejection")
        body = wait_until(lambda: (b := _swarm_json(url))["runs"] and b, EVENT_TIMEOUT, "a run to be listed")
    finally:
        for peer in reversed(started):
            peer.shutdown()
        _kill_tree(process)

    # Assert
    assert body["runs"] == [RUN_ID] and body["run_id"] == RUN_ID  # the only run is shown
    assert [p["peer_id"] for p in body["peers"]] == [trainer.peer_id]
    assert rejected >= 1


STAGES_HASH = "cd" * 16
STAGES_CONFIG = msgpack.packb({"run_id": STAGES_RUN, "sharding": {"stages": 3}})


@dataclass
class StageSwarm:
    """The stages run: three servers of its config (two on stage 0, one on 1, none on 2), an outsider."""

    servers: list[NodeIdentity]  # fast (stage 0), slow (stage 0), lone (stage 1)
    outsider: NodeIdentity  # a server of another config that announces stage 2


def _server_record(identity: NodeIdentity, stages: tuple[int, ...], speed: float, **fields: object) -> PeerRecord:
    values: dict[str, object] = dict(
        roles=("server",), stages=stages, run_hash=STAGES_HASH, run_config=STAGES_CONFIG,
        capacity=Capacity(device_kind="cuda", device_name="gpu", memory_bytes=2**34, samples_per_second=speed),
    )  # fmt: skip
    values.update(fields)
    return _record(identity, 7, **values)


@pytest.fixture(scope="module")
def stage_swarm(swarm: Swarm, tmp_path_factory: pytest.TempPathFactory) -> StageSwarm:
    """Signed records of stage servers (and a trainer) in the stages run, stored until the dashboard lists them."""
    folder = tmp_path_factory.mktemp("stages")
    servers = [NodeIdentity.load_or_create(folder / f"server{i}") for i in range(3)]
    outsider, trainer = (NodeIdentity.load_or_create(folder / name) for name in ("outsider", "trainer"))
    records = [
        _server_record(servers[0], (0,), 100.0, served_per_second=40.0),
        _server_record(servers[1], (0,), 50.0),  # not measured yet: no served_per_second
        _server_record(servers[2], (1,), 30.0, served_per_second=12.0),
        _server_record(outsider, (2,), 500.0, run_hash="ef" * 16),
        _record(trainer, 1, run_hash=STAGES_HASH, run_config=STAGES_CONFIG),
    ]
    for index, record in enumerate(records):
        identity = [*servers, outsider, trainer][index]
        envelope, dht = record.sign(identity), swarm.dhts[index % len(swarm.dhts)]
        _stored(lambda d=dht, e=envelope: publish_record(d, STAGES_RUN, e), "a stage server's record")
    query = f"?run={STAGES_RUN}"
    wait_until(lambda: len(_swarm_json(swarm.url, query)["peers"]) == 5, EVENT_TIMEOUT, "the stages run listed")
    return StageSwarm(servers=servers, outsider=outsider)


def test_api_swarm_lists_the_stages_their_servers_and_throughput(swarm: Swarm, stage_swarm: StageSwarm) -> None:
    """/api/swarm's stages come from the servers' signed records: servers, capacity, served rate, the weakest
    stage; a server of another config counts nowhere, and an unsharded run has no stages."""
    # Execute
    stages = _swarm_json(swarm.url, f"?run={STAGES_RUN}")["stages"]
    unsharded = _swarm_json(swarm.url)["stages"]

    # Assert
    fast, slow, lone = (s.peer_id for s in stage_swarm.servers)
    assert [s["stage"] for s in stages] == [0, 1, 2] and unsharded == []
    assert sorted(v["peer_id"] for v in stages[0]["servers"]) == sorted([fast, slow])
    assert [v["peer_id"] for v in stages[1]["servers"]] == [lone] and stages[2]["servers"] == []
    assert [s["samples_per_second"] for s in stages] == [150.0, 30.0, 0.0]
    assert [s["served_per_second"] for s in stages] == [40.0, 12.0, None]
    assert [s["weakest"] for s in stages] == [False, False, True]
    by_peer = {v["peer_id"]: v for v in stages[0]["servers"]}
    assert by_peer[fast]["served_per_second"] == 40.0 and by_peer[slow]["served_per_second"] is None
    assert by_peer[fast]["version"] == 7 and by_peer[fast]["device"] == "cuda"
    assert stage_swarm.outsider.peer_id not in json.dumps(stages)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium package is not installed")
def test_headless_chromium_shows_the_stages_table(swarm: Swarm, stage_swarm: StageSwarm, tmp_path: Path) -> None:
    """The page of a sharded run shows a row per stage with its servers; the weakest stage is marked."""
    # Prepare
    browser = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
    browser += ["--virtual-time-budget=10000", f"--user-data-dir={tmp_path / 'profile'}"]

    # Execute
    dom = subprocess.run(
        [*browser, "--dump-dom", f"{swarm.url}?run={STAGES_RUN}"], capture_output=True, text=True, timeout=60
    ).stdout

    # Assert
    section = re.search(r'<section id="stages-section">(.*?)</section>', dom, re.S)
    assert section is not None, dom[-2000:]
    rows = re.findall(r'<tr(?: class="weakest")?><td class="num">(\d+)[^<]*</td><td[^>]*>([^<]*)</td>', section[1])
    assert [row[0] for row in rows] == ["0", "1", "2"]
    assert "(v7)" in rows[0][1] and rows[2][1] == "no server"
    assert '<tr class="weakest"><td class="num">2 (weakest)</td>' in section[1]


def test_swarm_board_keeps_the_rounds_a_record_carries(tmp_path: Path) -> None:
    """Rounds that ended between two polls reach the history through the record's recent_rounds."""
    # Prepare
    board = SwarmBoard()
    peer = NodeIdentity.load_or_create(tmp_path / "p")
    recent = tuple((r, 3.0 - 0.1 * r, 100 * r) for r in range(1, 6))

    # Execute: the board's polls saw only round 0 and round 6, which carries rounds 1-5
    board.update("a", [_record(peer, 0, eval_loss=3.0)])
    board.update("a", [_record(peer, 6, eval_loss=2.4, round_bytes=600, recent_rounds=recent)])
    history = board.document("a", get_dht_time())["history"][peer.peer_id]

    # Assert
    assert [(h["round"], h["eval_loss"], h["bytes"]) for h in history] == [(0, 3.0, 0), *recent, (6, 2.4, 600)]


def test_swarm_board_keeps_bounded_history(tmp_path: Path) -> None:
    """The board forgets the oldest rounds, the least recently heard peers and runs past its bounds."""
    # Prepare
    board = SwarmBoard(max_runs=2, max_peers=2, max_rounds=3)
    peers = sorted((NodeIdentity.load_or_create(tmp_path / f"p{i}") for i in range(3)), key=lambda p: p.peer_id)

    # Execute
    for round_no in range(1, 6):
        board.update("a", [_record(peers[2], round_no, eval_loss=float(round_no))])
    rounds = [h["round"] for h in board.document("a", get_dht_time())["history"][peers[2].peer_id]]
    board.update("a", [_record(p, 9, eval_loss=1.0) for p in peers])  # three live peers: two shown
    crowded = board.document("a", get_dht_time())
    board.update("b", [_record(peers[0], 1, eval_loss=1.0)])
    board.update("c", [_record(peers[1], 1, eval_loss=1.0)])  # a third run: "a", the oldest, is forgotten

    # Assert
    assert rounds == [3, 4, 5]
    assert [p["peer_id"] for p in crowded["peers"]] == [peers[0].peer_id, peers[1].peer_id]
    assert sorted(crowded["history"]) == sorted([peers[0].peer_id, peers[1].peer_id])
    assert board.runs() == ["b", "c"] and board.document("a", get_dht_time())["peers"] == []


def _report(round_no: int, mode: RoundOutcome = RoundOutcome.GROUP, **fields: object) -> RoundReport:
    values: dict[str, object] = dict(
        round=round_no, mode=mode, eval_loss=2.0 - 0.1 * round_no, train_loss=2.2, group_size=3, samples=64,
        samples_per_second=128.0, seconds=0.5, state_digest="00" * 16, utilization=0.75,
        bytes_sent=1000 * round_no, inner_steps=8,
    )  # fmt: skip
    values.update(fields)
    return RoundReport(**values)  # type: ignore[arg-type]


def test_node_metrics_endpoint_parses_and_moves_with_the_rounds() -> None:
    """The node's /metrics counts rounds by outcome, samples and bytes, and shows the last round's figures."""
    # Prepare
    metrics = NodeMetrics().serve("127.0.0.1", 0)
    try:
        # Execute
        metrics.observe(_report(1))
        before = _metrics(metrics.url)
        metrics.observe(_report(2, RoundOutcome.SOLO, epsilon=1.5))
        after = _metrics(metrics.url)
    finally:
        metrics.stop()

    # Assert
    assert before[("zen_node_rounds_total", (("outcome", "group"),))] == 1
    assert after[("zen_node_rounds_total", (("outcome", "solo"),))] == 1
    assert (before[("zen_node_samples_total", ())], after[("zen_node_samples_total", ())]) == (64, 128)
    assert (before[("zen_node_bytes_sent_total", ())], after[("zen_node_bytes_sent_total", ())]) == (1000, 2000)
    assert after[("zen_node_round_seconds_count", ())] == 2
    assert after[("zen_node_round", ())] == 2 and after[("zen_node_utilization", ())] == 0.75
    assert (before[("zen_node_epsilon", ())], after[("zen_node_epsilon", ())]) == (-1, 1.5)


def _drain(fd: int, quiet: float = 0.5) -> bytes:
    """Everything readable from ``fd`` until it stays quiet for ``quiet`` s (a pty delivers asynchronously)."""
    chunks = []
    while select.select([fd], [], [], quiet)[0]:
        chunks.append(os.read(fd, 65536))
    return b"".join(chunks)


def test_progress_bar_is_live_on_a_terminal_and_plain_in_a_pipe(tmp_path: Path) -> None:
    """Under a pseudo-terminal the status line is redrawn in place; in a file only the round lines appear."""
    # Prepare
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 200, 0, 0))  # 24 rows, 200 columns
    terminal = os.fdopen(slave, "w")
    piped = open(tmp_path / "out.txt", "w")
    live = RoundProgress(lambda r: print(f"round {r.round}", file=terminal), 10, stream=terminal)
    plain = RoundProgress(lambda r: print(f"round {r.round}", file=piped), 10, stream=piped)

    # Execute
    for progress in (live.start(), plain.start()):
        progress(_report(3))
        progress(_report(4))
        progress.close()
    terminal.flush()
    piped.close()
    shown = _drain(master).decode()
    terminal.close()
    os.close(master)

    # Assert
    assert live.live and not plain.live
    assert (tmp_path / "out.txt").read_text() == "round 3\nround 4\n"
    assert "\r\x1b[2K" in shown and "round 4/10" in shown and "[########............]" in shown
    assert "eval loss 1.6000" in shown and "busy 75%" in shown and "sent 0.00 MB" in shown
    assert shown.endswith("\r\x1b[2K")  # close() erases the bar


def _rounds_total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> float:
    return sum(value for (name, _), value in samples.items() if name == "zen_node_rounds_total")


@pytest.mark.slow
def test_a_real_trainer_feeds_the_dashboard_and_its_own_metrics(swarm: Swarm, tmp_path: Path) -> None:
    """`zen-node join --metrics-port 0`: its rounds reach its /metrics and, signed, the dashboard's history."""
    # Prepare
    config = write_run_config(
        tmp_path / "run.toml", REAL_RUN, train={"inner_steps": 4}, aggregation={"matchmaking_time": 0.5, "timeout": 2.0}
    )
    maddr = json.loads(_get(swarm.url + "healthz")[1])["maddrs"][0]
    node = NodeProcess(tmp_path, "real", config, maddr, generate_corpus(20_000, seed=3), "--metrics-port", "0")
    try:
        # Execute
        url = node.wait_for(re.compile(r"metrics: (http://\S+)"), 120).group(1)
        peer_id = node.wait_for(re.compile(r"as (12D3KooW\w+) at round"), 120).group(1)
        rounds = wait_until(
            lambda: (
                sum(v for (n, _), v in _metrics(url).items() if n == "zen_node_rounds_total") >= 3 and _metrics(url)
            ),
            120,
            "3 rounds in the node's metrics",
            detail=node.tail,
        )
        history = wait_until(
            lambda: _swarm_json(swarm.url, f"?run={REAL_RUN}")["history"].get(peer_id), 60, "the trainer's history"
        )
    finally:
        node.stop()

    # Assert
    assert rounds[("zen_node_samples_total", ())] > 0 and rounds[("zen_node_bytes_sent_total", ())] > 0
    phases = {dict(k)["phase"]: v for (name, k), v in rounds.items() if name == "zen_node_phase_seconds_total"}
    assert all(phases[phase] > 0 for phase in ("inner", "aggregation", "evaluation", "checkpoint")), phases
    assert all(h["eval_loss"] > 0 for h in history) and any(h["bytes"] > 0 for h in history)


@pytest.mark.slow
def test_zen_node_join_draws_its_bar_on_a_terminal(tmp_path: Path) -> None:
    """A lone `zen-node join --rounds 2` whose stdout is a pseudo-terminal prints its round lines and the bar."""
    # Prepare
    fast = {"matchmaking_time": 0.5, "timeout": 2.0}
    config = write_run_config(tmp_path / "run.toml", "bar-run", train={"inner_steps": 4}, aggregation=fast)
    (tmp_path / "data.txt").write_bytes(generate_corpus(20_000, seed=4))
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 200, 0, 0))
    command = [sys.executable, "-m", "node.cli", "join", "--config", str(config), "--rounds", "2"]
    command += ["--host-maddrs", LOCALHOST_MADDR, "--data", str(tmp_path / "data.txt")]
    command += ["--identity", str(tmp_path / "id"), "--workdir", str(tmp_path / "work"), "--log-level", "WARNING"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    chunks: list[bytes] = []
    try:
        # Execute
        while process.poll() is None or select.select([master], [], [], 0.5)[0]:
            if select.select([master], [], [], 0.5)[0]:
                try:
                    chunks.append(os.read(master, 65536))
                except OSError:  # the terminal's last reader left (EIO)
                    break
        code = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            _kill_tree(process)
        os.close(master)
    shown = b"".join(chunks).decode(errors="replace")

    # Assert
    assert code == 0, shown[-3000:]
    assert re.search(r"round\s+2 \| \w+\s*\| eval loss", shown), shown[-3000:]
    assert "[##########..........] round 1/2 | inner step " in shown and "\r\x1b[2K" in shown
    assert re.search(r"round 1/2 \| inner step \d+/4 \| \d+ tokens/s", shown), shown[-3000:]

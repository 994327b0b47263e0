"""The contribution ledger: signed receipts, signed DHT summaries and their validator, ``zen-node ledger``,
and the model card's contributors table from the ledger.

Real keys, real signatures, and real hivemind DHT peers on 127.0.0.1; nothing about the network is mocked.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path

import msgpack
import pytest
import torch
from helpers import NodeProcess, wait_until, write_run_config
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils import MSGPackSerializer, get_dht_time

from dht import NodeIdentity, PeerRecordValidator
from dht.config import SwarmConfig
from dht.ledger import (
    LEDGER_TAG,
    MAX_SUMMARY_BYTES,
    LedgerError,
    LedgerSummary,
    SummaryEntry,
    check_stored_summary,
    ledger_key,
    list_summaries,
    publish_summary,
)
from node.aggregation.base import AggregationResult
from node.cli import main
from node.config import NodeConfig, load_node_config
from node.data import generate_corpus
from node.ledger.contributors import (
    SUMMARIES_FILE,
    claims_from_entries,
    contributor_rows,
    read_summaries_cache,
)
from node.ledger.receipts import (
    RECEIPTS_FILE,
    Receipt,
    ReceiptError,
    append_receipt,
    certificate_verdict,
    contributors_digest,
    read_receipts,
    sign_receipt,
    totals,
    verify_receipt,
)
from node.model import build_model
from node.runtime import NodeRuntime
from node.training.checkpoint import Checkpoint
from node.training.ledger import ContributionLedger
from node.training.outer import InFlight
from node.training.report import RoundOutcome, RoundReport

os.environ["HF_HUB_OFFLINE"] = "1"  # the export test loads nothing from a hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"

RUN = "test-run"
RUN_HASH = "ab" * 16
Identities = Callable[[str | None], NodeIdentity]


def _receipt(identity: NodeIdentity, round_no: int, peers: list[str], samples: int = 64, **over: object) -> Receipt:
    values: dict[str, object] = dict(
        peer_id=identity.peer_id,
        signing_key=identity.signing_public_key,
        binding=identity.binding,
        run_id=RUN,
        run_hash=RUN_HASH,
        round=round_no,
        group_id="00ff",
        contributors=tuple(sorted({identity.peer_id, *peers})),
        contributors_digest=contributors_digest("00ff", round_no, [identity.peer_id, *peers], []),
        samples=samples,
        compute_seconds=1.5,
        outcome="group",
        timestamp=1.0e9,
    )
    values.update(over)
    return Receipt(**values)  # type: ignore[arg-type]


def _summary(identity: NodeIdentity, rounds: int = 3, samples: int = 300, **over: object) -> LedgerSummary:
    values: dict[str, object] = dict(
        peer_id=identity.peer_id,
        signing_key=identity.signing_public_key,
        binding=identity.binding,
        run_id=RUN,
        run_hash=RUN_HASH,
        rounds=rounds,
        samples=samples,
        compute_seconds=12.5,
        last_round=rounds,
        receipts_digest=bytes(32),
        timestamp=get_dht_time(),
        ttl=600.0,
    )
    values.update(over)
    return LedgerSummary(**values)  # type: ignore[arg-type]


def _dht_record(envelope: bytes, subkey: str, expiration: float, run: str = RUN) -> DHTRecord:
    return DHTRecord(
        key=DHTID.generate(source=ledger_key(run)).to_bytes(),
        subkey=MSGPackSerializer.dumps(subkey),
        value=MSGPackSerializer.dumps(envelope),
        expiration_time=expiration,
    )


def _resign_body(envelope: bytes, **changes: object) -> bytes:
    """The envelope with its body's fields changed and the old signature kept (tampered numbers)."""
    _, body, signature = msgpack.unpackb(envelope, raw=False)
    fields = msgpack.unpackb(body, raw=False)
    fields.update(changes)
    return msgpack.packb([LEDGER_TAG, msgpack.packb(fields, use_bin_type=True), signature], use_bin_type=True)


# ---- receipts ---------------------------------------------------------------------------------------------


def test_receipts_are_signed_and_verify(tmp_path: Path, identity_factory: Identities) -> None:
    """A signed receipt line verifies to the same receipt; the running totals count each round once."""
    # Prepare
    me, peer = identity_factory(None), identity_factory(None)
    receipts = [_receipt(me, r, [peer.peer_id], samples=10 * r) for r in (1, 2, 3)]

    # Execute
    for receipt in receipts:
        append_receipt(tmp_path, sign_receipt(me, receipt))
    read, failed = read_receipts(tmp_path)
    total = totals(read)

    # Assert
    assert [s.receipt for s in read] == receipts and failed == 0
    assert (total.rounds, total.samples, total.compute_seconds, total.last_round) == (3, 60, 4.5, 3)
    assert total.receipts_digest != bytes(32)


@pytest.mark.parametrize("part", ["readable", "body", "signature"])
def test_a_tampered_receipt_is_refused_and_not_counted(tmp_path: Path, identity_factory: Identities, part: str) -> None:
    """Raising the samples in the readable copy or the signed body, or swapping the signature, is caught."""
    # Prepare
    me, other = identity_factory(None), identity_factory(None)
    row = json.loads(sign_receipt(me, _receipt(me, 1, [])))
    if part == "readable":
        row["receipt"]["samples"] = 10**6
    elif part == "body":
        body = msgpack.unpackb(base64.b64decode(row["body"]), raw=False)
        body["samples"] = 10**6
        row["body"] = base64.b64encode(msgpack.packb(body, use_bin_type=True)).decode()
    else:
        row["signature"] = other.sign(b"anything").hex()
    (tmp_path / RECEIPTS_FILE).write_text(json.dumps(row) + "\n")

    # Execute
    read, failed = read_receipts(tmp_path)

    # Assert
    assert read == [] and failed == 1
    with pytest.raises(ReceiptError):
        verify_receipt(json.dumps(row))


def test_a_receipt_is_signed_only_by_the_node_it_names(identity_factory: Identities) -> None:
    """Nobody signs a receipt for another node."""
    # Prepare
    me, other = identity_factory(None), identity_factory(None)

    # Execute / Assert
    with pytest.raises(ReceiptError, match="identity it names"):
        sign_receipt(other, _receipt(me, 1, []))


# ---- the DHT summary and its validator --------------------------------------------------------------------


def test_a_valid_summary_passes_the_validator(identity_factory: Identities) -> None:
    """A signed summary under its run's ledger key, subkey = its PeerID, passes; an unknown run's too (by tag)."""
    # Prepare
    me = identity_factory(None)
    summary = _summary(me)
    envelope = summary.sign(me)

    # Execute
    ok = PeerRecordValidator([RUN]).validate(_dht_record(envelope, me.peer_id, summary.expires))
    ok_elsewhere = PeerRecordValidator([]).validate(_dht_record(envelope, me.peer_id, summary.expires))

    # Assert
    assert LedgerSummary.verify(envelope) == summary
    assert ok and ok_elsewhere


def _forged(kind: str, me: NodeIdentity, other: NodeIdentity) -> tuple[bytes, str, float, str]:
    """(envelope, subkey, expiration, run) of a summary that breaks one rule."""
    good = _summary(me)
    envelope = good.sign(me)
    if kind == "wrong-key":  # the other node's key signs a summary naming me
        forged = replace(good, signing_key=other.signing_public_key, binding=other.binding)
        body = msgpack.packb(forged.__dict__, use_bin_type=True)
        envelope = msgpack.packb([LEDGER_TAG, body, other.sign(LEDGER_TAG.encode() + body)], use_bin_type=True)
    elif kind == "altered-numbers":
        envelope = _resign_body(envelope, samples=10**9, rounds=3)
    elif kind == "oversized":
        envelope = _resign_body(envelope, display_name="x" * 60) + b"\x00" * MAX_SUMMARY_BYTES
    elif kind == "subkey-of-another":
        return envelope, other.peer_id, good.expires, RUN
    elif kind == "other-run-key":
        return envelope, me.peer_id, good.expires, "another-run"
    elif kind == "outlives-its-ttl":
        return envelope, me.peer_id, good.expires + 3600, RUN
    elif kind == "unsigned":
        envelope = msgpack.packb([LEDGER_TAG, msgpack.packb(good.__dict__, use_bin_type=True), b""], use_bin_type=True)
    return envelope, me.peer_id, good.expires, RUN


FORGERIES = ["wrong-key", "altered-numbers", "oversized", "subkey-of-another", "other-run-key", "outlives-its-ttl"]


@pytest.mark.parametrize("kind", [*FORGERIES, "unsigned"])
def test_the_validator_rejects_forged_and_tampered_summaries(identity_factory: Identities, kind: str) -> None:
    """Wrong key, altered numbers, oversized, another's subkey or run, an extended life, no signature: refused."""
    # Prepare
    me, other = identity_factory(None), identity_factory(None)
    envelope, subkey, expiration, run = _forged(kind, me, other)
    validator = PeerRecordValidator([RUN])

    # Execute
    ok = validator.validate(_dht_record(envelope, subkey, expiration, run))

    # Assert
    assert not ok
    assert validator.rejected == 1
    with pytest.raises(LedgerError):
        key = DHTID.generate(source=ledger_key(run)).to_bytes()
        check_stored_summary(key, subkey, envelope, expiration)


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"rounds": 5, "last_round": 4}, id="more-rounds-than-last-round"),
        pytest.param({"compute_seconds": float("nan")}, id="nan-seconds"),
        pytest.param({"ttl": 10**6}, id="ttl-too-long"),
        pytest.param({"display_name": "n" * 65}, id="long-name"),
        pytest.param({"samples": -1}, id="negative-samples"),
    ],
)
def test_a_summary_out_of_bounds_cannot_be_signed(identity_factory: Identities, change: dict[str, object]) -> None:
    """The bounds hold when signing too, so an honest node never publishes what validators refuse."""
    # Prepare
    me = identity_factory(None)

    # Execute / Assert
    with pytest.raises(LedgerError):
        _summary(me, **change).sign(me)


def test_a_swarm_stores_only_genuine_summaries(
    swarm_factory: Callable[..., list], identity_factory: Identities
) -> None:
    """Real peers store a node's own summary and refuse forgeries; a reader sees the genuine ones, verified."""
    # Prepare
    peers = swarm_factory(3, run_ids=[RUN])
    alice, bob = peers[0].identity, peers[1].identity
    forged, subkey, expiration, _ = _forged("altered-numbers", alice, bob)

    # Execute
    stored = [
        publish_summary(peers[0].dht, _summary(alice).sign(alice)),
        publish_summary(peers[1].dht, _summary(bob, 1, 50).sign(bob)),
    ]
    forged_stored = peers[2].dht.store(ledger_key(RUN), forged, expiration_time=expiration, subkey=subkey)
    entries = wait_until(lambda: len(found := list_summaries(peers[2].dht, RUN)) == 2 and found, 20, "both summaries")

    # Assert
    assert stored == [True, True] and not forged_stored
    assert {e.subkey for e in entries} == {alice.peer_id, bob.peer_id}
    assert all(e.summary is not None for e in entries)
    assert {e.summary.samples for e in entries if e.summary} == {300, 50}


# ---- contributor rows and `zen-node ledger` ------------------------------------------------------------------


def test_unverified_claims_are_listed_marked_and_get_no_share(identity_factory: Identities) -> None:
    """A claim that fails (a bad signature, another run config) is listed unverified; shares are over the verified."""
    # Prepare
    a, b, c, d = (identity_factory(None) for _ in range(4))
    entries = [
        SummaryEntry(a.peer_id, env := _summary(a, 3, 300).sign(a), LedgerSummary.verify(env)),
        SummaryEntry(b.peer_id, env_b := _summary(b, 1, 100).sign(b), LedgerSummary.verify(env_b)),
        SummaryEntry(c.peer_id, _resign_body(_summary(c).sign(c), samples=999), None, "signature does not verify"),
        SummaryEntry(d.peer_id, env_d := _summary(d, run_hash="cd" * 16).sign(d), LedgerSummary.verify(env_d)),
    ]

    # Execute
    rows = contributor_rows(claims_from_entries(entries, RUN_HASH))

    # Assert
    by_peer = {r.peer_id: r for r in rows}
    assert [r.verified for r in rows] == [True, True, False, False]
    assert by_peer[a.peer_id].share_of_samples == 0.75 and by_peer[a.peer_id].share_of_rounds == 0.75
    assert by_peer[b.peer_id].share_of_samples == 0.25
    forged = by_peer[c.peer_id]
    assert forged.samples == 999 and forged.share_of_samples is None and "signature" in forged.note
    assert not by_peer[d.peer_id].verified and "run hash" in by_peer[d.peer_id].note


def test_zen_node_ledger_lists_contributors_as_json_and_csv(
    swarm_factory: Callable[..., list], identity_factory: Identities, tmp_path: Path, capsys
) -> None:
    """`zen-node ledger --json / --csv` reads the run's summaries, verifies each and prints shares."""
    # Prepare
    config_path = write_run_config(tmp_path / "run.toml", run_id=RUN)
    run_hash = load_node_config(str(config_path)).run.digest()
    peers = swarm_factory(2, run_ids=[RUN])
    alice, bob, carol = peers[0].identity, peers[1].identity, identity_factory(None)
    publish_summary(peers[0].dht, _summary(alice, 3, 300, run_hash=run_hash, display_name="Alice").sign(alice))
    publish_summary(peers[1].dht, _summary(bob, 1, 100, run_hash=run_hash).sign(bob))
    publish_summary(peers[1].dht, _summary(carol, 2, 200).sign(carol))  # signed for another run config
    wait_until(lambda: len(list_summaries(peers[1].dht, RUN)) == 3, 20, "three summaries")
    flags = ["--initial-peers", *peers[0].maddrs, "--config", str(config_path), "--log-level", "WARNING"]

    # Execute
    code_json = main(["ledger", *flags, "--json"])
    as_json = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    code_csv = main(["ledger", *flags, "--csv"])
    as_csv = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))

    # Assert
    assert code_json == 0 and code_csv == 0
    assert [(r["peer_id"], r["verified"]) for r in as_json] == [
        (alice.peer_id, True),
        (bob.peer_id, True),
        (carol.peer_id, False),
    ]
    assert as_json[0]["share_of_samples"] == 0.75 and as_json[0]["display_name"] == "Alice"
    assert as_json[1]["share_of_rounds"] == 0.25 and as_json[1]["samples"] == 100
    assert as_json[2]["share_of_samples"] is None and "run hash" in as_json[2]["note"]
    assert [r["peer_id"] for r in as_csv] == [r["peer_id"] for r in as_json]
    assert as_csv[0]["verified"] == "true" and as_csv[2]["verified"] == "false" and as_csv[2]["share_of_samples"] == ""
    assert as_csv[0]["samples"] == "300" and float(as_csv[0]["compute_seconds"]) == 12.5


def test_zen_node_ledger_with_an_unreachable_swarm_is_a_one_line_error(identity_factory: Identities, capsys) -> None:
    """A bootstrap address where nobody listens: one line on stderr, exit 2."""
    # Prepare
    stranger = identity_factory(None).peer_id

    # Execute
    code = main(["ledger", "--initial-peers", f"/ip4/127.0.0.1/tcp/1/p2p/{stranger}", "--run-id", RUN])

    # Assert
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("zen-node: error: cannot reach any initial peer"), err


def test_zen_node_ledger_refuses_json_with_csv(capsys) -> None:
    """--json and --csv together are a usage error (argparse, exit 2)."""
    # Execute
    with pytest.raises(SystemExit) as exit_info:
        main(["ledger", "--json", "--csv"])

    # Assert
    assert exit_info.value.code == 2
    assert "not allowed with" in capsys.readouterr().err


def test_zen_node_ledger_names_a_missing_receipts_path_in_one_line(tmp_path: Path, capsys) -> None:
    """--receipts with a path that does not exist: one line naming it and what to give, exit 2, no DHT started."""
    missing = tmp_path / "nowhere" / "ledger.jsonl"

    code = main(["ledger", "--run-id", RUN, "--receipts", str(missing)])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and f"--receipts {missing}: no such file or folder" in err[0], err


# ---- the trainer's keeper and the model card -----------------------------------------------------------------


def _landed(round_no: int, peers: tuple[str, ...], samples: int) -> tuple[RoundReport, InFlight]:
    """A round that landed with a group (as TrainingNode._land sees it)."""
    future: Future = Future()
    future.set_result((RoundOutcome.GROUP, AggregationResult(round_no, len(peers), peers, group_id="ab12")))
    flight = InFlight(round_no, [], [], samples, [], future)
    report = RoundReport(round_no, RoundOutcome.GROUP, 2.0, 2.1, len(peers), samples, 10.0, 4.0, "00", utilization=0.5)
    return report, flight


def test_the_model_card_lists_the_contributors_with_the_ledgers_figures(
    swarm_factory: Callable[..., list], identity_factory: Identities, tmp_path: Path, capsys
) -> None:
    """A trainer's receipts and kept summaries become the card's table, with the figures `zen-node ledger` prints."""
    # Prepare: three contributors; this node credits 3 group rounds through its ContributionLedger
    config_path = write_run_config(tmp_path / "run.toml", run_id=RUN)
    peers = swarm_factory(1, run_ids=[RUN])
    run = load_node_config(str(config_path)).run
    workdir, me = tmp_path / "work", identity_factory("me")
    workdir.mkdir()
    bob, carol = identity_factory(None), identity_factory(None)
    swarm = SwarmConfig(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=peers[0].maddrs)
    identity_path = str(tmp_path / "identities" / "me")
    config = NodeConfig(run=run, swarm=swarm, workdir=str(workdir), identity=identity_path, rounds=3)  # 3: the last
    runtime = NodeRuntime(config, me)
    runtime.start()
    ledger = ContributionLedger(config)
    group = (me.peer_id, bob.peer_id, carol.peer_id)
    publish_summary(peers[0].dht, _summary(bob, 3, 180, run_hash=run.digest(), display_name="Bob").sign(bob))
    publish_summary(peers[0].dht, _summary(carol, 2, 64, run_hash=run.digest()).sign(carol))
    try:
        for round_no in (1, 2, 3):
            receipt = ledger.credit(runtime, *_landed(round_no, group, samples=64))
            assert receipt is not None and receipt.receipt.contributors == tuple(sorted(group))
        assert ledger.credit(runtime, *_landed(4, (bob.peer_id, carol.peer_id), samples=64)) is None  # not in U
        wait_until(
            lambda: (
                {(c.peer_id, c.rounds) for c in read_summaries_cache(workdir, run.digest())}
                == {(me.peer_id, 3), (bob.peer_id, 3), (carol.peer_id, 2)}
            ),
            20,
            "the trainer's copy of the three summaries, its own at round 3",
        )
        flags = ["--initial-peers", *peers[0].maddrs, "--config", str(config_path), "--log-level", "WARNING"]
        assert main(["ledger", *flags, "--json"]) == 0
        listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    finally:
        runtime.close()
    model = build_model(run.model, seed=3)
    Checkpoint(
        run_hash=run.digest(),
        round=3,
        global_params=[p.detach().clone() for p in model.parameters()],
        outer_opt=torch.optim.SGD(model.parameters(), lr=0.7).state_dict(),
        inner_opt=torch.optim.AdamW(model.parameters()).state_dict(),
        data_rng=torch.Generator().manual_seed(5).get_state(),
    ).save(workdir, run=run, peer_id=me.peer_id)

    # Execute
    out = tmp_path / "model"
    code = main(["export", "--workdir", str(workdir), "--out", str(out), "--display-name", "Ada"])
    card = (out / "README.md").read_text()

    # Assert: the ledger lists the three, this node with its receipts' figures; the card says the same
    assert code == 0 and (workdir / SUMMARIES_FILE).exists()
    assert [(r["peer_id"], r["rounds"], r["samples"]) for r in listed] == [
        (me.peer_id, 3, 192),
        (bob.peer_id, 3, 180),
        (carol.peer_id, 2, 64),
    ]
    assert all(r["verified"] for r in listed)
    assert "From the signed contribution ledger" in card
    for row, name in zip(listed, ["Ada", "Bob", carol.peer_id], strict=True):
        figures = f"| {row['rounds']} | {row['samples']:,} | {row['compute_seconds']:,.1f} |"
        shares = f"| {100 * row['share_of_samples']:.1f}% | {100 * row['share_of_rounds']:.1f}% | yes |"
        assert f"| {name} | `{row['peer_id']}` {figures} {shares[2:]}" in card, card
    assert len(read_summaries_cache(workdir, run.digest())) == 3


@pytest.mark.slow
def test_a_three_node_swarm_credits_its_contributors(tmp_path: Path, bootstrap_maddr: str, capsys) -> None:
    """3 node processes train 2 group rounds: receipts name the same group, `zen-node ledger` lists the 3 verified,
    and the model card of one of them lists the 3 with the ledger's figures for its own row."""
    # Prepare
    config = write_run_config(tmp_path / "run.toml", run_id=RUN)
    corpus = generate_corpus(3 * 20_000, seed=5)
    nodes = NodeProcess.on_slices(tmp_path, config, bootstrap_maddr, corpus, 3, "--rounds", "2", "--min-peers", "3")
    try:
        # Execute
        codes = [node.wait(300) for node in nodes]
        flags = ["--initial-peers", bootstrap_maddr, "--config", str(config), "--log-level", "WARNING"]
        assert main(["ledger", *flags, "--json"]) == 0
        listed = {row["peer_id"]: row for row in map(json.loads, capsys.readouterr().out.splitlines())}
        workdirs = [str(node.folder / "work") for node in nodes]
        assert main(["ledger", *flags, "--json", "--receipts", *workdirs]) == 0
        audited = {row["peer_id"]: row for row in map(json.loads, capsys.readouterr().out.splitlines())}
        out = tmp_path / "model"
        assert main(["export", "--workdir", str(nodes[0].folder / "work"), "--out", str(out)]) == 0
        card = (out / "README.md").read_text()
    finally:
        for node in nodes:
            node.stop()

    # Assert
    assert codes == [0, 0, 0], [node.tail() for node in nodes]
    receipts = [read_receipts(node.folder / "work")[0] for node in nodes]
    assert [len(r) for r in receipts] == [2, 2, 2]
    groups = {(s.receipt.round, s.receipt.contributors, s.receipt.contributors_digest) for r in receipts for s in r}
    assert len(groups) == 2  # every node signed the same contributor set for each round
    verdicts = [certificate_verdict(s.receipt) for r in receipts for s in r]
    assert all(v.certified is not None for v in verdicts), [v.note for v in verdicts]  # t+ members signed each U
    members = {s.receipt.peer_id for r in receipts for s in r}
    assert set(listed) == members and all(row["verified"] and row["rounds"] == 2 for row in listed.values())
    assert all(row["attested_rounds"] is None for row in listed.values())  # nothing presented, nothing attested
    assert {peer: row["attested_rounds"] for peer, row in audited.items()} == dict.fromkeys(members, 2)
    assert sum(row["share_of_samples"] for row in listed.values()) == pytest.approx(1.0, abs=1e-5)
    own = listed[receipts[0][0].receipt.peer_id]
    assert f"| {own['peer_id']} | `{own['peer_id']}` | 2 | {own['samples']:,} |" in card
    assert all(f"`{peer}`" in card for peer in members)

"""Lineage merges (node/training/lineage.py): members of a group that arrive with different global parameters
leave it with one robust combination of their states, so the run trains one model."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import hivemind
import msgpack
import pytest
import torch
from helpers import LOCALHOST_MADDR, REPO_ROOT, NodeProcess, write_run_config
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2
from safetensors.torch import load_file

from node.aggregation.base import AggregationResult, Lineage
from node.aggregation.hierarchy import partition_parameters
from node.config import ConfigError, ModelConfig, TrainConfig, load_node_config
from node.data import generate_corpus
from node.model import build_model
from node.training.lineage import (
    CHUNK_BYTES,
    DRAIN_SECONDS,
    LineageMerger,
    LineageServer,
    combine,
    decode_state,
    lineage_digest,
)
from node.training.outer import OuterState

FORK_LINEAGE = [sys.executable, str(REPO_ROOT / "tests" / "deviant_node.py"), "fork-lineage"]


def _entries(*values: float) -> list[list[torch.Tensor]]:
    return [[torch.full((3,), v), torch.full((2, 2), -v)] for v in values]


@pytest.mark.parametrize(
    ("values", "rule", "expected"),
    [
        ((1.0, 2.0, 9.0), "median", 2.0),
        ((1.0, 2.0, 3.0, 100.0), "median", 2.5),  # the mean of the two middle values
        ((1.0, 2.0, 3.0, 100.0), "trimmed_mean", 2.5),  # 4 // 4 = 1 dropped at each end
        ((1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 1000.0), "trimmed_mean", 4.5),  # 2 dropped at each end
        ((1.0, 2.0, 9.0), "mean", 4.0),
        ((5.0,), "median", 5.0),
    ],
)
def test_combine_rules(values: tuple[float, ...], rule: str, expected: float) -> None:
    out = combine(_entries(*values), rule)  # type: ignore[arg-type]
    assert torch.allclose(out[0], torch.full((3,), expected))
    assert torch.allclose(out[1], torch.full((2, 2), -expected))


def test_one_liar_cannot_pull_the_median_but_pulls_the_mean() -> None:
    """Breakdown: with 2 honest members of one lineage and 1 liar, the median is the honest state exactly,
    whatever the liar serves; the mean moves by a third of the lie."""
    honest = [torch.randn(50), torch.randn(4, 4)]
    liar = [t + 1e6 for t in honest]
    assert all(torch.equal(a, b) for a, b in zip(combine([honest, liar, honest], "median"), honest, strict=True))
    assert (combine([honest, honest, liar], "mean")[0] - honest[0]).abs().min() > 1e5


def test_decode_state_refuses_a_wrong_size_and_non_finite_values() -> None:
    templates = [torch.zeros(3), torch.zeros(2, dtype=torch.float64)]
    blob = torch.ones(3).numpy().tobytes() + torch.ones(2, dtype=torch.float64).numpy().tobytes()
    assert [t.tolist() for t in decode_state(blob, templates)] == [[1.0, 1.0, 1.0], [1.0, 1.0]]
    with pytest.raises(ValueError, match="a state of 27 bytes, expected 28"):
        decode_state(blob[:-1], templates)
    with pytest.raises(ValueError, match="non-finite"):
        decode_state(torch.tensor([1.0, float("nan"), 1.0]).numpy().tobytes() + blob[12:], templates)


def test_combine_rule_is_checked_in_the_config() -> None:
    with pytest.raises(ConfigError, match=r"aggregation\.combine"):
        load_node_config(None, {"run.aggregation.combine": "max"})
    run = load_node_config(None, {}).run
    assert "combine" not in run.shared_dict()["aggregation"]  # the default keeps runs' hashes


def test_a_state_is_served_in_chunks_over_real_peers_and_checked() -> None:
    """Two real libp2p peers: a state over one chunk arrives whole; a round not kept yet times out with the
    peer named; a malformed request gets a refusal, not a crash."""
    first = hivemind.DHT(host_maddrs=[LOCALHOST_MADDR], start=True)
    second = hivemind.DHT(host_maddrs=[LOCALHOST_MADDR], initial_peers=first.get_visible_maddrs(), start=True)
    serving, asking = LineageServer(first, "lin"), LineageServer(second, "lin")
    try:
        state = [torch.randn(CHUNK_BYTES // 4 + 1000), torch.randn(7)]  # over one chunk
        serving.keep(3, state)
        peer = str(first.peer_id)
        got = asking.fetch(peer, 3, [torch.zeros_like(t) for t in state], timeout=20)
        assert all(torch.equal(a, b) for a, b in zip(got, state, strict=True))
        with pytest.raises(ValueError, match=f"{peer[:16]} did not serve its state after round 4"):
            asking.fetch(peer, 4, state, timeout=1.0)
        with pytest.raises(ValueError, match="expected"):
            asking.fetch(peer, 3, [torch.zeros(5)], timeout=5)
        request = runtime_pb2.ExpertRequest(uid="", metadata=msgpack.packb({"round": "x"}))
        call = asking._rpc.p2p.call_protobuf_handler(
            PeerID.from_base58(peer), asking.name, request, runtime_pb2.ExpertResponse
        )
        reply = asking._rpc.run(call, timeout=20)
        assert msgpack.unpackb(reply.metadata) == {"ok": False}
        for old in (4, 5):  # only the last two rounds are kept
            serving.keep(old, state)
        with pytest.raises(ValueError, match="did not serve"):
            asking.fetch(peer, 3, state, timeout=0.5)
    finally:
        for node in (serving, asking):
            node.shutdown()
        second.shutdown()
        first.shutdown()


def test_the_merger_leaves_members_of_one_lineage_alone() -> None:
    """One lineage in the group (the usual round): nothing is fetched, served or changed."""
    model = build_model(ModelConfig(d_model=16, context=8), seed=0)
    outer = OuterState(model, TrainConfig())
    merger = LineageMerger(server=None, rule="median", timeout=1.0, peer_id="a")  # type: ignore[arg-type]
    digest = merger.digest_of(outer)(None)
    assert digest == lineage_digest(outer.shared_tensors())
    one = Lineage(None, ("a", "b", "c"), (digest,) * 3)
    assert merger.merge(AggregationResult(2, 3, one.peers, lineages=(one,)), outer, model, applied=True) == 1
    older = Lineage(None, ("a", "b", "c"), (digest, "", digest))  # a member that declared nothing
    assert merger.merge(AggregationResult(2, 3, one.peers, lineages=(older,)), outer, model, applied=True) == 1
    assert lineage_digest(outer.shared_tensors()) == digest


class Three(torch.nn.Module):
    """Three parameters of 4 values: with cohorts, 0 a cohort one, 1 a global one, 2 a local one."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.p = torch.nn.ParameterList([torch.nn.Parameter(torch.full((4,), value)) for _ in range(3)])


def test_each_ring_merges_only_what_it_carries_and_local_parameters_never_leave() -> None:
    """Cohorts over real peers: the cohort ring (parameters 0 and 1, three members) and the cross-cohort ring
    (parameter 1, two members) each take the median of their members' states; the local parameter 2 is
    neither served (zeros in our kept state) nor changed, and the local model moves with the global one."""
    dhts = [hivemind.DHT(host_maddrs=[LOCALHOST_MADDR], start=True)]
    dhts += [hivemind.DHT(host_maddrs=[LOCALHOST_MADDR], initial_peers=dhts[0].get_visible_maddrs(), start=True)]
    dhts += [hivemind.DHT(host_maddrs=[LOCALHOST_MADDR], initial_peers=dhts[0].get_visible_maddrs(), start=True)]
    servers = [LineageServer(dht, "rings") for dht in dhts]
    me, a, b = (str(dht.peer_id) for dht in dhts)
    try:
        model = Three(1.0)
        outer = OuterState(model, TrainConfig())
        for server, value in zip(servers[1:], (3.0, 10.0), strict=True):  # a's and b's states after the round
            server.keep(5, [torch.full((4,), value) for _ in range(6)])
        merger = LineageMerger(servers[0], "median", 20.0, me, local={2})
        cohort_ring = Lineage((0, 1), (me, a, b), ("x", "y", "z"))
        cross_ring = Lineage((1,), (me, a), ("x", "y"))
        result = AggregationResult(5, 3, (me, a, b), lineages=(cohort_ring, cross_ring))

        held = merger.merge(result, outer, model, applied=True)

        assert held == 3
        assert outer.params[0].tolist() == [3.0] * 4  # median of 1, 3, 10
        assert outer.params[1].tolist() == [2.0] * 4  # the cross ring's: median of 1 and 3 (their mean)
        assert outer.params[2].tolist() == [1.0] * 4  # local: untouched
        assert [p.tolist() for p in model.p] == [[3.0] * 4, [2.0] * 4, [1.0] * 4]  # local += global change
        kept = servers[1].fetch(me, 5, [torch.zeros(4)] * 6, timeout=20)
        assert kept[2].tolist() == [0.0] * 4 and kept[0].tolist() == [1.0] * 4  # served: no local values
    finally:
        for server in servers:
            server.shutdown()
        for dht in reversed(dhts):
            dht.shutdown()


def test_a_leaving_node_serves_its_last_state_until_the_other_lineage_fetched_it() -> None:
    """A node that shuts down right after its last mixed round waits for the members of the other lineage to
    fetch its state (else they keep their own and the run parts at its final round), and only for them."""
    dhts = [hivemind.DHT(host_maddrs=[LOCALHOST_MADDR], start=True)]
    dhts += [hivemind.DHT(host_maddrs=[LOCALHOST_MADDR], initial_peers=dhts[0].get_visible_maddrs(), start=True)]
    leaving, staying = LineageServer(dhts[0], "drain"), LineageServer(dhts[1], "drain")
    fetched: list[list[torch.Tensor]] = []
    try:
        leaving.keep(6, [torch.full((4,), 2.0)], fetchers={str(dhts[1].peer_id)})
        late = threading.Timer(
            1.5, lambda: fetched.append(staying.fetch(str(dhts[0].peer_id), 6, [torch.zeros(4)], 20))
        )
        late.start()
        started = time.monotonic()
        leaving.shutdown()  # returns once the fetch completed
        waited = time.monotonic() - started
        late.join()
        assert fetched and fetched[0][0].tolist() == [2.0] * 4
        assert 1.0 < waited < DRAIN_SECONDS

        staying.keep(7, [torch.ones(4)])  # nobody of another lineage: no wait
        started = time.monotonic()
        staying.shutdown()
        assert time.monotonic() - started < 1.0
    finally:
        staying.shutdown()
        for dht in reversed(dhts):
            dht.shutdown()


@pytest.mark.slow
def test_a_forked_member_rejoins_the_run_and_cannot_pull_it(tmp_path: Path, bootstrap_maddr: str) -> None:
    """A member that shifts its global parameters by 0.5 after round 1 (as a solo or rejected round would
    part it, exaggerated) is merged back at its next group: from round 2 on, all four members hold one
    digest, and the honest members' parameters moved by an honest step, not by the shift (the median)."""
    # Prepare: groups of all four only (min_group_size), so a slot that splits them is retried, not run without one
    rounds = 4
    aggregation = {"matchmaking_time": 1.0, "group_rounds": 1, "min_group_size": 4}
    config = write_run_config(tmp_path / "run.toml", run_id="lineage", aggregation=aggregation)
    corpus = generate_corpus(4 * 20_000, seed=7)
    args = ("--rounds", str(rounds), "--min-peers", "4")
    honest = NodeProcess.on_slices(tmp_path, config, bootstrap_maddr, corpus, 3, *args)
    forker = NodeProcess(tmp_path, "forker", config, bootstrap_maddr, corpus[60_000:], *args, program=FORK_LINEAGE)

    # Execute
    try:
        codes = [node.wait(timeout=240) for node in [*honest, forker]]
    finally:
        for node in [*honest, forker]:
            node.stop()

    # Assert
    assert codes == [0, 0, 0, 0], [node.tail() for node in [*honest, forker]]
    assert "deviant: shifted every global parameter" in forker.output(), forker.tail()
    digests = {
        name: {r["round"]: r["state_digest"] for r in node.reports()}
        for name, node in [("n0", honest[0]), ("n1", honest[1]), ("n2", honest[2]), ("forker", forker)]
    }
    assert digests["forker"][1] != digests["n0"][1]  # the fork happened
    for round_no in range(2, rounds + 1):
        assert len({d[round_no] for d in digests.values()}) == 1, (round_no, digests)
    assert "merged 2 lineages" in honest[0].output(), honest[0].tail()
    for node in honest:
        one, two = load_file(node.params(1)), load_file(node.params(2))
        shift = torch.cat([(two[k] - one[k]).abs().flatten() for k in one]).mean().item()
        assert shift < 0.05, shift  # an honest step; the mean of four would move every coordinate by 0.125
        assert "Traceback" not in node.output()


@pytest.mark.slow
def test_two_cohorts_end_a_cross_cohort_round_with_one_global_model(tmp_path: Path, bootstrap_maddr: str) -> None:
    """Six trainers on two kinds of text form two cohorts of three. Each cohort's ring moves the global
    parameters its own way, so before lineage merges the cohorts never held the same global parameters
    again (issue 16); now a cross-cohort round (every 2nd) leaves all six with one global model, while
    each cohort keeps its own cohort parameters. (A cohort done with its cohort ring a slot before the other
    waits for it, up to half the round's timeout: node/secagg/formation.py, ``spans``.)"""
    # Prepare
    rounds = 6
    config = write_run_config(
        tmp_path / "run.toml",
        run_id="cohort-lineage",
        aggregation={"matchmaking_time": 3.0},
        cohorts={"enabled": True, "global_every": 2},
    )
    texts = [generate_corpus(20_000, seed=i, style=("prose", "cyrillic")[i % 2]) for i in range(6)]
    args = ("--rounds", str(rounds), "--min-peers", "6")
    nodes = [NodeProcess(tmp_path, f"n{i}", config, bootstrap_maddr, texts[i], *args) for i in range(6)]

    # Execute
    try:
        codes = [node.wait(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            node.stop()

    # Assert
    assert codes == [0] * 6, [node.tail() for node in nodes]
    cohorts = [node.reports()[-1]["cohort"] for node in nodes]
    assert len(set(cohorts)) == 2 and cohorts[0::2] == [cohorts[0]] * 3, cohorts  # one cohort per kind of text
    run = load_node_config(str(config)).run
    names = [name for name, _ in build_model(run.model, run.train.seed).named_parameters()]
    partition = partition_parameters(names, run.cohorts)
    keys = sorted(load_file(nodes[0].params(rounds)))  # param.00000, ... in model order

    def identical(round_no: int, members: list[NodeProcess], indices: tuple[int, ...]) -> bool:
        params = [load_file(node.params(round_no)) for node in members]
        return all(torch.equal(params[0][keys[k]], other[keys[k]]) for other in params[1:] for k in indices)

    merged = [r for r in range(2, rounds + 1, 2) if identical(r, nodes, partition.global_)]
    assert merged, (
        "no cross-cohort round left the six trainers with one global model",
        _why(nodes, rounds, partition.global_, identical),
    )
    assert not identical(1, nodes, partition.global_)  # before the first cross-cohort round: two lineages
    for cohort in set(cohorts):
        members = [node for node, c in zip(nodes, cohorts, strict=True) if c == cohort]
        assert identical(rounds, members, partition.cohort)
    assert all("Traceback" not in node.output() for node in nodes)


def _why(
    nodes: list[NodeProcess], rounds: int, global_: tuple[int, ...], identical: Callable[..., bool]
) -> dict[int, object]:
    """What each cross-cohort round did, node by node: its report row, what it logged of that round."""
    rows = [{row.get("round"): row for row in node.reports()} for node in nodes]
    what: dict[int, object] = {}
    for r in range(2, rounds + 1, 2):
        said = [
            f"n{i}: " + line.split(" ", 3)[-1][:150]
            for i, node in enumerate(nodes)
            for line in node.output().splitlines()
            if f"round {r}" in line and any(word in line for word in ("declared", "lineage", "WARN"))
        ]
        what[r] = {
            "same_global_as_n0": [i for i in range(6) if identical(r, [nodes[0], nodes[i]], global_)],
            "rows": [{k: row.get(r, {}).get(k) for k in ("mode", "group_size", "cohort")} for row in rows],
            "said": said[-24:],
        }
    return what

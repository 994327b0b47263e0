"""Hierarchical averaging: parameter tags, importance weights, and local parameters never sent (real peers)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
from helpers import NodeProcess, wait_until, write_run_config
from torch import nn

from dht import Cohort, PeerRecord, encode_sketch, publish_record
from node.aggregation.base import AggregationResult, Aggregator
from node.aggregation.factory import make_aggregator
from node.aggregation.hierarchy import (
    HierarchicalAggregator,
    ParameterPartition,
    _moved,
    importance_weight,
    partition_parameters,
)
from node.aggregation.secure import SecureAggregator
from node.config import (
    AggregationConfig,
    CohortConfig,
    ConfigError,
    ModelConfig,
    NodeConfig,
    RunConfig,
    load_node_config,
)
from node.data import CORPUS_STYLES, generate_corpus
from node.model import build_model
from node.sketch import data_sketch
from node.training.checkpoint import load_round_params
from node.training.state_sharing import SharedState, StateSharer
from node.training.trainer import TrainingNode

if TYPE_CHECKING:
    from conftest import SwarmPeer


def test_parameters_are_tagged_by_name_patterns() -> None:
    """Local patterns win over cohort patterns; the rest is global; all-local is refused with one line."""
    # Prepare
    names = ["wte.weight", "blocks.0.qkv.weight", "blocks.1.mlp.0.bias", "ln_f.weight", "ln_f.bias"]

    # Execute
    partition = partition_parameters(names, CohortConfig(local_patterns=["ln_f.*", "blocks.1.*"]))

    # Assert
    assert [partition.tag(i) for i in range(len(names))] == ["global", "cohort", "local", "local", "local"]
    assert partition.shared == (0, 1)
    with pytest.raises(ConfigError, match="match every parameter"):
        partition_parameters(names, CohortConfig(local_patterns=["*"]))


@pytest.mark.parametrize(("alpha", "expected"), [(0.0, [30.0, 10.0]), (1.0, [10.0, 10.0]), (0.5, [30 / 3**0.5, 10.0])])
def test_importance_weights_scale_a_cohort_by_size_to_the_minus_alpha(alpha: float, expected: list[float]) -> None:
    """A 3-peer and a 1-peer cohort (10 samples each): alpha 0 weighs by samples, alpha 1 equally."""
    # Execute
    totals = [3 * importance_weight(10, 3, alpha), importance_weight(10, 1, alpha)]

    # Assert
    assert totals == pytest.approx(expected)


def test_cohort_config_is_validated_and_refuses_unsupported_combinations() -> None:
    """Out-of-range fields name themselves; cohorts with sharding or with user-level DP are accepted."""
    with pytest.raises(ConfigError, match=r"cohorts\.alpha"):
        load_node_config(None, {"run.cohorts.alpha": -1.0})
    with pytest.raises(ConfigError, match=r"cohorts\.local_patterns"):
        load_node_config(None, {"run.cohorts.local_patterns": "head.*"})
    sharded = {"run.cohorts.enabled": True, "run.sharding.stages": 1, "run.model.n_layer": 4}
    assert load_node_config(None, sharded).run.sharding.stages == 1  # the trainers' parts: node/sharding/fronts.py
    user_dp = {"run.privacy.enabled": True, "run.privacy.level": "user", "run.privacy.target_epsilon": 8.0}
    assert load_node_config(None, {"run.cohorts.enabled": True, **user_dp}).run.privacy.level == "user"
    with pytest.raises(ConfigError, match=r"cohorts\.min_separation"):
        load_node_config(None, {"run.cohorts.min_separation": 1.0})
    combined = {"run.cohorts.enabled": True, "run.compression.bits": 8, "run.privacy.enabled": True}
    assert load_node_config(None, {**combined, "run.privacy.target_epsilon": 8.0}).run.compression.bits == 8
    assert load_node_config(None, {"run.cohorts.enabled": True}).run.cohorts.distance_threshold is None
    assert load_node_config(None, {"run.cohorts.enabled": True}).run.cohorts.global_every == 4


class PersonalizedNet(nn.Module):
    """A body shared by all, a middle shared in the cohort, and a big personal head (most of the bytes)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(16, 16)
        self.middle = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4096)


class Recording(Aggregator):
    """Passes every call on to a real aggregator, keeping the shapes and values it was given."""

    def __init__(self, inner: Aggregator, calls: list[list[torch.Tensor]]):
        self.inner, self.calls = inner, calls

    def aggregate(self, round_no: int, tensors: Sequence[torch.Tensor], weight: float) -> AggregationResult | None:
        self.calls.append([t.detach().clone() for t in tensors])
        return self.inner.aggregate(round_no, tensors, weight)

    def shutdown(self) -> None:
        self.inner.shutdown()


def test_local_parameters_never_reach_an_aggregator_or_the_wire(
    swarm_factory: Callable[..., list[SwarmPeer]], record_factory: Callable[..., PeerRecord], run_id: str
) -> None:
    """3 real peers of one cohort: aggregators see only cohort+global tensors, bytes sent fit them, heads stay own."""
    # Prepare
    peers = swarm_factory(3, run_ids=[run_id])
    corpus = generate_corpus(60_000, seed=2)
    for i, peer in enumerate(peers):
        sketch = encode_sketch(data_sketch(corpus[i * 20_000 : (i + 1) * 20_000]))
        assert publish_record(peer.dht, run_id, record_factory(peer.identity, sketch=sketch).sign(peer.identity))
    model = PersonalizedNet()
    names = [name for name, _ in model.named_parameters()]
    cohorts = CohortConfig(enabled=True, local_patterns=["head.*"], cohort_patterns=["middle.*"], global_every=2)
    partition = partition_parameters(names, cohorts)
    aggregation = AggregationConfig(mode="secure", min_group_size=3, matchmaking_time=1.0, timeout=60.0)
    calls: list[list[list[torch.Tensor]]] = [[] for _ in peers]
    made: list[list[Aggregator]] = [[] for _ in peers]

    def recording_factory(i: int) -> Callable[..., Aggregator]:
        def make(*args: Any, **kwargs: Any) -> Aggregator:
            inner = make_aggregator(*args, **kwargs)
            made[i].append(inner)
            return Recording(inner, calls[i])

        return make

    aggregators = [
        HierarchicalAggregator(
            peer.dht,
            run_id,
            "ab" * 16,
            peer.identity.peer_id,
            list(model.parameters()),
            partition,
            cohorts,
            aggregation.min_group_size,
            make=recording_factory(i),
            config=aggregation,
            identity=peer.identity,
            weight_bound=64.0,
        )
        for i, peer in enumerate(peers)
    ]
    generator = torch.Generator().manual_seed(0)
    updates = [[torch.randn(p.shape, generator=generator) / 10 for p in model.parameters()] for _ in peers]
    originals = [[t.clone() for t in update] for update in updates]
    results: list[AggregationResult | None] = [None] * 3
    try:
        # Execute
        for aggregator in aggregators:
            aggregator.place()

        def step(i: int) -> None:
            results[i] = aggregators[i].aggregate(2, updates[i], weight=16.0)  # round 2: cohort and cross-cohort

        threads = [threading.Thread(target=step, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        sent = [sum(a.bytes_sent for a in m if isinstance(a, SecureAggregator)) for m in made]
    finally:
        for aggregator in aggregators:
            aggregator.shutdown()

    # Assert
    assert all(r is not None and r.group_size == 3 for r in results), results
    assert all(a.cohort is not None and len(a.cohort) == 3 for a in aggregators)
    shared_shapes = [updates[0][i].shape for i in partition.shared]
    global_shapes = [updates[0][i].shape for i in partition.global_]
    for node_calls in calls:
        assert [[t.shape for t in call] for call in node_calls] == [shared_shapes, global_shapes]
    for i, node_calls in enumerate(calls):  # what went in is this node's own cohort+global delta, nothing else
        assert all(torch.equal(a, originals[i][j]) for a, j in zip(node_calls[0], partition.shared, strict=True))
    local_numel = sum(updates[0][i].numel() for i in partition.local)
    shared_numel = sum(updates[0][i].numel() for i in partition.shared)
    sent_numel = shared_numel + sum(updates[0][i].numel() for i in partition.global_)
    assert local_numel > 50 * sent_numel  # the head dwarfs the rest: had it been sent, the bytes would show
    for count in sent:
        assert 4 * sent_numel * 2 * 2 / 3 <= count < 4 * local_numel / 4, sent
    for i in partition.local:  # each node keeps its own head's delta
        assert all(torch.equal(update[i], original[i]) for update, original in zip(updates, originals, strict=True))
    for i in partition.shared:  # the rest is the group's mean, the same everywhere
        assert torch.allclose(updates[0][i], updates[1][i]) and torch.allclose(updates[0][i], updates[2][i])
        assert not torch.allclose(updates[0][i], originals[0][i])


def test_a_node_shares_zeros_in_place_of_its_local_parameters(tmp_path: Path) -> None:
    """The state a node serves to late joiners (and applies from them) leaves its local parameters out."""
    # Prepare
    (tmp_path / "data.txt").write_bytes(generate_corpus(20_000, seed=1))
    run = RunConfig(min_memory_gb=0.0, cohorts=CohortConfig(enabled=True, local_patterns=["ln_f.*", "wpe.*"]))
    config = NodeConfig(run=run, data=str(tmp_path / "data.txt"), identity=str(tmp_path / "id"), workdir=str(tmp_path))
    node = TrainingNode(config)
    try:
        node.prepare()
        assert node.partition is not None
        with torch.no_grad():
            for param in node.global_params:
                param.add_(1.0)

        # Execute
        shared = node._state_tensors()
    finally:
        node.close()

    # Assert
    count = len(node.global_params)
    for i, param in enumerate(node.global_params):
        if i in node.partition.local:
            assert not shared[i].any() and not shared[count + i].any()
        else:
            assert torch.equal(shared[i], param.detach())
    assert {node.partition.names[i].split(".")[0] for i in node.partition.local} == {"ln_f", "wpe"}


@pytest.mark.slow
def test_three_nodes_of_one_cohort_share_all_but_their_local_layers(tmp_path: Path, bootstrap_maddr: str) -> None:
    """Real `zen-node join` processes with cohorts, 8-bit compression in the ring and record-level DP: one
    cohort, group rounds, identical shared params, own ln_f, epsilon in every report."""
    # Prepare
    config = write_run_config(
        tmp_path / "run.toml",
        run_id="cohorts",
        train={"inner_steps": 4},
        aggregation={"matchmaking_time": 1.0, "timeout": 30.0},
        cohorts={"enabled": True, "global_every": 2},
        compression={"bits": 8},
        privacy={"enabled": True, "target_epsilon": 8.0, "planned_rounds": 3, "clip_norm": 1.0},
    )
    corpus = generate_corpus(60_000, seed=3)
    rounds = 3
    nodes = NodeProcess.on_slices(
        tmp_path, config, bootstrap_maddr, corpus, 3, "--rounds", str(rounds), "--min-peers", "3"
    )
    try:
        # Execute
        codes = [node.wait(240) for node in nodes]
    finally:
        for node in nodes:
            node.stop()

    # Assert
    assert codes == [0, 0, 0], [node.output()[-2000:] for node in nodes]
    trained = [[r for r in node.reports() if r["mode"] not in ("initial", "loaded")] for node in nodes]
    assert all(r["mode"] == "group" and r["group_size"] == 3 for t in trained for r in t), trained
    assert len({r["cohort"] for t in trained for r in t}) == 1
    assert all(0 < r["epsilon"] <= 8.0 for t in trained for r in t), trained
    names = [name for name, _ in build_model(ModelConfig(d_model=32, context=32), seed=0).named_parameters()]
    params = [load_round_params(node.params(rounds)) for node in nodes]
    for j, name in enumerate(names):
        same = all(torch.equal(params[0][j], other[j]) for other in params[1:])
        assert same != name.startswith("ln_f."), name  # local layers differ, everything else is the group's


class LeftOver(Aggregator):
    """A ring that reports a fixed residual (what its sum left out); it averages nothing itself."""

    def __init__(self, residual: torch.Tensor | None):
        self._left = residual

    def aggregate(self, round_no: int, tensors: Sequence[torch.Tensor], weight: float) -> AggregationResult | None:
        return None

    def shutdown(self) -> None:
        pass

    @property
    def residual(self) -> torch.Tensor | None:
        return self._left


def test_each_rings_residual_returns_to_the_parameters_it_carried() -> None:
    """Compression with cohorts: the cohort ring's residual lands on cohort+global params, the run-wide ring's
    on global params too, local params get none."""
    # Prepare
    tensors = [torch.zeros(2), torch.zeros(3), torch.zeros(1)]  # global, cohort, local
    partition = ParameterPartition(("g", "c", "l"), global_=(0,), cohort=(1,), local=(2,))
    cohort_ring = LeftOver(torch.arange(1.0, 6.0))  # over partition.shared: g (2 values), c (3 values)
    global_ring = LeftOver(torch.tensor([10.0, 20.0]))

    # Execute
    both = HierarchicalAggregator._combined_residual(
        tensors, [(cohort_ring, partition.shared), (global_ring, partition.global_)]
    )
    cohort_only = HierarchicalAggregator._combined_residual(tensors, [(cohort_ring, partition.shared)])
    none = HierarchicalAggregator._combined_residual(tensors, [(LeftOver(None), partition.shared)])

    # Assert
    assert both is not None and both.tolist() == [11.0, 22.0, 3.0, 4.0, 5.0, 0.0]
    assert cohort_only is not None and cohort_only.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 0.0]
    assert none is None


class Idle(Aggregator):
    """An inner aggregator that never averages (the placement under test reads only the DHT's records)."""

    def aggregate(self, round_no: int, tensors: Sequence[torch.Tensor], weight: float) -> AggregationResult | None:
        return None

    def shutdown(self) -> None:
        pass


def test_a_node_whose_records_move_it_reports_the_move_once(
    swarm_factory: Callable[..., list[SwarmPeer]], record_factory: Callable[..., PeerRecord], run_id: str
) -> None:
    """Seven real peers in cohorts of 4 and 3: when peer 0's sketch moves to the other, its next placement says so."""
    # Prepare
    peers = swarm_factory(7, run_ids=[run_id])
    texts = [generate_corpus(80_000, seed=k, style=CORPUS_STYLES[k]) for k in range(2)]
    slices = [texts[0][i * 20_000 : (i + 1) * 20_000] for i in range(4)] + [
        texts[1][i * 20_000 :][:20_000] for i in range(3)
    ]
    sketches = [encode_sketch(data_sketch(data)) for data in slices]

    def publish(i: int, sketch: bytes) -> None:
        record = record_factory(peers[i].identity, sketch=sketch, ttl=60.0)
        assert publish_record(peers[i].dht, run_id, record.sign(peers[i].identity), ttl=60.0)

    for i in range(7):
        publish(i, sketches[i])
    cohorts = CohortConfig(enabled=True, cohort_patterns=["middle.*"])
    model = PersonalizedNet()
    partition = partition_parameters([n for n, _ in model.named_parameters()], cohorts)
    node = HierarchicalAggregator(
        peers[0].dht, run_id, "ab" * 16, peers[0].identity.peer_id, list(model.parameters()), partition, cohorts, 3,
        make=lambda *args, **kwargs: Idle(),
    )  # fmt: skip

    moves: list[bool] = []  # moved() after every placement, as the trainer asks it after each prepare_round

    def placed_with(member: str) -> Cohort | None:
        cohort = node.place()
        moves.append(node.moved())
        return cohort if cohort is not None and len(cohort) == 4 and member in cohort.members else None

    try:
        first = wait_until(lambda: placed_with(peers[1].identity.peer_id), 30.0, "peer 0 placed with peers 1-3")
        before = list(moves)

        # Execute
        publish(0, sketches[5])  # peer 0's data now looks like the other cohort's
        wait_until(lambda: placed_with(peers[5].identity.peer_id), 30.0, "peer 0 placed with peers 4-6")
        again = node.moved()
    finally:
        node.shutdown()

    # Assert
    assert first is not None and not any(before)
    assert moves[len(before) :].count(True) == 1 and not again
    assert node.cohort_members is not None and set(node.cohort_members) == {
        p.identity.peer_id for p in (peers[0], *peers[4:])
    }


def test_a_joiner_downloads_only_from_the_donors_it_names(swarm_factory: Callable[..., list[SwarmPeer]]) -> None:
    """Three real donors, the most advanced in another cohort: a download limited to our cohort gets ours."""
    # Prepare
    peers = swarm_factory(4, run_ids=["donors"])
    states = [[torch.full((3,), float(i))] for i in range(3)]
    sharers = [
        StateSharer(peer.dht, "donors", lambda i=i: ({"round": 5, "run_hash": "ab" * 16}, states[i]))
        for i, peer in enumerate(peers[:3])
    ]
    joiner = StateSharer(peers[3].dht, "donors", lambda: ({"round": 0, "run_hash": "ab" * 16}, [torch.zeros(3)]))
    try:
        for i, sharer in enumerate(sharers):
            sharer.announce(10 - i)  # donor 0 is the most advanced
        ours = (peers[2].identity.peer_id,)

        # Execute
        def download(donors: tuple[str, ...] | None = None) -> SharedState | None:
            return joiner.download([torch.zeros(3)], "ab" * 16, donors=donors)

        # unrestricted, the most advanced donor (0) wins once its declaration is listed
        anyone = wait_until(lambda: (s := download()) and s.tensors[0][0] == 0 and s, 30.0, "donor 0's state")
        limited = wait_until(lambda: download(ours), 30.0, "a download from our cohort's donor")
    finally:
        for sharer in [*sharers, joiner]:
            sharer.shutdown()

    # Assert
    assert torch.equal(anyone.tensors[0], states[0][0])
    assert torch.equal(limited.tensors[0], states[2][0])


def test_a_move_is_a_change_of_company_even_when_the_cohort_id_stays() -> None:
    """The smallest member of both cohorts keeps the id; it still moved if most of its co-members are new."""
    old = Cohort(cohort_id="same", members=("a", "b", "c", "d"), distances=(0.0,) * 4)
    joined = Cohort(cohort_id="same", members=("a", "b", "c", "d", "e"), distances=(0.0,) * 5)
    moved = Cohort(cohort_id="same", members=("a", "x", "y", "z"), distances=(0.0,) * 4)
    assert _moved("a", old, moved) and not _moved("a", old, joined) and not _moved("a", old, old)

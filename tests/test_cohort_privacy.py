"""Cohorts with user-level DP: each ring's release (cohort, cross-cohort) is its own accounting event.

A round runs the cohort ring and, every ``global_every`` rounds, the cross-cohort ring: the ledger grants
one release per ring that the budget still fits, the accountant counts each, and the noise is planned for
``R + R // global_every`` releases. The rings here are stand-ins that go through the masked all-reduce's DP
hooks (the real ring's phases are tested in test_dp_accounting.py); placement reads real DHT records, and the
last test runs six real `zen-node join` processes in two cohorts with secure aggregation.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
from helpers import NodeProcess, wait_until, write_run_config
from torch import nn

from dht import PeerRecord, encode_sketch, publish_record
from node.aggregation.base import AggregationResult, Aggregator
from node.aggregation.hierarchy import HierarchicalAggregator, partition_parameters
from node.config import CohortConfig, RunConfig, load_node_config
from node.data import CORPUS_STYLES, generate_corpus
from node.model import build_run_model
from node.secagg.privacy import NoiseShare, PrivacyAccountant, ReleaseLedger, ReleaseRefused, pld_epsilon
from node.sketch import data_sketch
from node.training.privacy import TrainerPrivacy, planned_releases, setup_privacy, user_noise_multiplier

if TYPE_CHECKING:
    from conftest import SwarmPeer

DELTA = 1e-5
SLICE = 20_000  # bytes of data per peer


class ReleasingRing(Aggregator):
    """A ring that passes the masked all-reduce's DP hooks (a permit checked at "keys", taken at "parts": one
    release), then decodes (``decodes``) or fails after its parts left. A refused session averages nothing,
    as ``AveragerAggregator`` returns None when hivemind reports the failure."""

    def __init__(self, name: str, noise: NoiseShare | None, log: list[tuple[int, str, str]], decodes: bool):
        self.name, self.noise, self.log, self.decodes = name, noise, log, decodes

    def aggregate(self, round_no: int, tensors: Sequence[torch.Tensor], weight: float) -> AggregationResult | None:
        try:
            if self.noise is not None:
                self.noise.at_phase("keys")
                self.noise.at_phase("parts")
        except ReleaseRefused:
            self.log.append((round_no, self.name, "refused"))
            return None
        self.log.append((round_no, self.name, "released"))
        return AggregationResult(round=round_no, group_size=3, peers=("a", "b", "c")) if self.decodes else None

    def shutdown(self) -> None:
        pass


class PersonalizedNet(nn.Module):
    """A global body, a cohort middle and a local head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.middle = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)


COHORTS = CohortConfig(enabled=True, local_patterns=["head.*"], cohort_patterns=["middle.*"], global_every=2)


def placed_node(
    peers: list[SwarmPeer],
    record_factory: Callable[..., PeerRecord],
    run_id: str,
    noise: NoiseShare | None,
    log: list[tuple[int, str, str]],
    cohorts: CohortConfig = COHORTS,
    cohort_decodes: bool = True,
) -> HierarchicalAggregator:
    """Peer 0's HierarchicalAggregator over releasing rings, placed in the cohort of every peer's record (one
    corpus: one cohort of ``len(peers)``)."""
    corpus = generate_corpus(len(peers) * SLICE, seed=2)
    for i, peer in enumerate(peers):
        sketch = encode_sketch(data_sketch(corpus[i * SLICE : (i + 1) * SLICE]))
        assert publish_record(peer.dht, run_id, record_factory(peer.identity, sketch=sketch).sign(peer.identity))

    def make(dht: Any, key: str, templates: Any, noise: NoiseShare | None = None, **kwargs: Any) -> Aggregator:
        cohort_ring = "-cohort-" in key
        return ReleasingRing("cohort" if cohort_ring else "global", noise, log, cohort_decodes or not cohort_ring)

    model = PersonalizedNet()
    partition = partition_parameters([name for name, _ in model.named_parameters()], cohorts)
    node = HierarchicalAggregator(
        peers[0].dht, run_id, "ab" * 16, peers[0].identity.peer_id, list(model.parameters()), partition, cohorts, 3,
        make=make, noise=noise,
    )  # fmt: skip
    wait_until(lambda: (c := node.place()) is not None and len(c) == len(peers), 30.0, "peer 0 placed with the rest")
    return node


def dp_rounds(node: HierarchicalAggregator, privacy: TrainerPrivacy, rounds: int) -> list[int]:
    """The trainer's round as far as DP goes (launch: clip and permit; the rings; landed: count): the releases
    counted at each round."""
    counted = []
    for round_no in range(1, rounds + 1):
        update = [torch.full_like(p, 0.1) for p in PersonalizedNet().parameters()]
        before = privacy.spent
        if privacy.launch(update):
            node.prepare_round(round_no)
            node.aggregate(round_no, [t.clone() for t in update], weight=8.0)
        privacy.landed()
        counted.append(privacy.spent - before)
    return counted


def user_run(**cohorts: object) -> RunConfig:
    """A user-level DP run with cohorts (sigma 2, no budget unless the caller's node sets one)."""
    overrides = {f"run.cohorts.{key}": value for key, value in {"enabled": True, **cohorts}.items()}
    privacy = {"enabled": True, "level": "user", "noise_multiplier": 2.0, "clip_norm": 1.0, "allow_noisy": True}
    return load_node_config(None, {**{f"run.privacy.{k}": v for k, v in privacy.items()}, **overrides}).run


# --- the ledger and the plan -------------------------------------------------------------------------------


def test_a_two_ring_ledger_allows_one_release_per_ring_within_the_rounds_permit() -> None:
    """A retry inside a ring is refused after its release; the other ring still releases; a permit of 1 is
    spent by whichever ring runs first; an unknown ring never releases."""
    # Prepare
    ledger = ReleaseLedger(rings=2)

    # Execute / Assert: a cross-cohort round with room for both
    ledger.permit(2)
    ledger.check(0)
    ledger.take(0)
    with pytest.raises(ReleaseRefused):
        ledger.check(0)  # hivemind's retry of the cohort ring: no second noisy copy
    ledger.check(1)
    ledger.take(1)
    with pytest.raises(ReleaseRefused):
        ledger.take(1)

    # room for one: the cross-cohort ring (a node whose cohort is too small to average) takes it
    ledger.permit(1)
    ledger.take(1)
    with pytest.raises(ReleaseRefused):
        ledger.check(0)
    ledger.permit(0)
    with pytest.raises(ReleaseRefused):
        ledger.check(1)
    ledger.permit(2)
    with pytest.raises(ReleaseRefused, match="no ring 2"):
        ledger.take(2)
    assert ledger.released == 3 and ledger.permits == 2


@pytest.mark.parametrize(("rounds", "every", "releases"), [(10, 2, 15), (10, 1, 20), (100, 4, 125), (7, 3, 9)])
def test_the_plan_counts_every_cross_cohort_release(rounds: int, every: int, releases: int) -> None:
    """planned_releases is R + R // global_every with cohorts, R without."""
    # Prepare
    planned = {"run.privacy.planned_rounds": rounds}

    # Execute
    with_cohorts = planned_releases(load_node_config(None, {**planned, **cohorts_on(every)}).run)
    without = planned_releases(load_node_config(None, planned).run)

    # Assert
    assert (with_cohorts, without) == (releases, rounds)


def cohorts_on(every: int) -> dict[str, object]:
    return {"run.cohorts.enabled": True, "run.cohorts.global_every": every}


def test_sigma_derived_for_cohorts_stays_within_the_target_over_all_releases() -> None:
    """Target 8 over 10 rounds, global_every 2: sigma is calibrated for 15 releases (the rounds-only sigma
    would spend about 10.2 on them), and 10 rounds without cohorts spend 8 at their own sigma."""
    # Prepare
    privacy = {"run.privacy.enabled": True, "run.privacy.level": "user", "run.privacy.target_epsilon": 8.0}
    planned = {**privacy, "run.privacy.planned_rounds": 10}

    # Execute
    sigma = user_noise_multiplier(load_node_config(None, {**planned, **cohorts_on(2)}).run)
    plain = user_noise_multiplier(load_node_config(None, planned).run)

    # Assert
    assert pld_epsilon(sigma, 15, DELTA) <= 8.0 < pld_epsilon(sigma * 0.98, 15, DELTA)
    assert pld_epsilon(plain, 10, DELTA) <= 8.0 < pld_epsilon(plain, 15, DELTA)
    assert sigma > plain


# --- the rounds (real DHT records for placement, releasing rings) ------------------------------------------


@pytest.mark.parametrize("every", [2, 3])
def test_each_ring_is_its_own_release_and_epsilon_counts_them_all(
    swarm_factory: Callable[..., list[SwarmPeer]], record_factory: Callable[..., PeerRecord], run_id: str, every: int
) -> None:
    """Six rounds: one release on a cohort round, two on a cross-cohort round; epsilon is the accountant's for
    R + R // global_every releases, with the ledger and multiplier setup_privacy builds for the run."""
    # Prepare
    run = user_run(global_every=every)
    dimension = sum(p.numel() for p in PersonalizedNet().parameters())
    noise, accountant = setup_privacy(run, dimension, 0.0)
    privacy = TrainerPrivacy("user", 0.0, 1.0, user=(noise, accountant))
    log: list[tuple[int, str, str]] = []
    cohorts = replace(COHORTS, global_every=every)
    node = placed_node(swarm_factory(3, run_ids=[run_id]), record_factory, run_id, noise, log, cohorts)
    try:
        # Execute
        counted = dp_rounds(node, privacy, 6)
    finally:
        node.shutdown()

    # Assert
    assert counted == [2 if r % every == 0 else 1 for r in range(1, 7)]
    assert [entry for entry in log if entry[2] != "released"] == []
    assert [(r, ring) for r, ring, _ in log if r == every] == [(every, "cohort"), (every, "global")]
    assert accountant.rounds == noise.ledger.released == 6 + 6 // every  # type: ignore[union-attr]
    assert privacy.epsilon() == pld_epsilon(accountant.noise_multiplier, 6 + 6 // every, DELTA)
    assert privacy.epsilon() > pld_epsilon(accountant.noise_multiplier, 6, DELTA)  # not one event a round


def test_the_budget_stops_the_cross_cohort_ring_before_it_overspends(
    swarm_factory: Callable[..., list[SwarmPeer]], record_factory: Callable[..., PeerRecord], run_id: str
) -> None:
    """A budget between epsilon(2) and epsilon(3): round 1 releases once, round 2's cohort ring takes the last
    release and its cross-cohort ring is refused; from round 3 nothing leaves, and epsilon stays in budget."""
    # Prepare
    budget = (pld_epsilon(2.0, 2, DELTA) + pld_epsilon(2.0, 3, DELTA)) / 2
    ledger = ReleaseLedger(rings=2)
    noise = NoiseShare(2.0, 1.0, 1, ledger=ledger)
    accountant = PrivacyAccountant(2.0, DELTA, budget, ledger=ledger)
    privacy = TrainerPrivacy("user", budget, 1.0, user=(noise, accountant))
    log: list[tuple[int, str, str]] = []
    node = placed_node(swarm_factory(3, run_ids=[run_id]), record_factory, run_id, noise, log)
    try:
        # Execute
        counted = dp_rounds(node, privacy, 4)
    finally:
        node.shutdown()

    # Assert
    assert counted == [1, 1, 0, 0]
    assert log == [(1, "cohort", "released"), (2, "cohort", "released"), (2, "global", "refused")]
    assert privacy.budget_spent and privacy.epsilon() == pld_epsilon(2.0, 2, DELTA) <= budget


def test_a_derived_sigma_releases_in_every_planned_ring_and_stops_after_the_plan(
    swarm_factory: Callable[..., list[SwarmPeer]], record_factory: Callable[..., PeerRecord], run_id: str
) -> None:
    """Target 8 over 5 rounds, global_every 2, a 16-bit code: sigma derived for the multiplier the accountant
    charges (the code's rounding shrinks it by about 1%) spends all R + R // global_every = 7 releases within the
    target, the cohort ring of round 2 and 4 and their cross-cohort rings included, and round 6 sends nothing."""
    # Prepare
    privacy_fields = {"enabled": True, "level": "user", "target_epsilon": 8.0, "planned_rounds": 5, "allow_noisy": True}
    overrides = {f"run.privacy.{key}": value for key, value in privacy_fields.items()}
    run = load_node_config(None, {**overrides, **cohorts_on(2), "run.compression.bits": 16}).run
    dimension = sum(p.numel() for p in PersonalizedNet().parameters())
    noise, accountant = setup_privacy(run, dimension, 0.0)
    privacy = TrainerPrivacy("user", 8.0, 1.0, user=(noise, accountant))
    log: list[tuple[int, str, str]] = []
    node = placed_node(swarm_factory(3, run_ids=[run_id]), record_factory, run_id, noise, log)
    try:
        # Execute
        counted = dp_rounds(node, privacy, 7)
    finally:
        node.shutdown()

    # Assert
    assert counted == [1, 2, 1, 2, 1, 0, 0] and accountant.rounds == planned_releases(run) == 7
    assert [(r, ring) for r, ring, _ in log if r in (4, 5)] == [(4, "cohort"), (4, "global"), (5, "cohort")]
    assert privacy.budget_spent and privacy.epsilon() == pld_epsilon(accountant.noise_multiplier, 7, DELTA) <= 8.0


def test_a_node_without_a_cohort_ring_spends_its_last_release_across_cohorts(
    swarm_factory: Callable[..., list[SwarmPeer]], record_factory: Callable[..., PeerRecord], run_id: str
) -> None:
    """Alone in its cohort (too small to average), a node's only ring is the cross-cohort one: a budget of one
    release lets it release there, at round 2, and nothing after."""
    # Prepare
    budget = (pld_epsilon(2.0, 1, DELTA) + pld_epsilon(2.0, 2, DELTA)) / 2
    ledger = ReleaseLedger(rings=2)
    noise = NoiseShare(2.0, 1.0, 1, ledger=ledger)
    privacy = TrainerPrivacy("user", budget, 1.0, user=(noise, PrivacyAccountant(2.0, DELTA, budget, ledger=ledger)))
    log: list[tuple[int, str, str]] = []
    node = placed_node(swarm_factory(1, run_ids=[run_id]), record_factory, run_id, noise, log)
    try:
        # Execute
        counted = dp_rounds(node, privacy, 4)
    finally:
        node.shutdown()

    # Assert
    assert counted == [0, 1, 0, 0]
    assert log == [(2, "global", "released")]


@pytest.mark.parametrize("noised", [True, False])
def test_an_unnoised_cohort_update_is_withheld_when_only_the_cross_cohort_ring_averages(
    swarm_factory: Callable[..., list[SwarmPeer]], record_factory: Callable[..., PeerRecord], run_id: str, noised: bool
) -> None:
    """The cohort ring released but gave us no mean, the cross-cohort ring did: under DP the cohort params'
    entries of the mean are zero and all of our update is in the residual (kept for a later group); both
    releases count. Without DP the cohort params keep our own update, as before."""
    # Prepare
    ledger = ReleaseLedger(rings=2)
    noise = NoiseShare(2.0, 1.0, 1, ledger=ledger) if noised else None
    log: list[tuple[int, str, str]] = []
    node = placed_node(swarm_factory(3, run_ids=[run_id]), record_factory, run_id, noise, log, cohort_decodes=False)
    update = [torch.full_like(p, float(i + 1)) for i, p in enumerate(PersonalizedNet().parameters())]
    mean = [t.clone() for t in update]
    ledger.permit(2)
    try:
        # Execute
        result = node.aggregate(2, mean, weight=8.0)
    finally:
        node.shutdown()

    # Assert
    assert result is not None and [ring for _, ring, _ in log] == ["cohort", "global"]
    partition = node.partition
    residual = node.residual
    if noised:
        assert ledger.released == 2
        assert residual is not None
        pieces = residual.split([t.numel() for t in update])
        for i, (after, before) in enumerate(zip(mean, update, strict=True)):
            withheld = i in partition.cohort
            assert torch.equal(after, torch.zeros_like(before) if withheld else before), partition.names[i]
            assert torch.equal(pieces[i].view_as(before), before if withheld else torch.zeros_like(before))
    else:
        assert residual is None and all(torch.equal(a, b) for a, b in zip(mean, update, strict=True))


# --- real processes ----------------------------------------------------------------------------------------

RELEASES = re.compile(r"(\d+) DP release\(s\) counted this round, (\d+) in all: epsilon ([\d.]+)")


@pytest.mark.slow
def test_six_nodes_in_two_cohorts_account_every_ring_they_release_in(tmp_path: Path, bootstrap_maddr: str) -> None:
    """Six `zen-node join` processes on two corpora, cohorts + user-level DP + secure aggregation, 4 rounds with
    global_every 2: two cohorts of 3, every node releases twice on cross-cohort rounds, and every report's
    epsilon is the accountant's for the releases the node counted by then."""
    # Prepare
    rounds, every = 4, 2
    config = write_run_config(
        tmp_path / "run.toml",
        run_id="cohort-dp",
        train={"inner_steps": 4},
        aggregation={"matchmaking_time": 2.0, "timeout": 30.0},
        cohorts={"enabled": True, "global_every": every},
        privacy={"enabled": True, "level": "user", "noise_multiplier": 2.0, "clip_norm": 1.0, "allow_noisy": True},
    )
    run = load_node_config(config).run
    dimension = sum(p.numel() for p in build_run_model(run.model, run.train.seed, False, run.lora).parameters())
    multiplier = setup_privacy(run, dimension, 0.0)[1].noise_multiplier
    texts = [generate_corpus(3 * SLICE, seed=k, style=CORPUS_STYLES[k]) for k in range(2)]
    data = [texts[k][j * SLICE : (j + 1) * SLICE] for k in range(2) for j in range(3)]
    common = ["--rounds", str(rounds), "--min-peers", "6"]
    nodes = [NodeProcess(tmp_path, f"n{i}", config, bootstrap_maddr, data[i], *common) for i in range(6)]
    try:
        # Execute
        codes = [node.wait(420) for node in nodes]
    finally:
        for node in nodes:
            node.stop()

    # Assert
    assert codes == [0] * 6, [node.tail() for node in nodes]
    trained = [[r for r in node.reports() if r["mode"] not in ("initial", "loaded")] for node in nodes]
    cohort_of = [{r["cohort"] for r in rows} for rows in trained]
    assert all(len(c) == 1 for c in cohort_of), cohort_of
    assert cohort_of[0] == cohort_of[1] == cohort_of[2] != cohort_of[3] == cohort_of[4] == cohort_of[5]
    for node, rows in zip(nodes, trained, strict=True):
        counted = [(int(new), int(total), float(eps)) for new, total, eps in RELEASES.findall(node.output())]
        assert [new for new, _, _ in counted] == [1, 2, 1, 2], (node.folder.name, counted)
        totals = [0] + [total for _, total, _ in counted]
        epsilons = {round(pld_epsilon(multiplier, n, run.privacy.delta), 4) for n in totals}
        assert all(r["epsilon"] in epsilons for r in rows), (node.folder.name, rows, epsilons)
        assert rows[-1]["epsilon"] == round(pld_epsilon(multiplier, rounds + rounds // every, run.privacy.delta), 4)
        assert all(math.isclose(eps, pld_epsilon(multiplier, total, run.privacy.delta), abs_tol=1e-4) for
                   _, total, eps in counted)  # fmt: skip
    assert all(r["mode"] == "group" for rows in trained for r in rows), trained

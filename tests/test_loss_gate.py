"""The held-out loss gate (node/training/gate.py): a poisoned group mean is rejected, an honest one applied."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO_ROOT, NodeProcess, write_run_config

from node.config import ConfigError, ModelConfig, TrainConfig, load_node_config
from node.data import generate_corpus
from node.model import build_model
from node.training.gate import LossGate, admits
from node.training.inner import evaluate
from node.training.outer import OuterState
from node.training.report import RoundOutcome

POISON_MEAN = [sys.executable, str(REPO_ROOT / "tests" / "deviant_node.py"), "poison-mean"]


def test_gate_tolerance_is_checked_in_the_config() -> None:
    """A tolerance outside [0, 10] is refused with the field's name and range."""
    with pytest.raises(ConfigError, match=r"aggregation.gate_tolerance must be in \[0, 10\]"):
        load_node_config(None, {"run.aggregation.gate_tolerance": -0.1})
    with pytest.raises(ConfigError, match=r"aggregation.gate_tolerance must be in \[0, 10\]"):
        load_node_config(None, {"run.aggregation.gate_tolerance": math.nan})


@pytest.mark.parametrize(
    ("before", "after", "tolerance", "admitted"),
    [
        (4.0, 3.0, 0.05, True),  # the loss falls
        (4.0, 4.19, 0.05, True),  # a rise within the tolerance
        (4.0, 4.21, 0.05, False),  # beyond it
        (4.0, math.nan, 0.05, False),  # a broken model is never admitted
        (4.0, math.inf, 0.05, False),
        (math.nan, 4.0, 0.05, True),  # nothing to lose
        (4.0, 100.0, 0.0, True),  # 0: no gate
    ],
)
def test_admits(before: float, after: float, tolerance: float, admitted: bool) -> None:
    assert admits(before, after, tolerance) is admitted


def test_a_rejected_step_leaves_params_and_momentum_as_they_were() -> None:
    """The gate rolls a rejected outer step back entirely (Nesterov momentum included) and applies a good one."""
    # Prepare
    model = build_model(ModelConfig(d_model=16, context=8), seed=0)
    outer = OuterState(model, TrainConfig(outer_lr=0.7, outer_momentum=0.9))
    outer.step([torch.full_like(p, 1e-3) for p in outer.params])  # some momentum to keep
    saved = [t.clone() for t in outer.shared_tensors()]
    losses = iter([2.0, 9.0, 1.9])  # before, after the poisoned step, after the honest step
    gate = LossGate(0.05, lambda: next(losses))

    # Execute
    poisoned = gate.step(outer, [torch.ones_like(p) for p in outer.params], round_no=2)
    after_rejection = [t.clone() for t in outer.shared_tensors()]
    honest = gate.step(outer, [torch.full_like(p, 1e-3) for p in outer.params], round_no=3)

    # Assert
    assert (poisoned, honest) == (RoundOutcome.REJECTED, RoundOutcome.GROUP)
    assert all(torch.equal(a, b) for a, b in zip(saved, after_rejection, strict=True))
    assert not torch.equal(outer.params[0], saved[0])
    assert gate.rejected == 1


def test_a_mean_far_larger_than_our_own_update_is_rejected_without_an_evaluation() -> None:
    """The norm check: a mean whose L2 norm is over ``norm_ratio`` times our own update's is refused before any
    held-out batch is evaluated and leaves the parameters as they were; one within it goes on to the loss
    check; a node whose own update is zero (it did not train) has no yardstick and skips the check."""
    # Prepare
    model = build_model(ModelConfig(d_model=16, context=8), seed=0)
    outer = OuterState(model, TrainConfig())
    saved = [t.clone() for t in outer.shared_tensors()]
    own = [torch.full_like(p, 1e-3) for p in outer.params]
    evaluations: list[int] = []

    def evaluate() -> float:
        evaluations.append(1)
        return 2.0

    gate = LossGate(0.05, evaluate, norm_ratio=3.0)

    # Execute
    poisoned = gate.step(outer, [torch.full_like(p, 3.1e-3) for p in outer.params], round_no=1, own=own)
    evaluated_after_poison = len(evaluations)
    unchanged = all(torch.equal(a, b) for a, b in zip(saved, outer.shared_tensors(), strict=True))
    within = gate.step(outer, [torch.full_like(p, 2.9e-3) for p in outer.params], round_no=2, own=own)
    idle = gate.step(outer, [torch.full_like(p, 1.0) for p in outer.params], round_no=3, own=[t * 0 for t in own])

    # Assert
    assert (poisoned, within) == (RoundOutcome.REJECTED, RoundOutcome.GROUP)
    assert evaluated_after_poison == 0 and unchanged
    assert idle is RoundOutcome.GROUP  # no yardstick: only the loss check (here 2.0 -> 2.0) judges it
    assert gate.rejected == 1


def test_gate_norm_ratio_is_checked_in_the_config_and_its_default_keeps_the_run_hash() -> None:
    """Runs from before the norm check keep their hash (checkpoints resume); another ratio is another run."""
    with pytest.raises(ConfigError, match=r"aggregation.gate_norm_ratio must be 0 \(no check\) or in \[1, 1e6\]"):
        load_node_config(None, {"run.aggregation.gate_norm_ratio": 0.5})
    default = load_node_config(None, {}).run
    other = load_node_config(None, {"run.aggregation.gate_norm_ratio": 0.0}).run
    assert "gate_norm_ratio" not in default.shared_dict()["aggregation"]
    assert default.digest() != other.digest()


def test_a_mean_that_does_worse_than_our_own_update_alone_is_rejected() -> None:
    """The own-update check: a step that lowers the loss, but leaves it more than ``own_tolerance`` above what
    our own update alone would, is undone (a member sending minus its update slows the group that way); one within
    it is applied as the group's step, not ours."""
    # Prepare
    model = build_model(ModelConfig(d_model=16, context=8), seed=0)
    outer = OuterState(model, TrainConfig(outer_lr=0.7, outer_momentum=0.9))
    twin = OuterState(
        build_model(ModelConfig(d_model=16, context=8), seed=0), TrainConfig(outer_lr=0.7, outer_momentum=0.9)
    )
    saved = [t.clone() for t in outer.shared_tensors()]
    own = [torch.full_like(p, 1e-3) for p in outer.params]
    mean = [torch.full_like(p, 2e-4) for p in outer.params]
    # before; then (group step, own alone) for each round: 1.95 > 1.80 x 1.03, then 1.84 <= 1.854
    losses = iter([2.0, 1.95, 1.80, 1.84, 1.80])
    gate = LossGate(0.05, lambda: next(losses), norm_ratio=4.0, own_tolerance=0.03)

    # Execute
    slowed = gate.step(outer, mean, round_no=1, own=own)
    unchanged = all(torch.equal(a, b) for a, b in zip(saved, outer.shared_tensors(), strict=True))
    within = gate.step(outer, mean, round_no=2, own=own)
    twin.step(mean)

    # Assert
    assert (slowed, within) == (RoundOutcome.REJECTED, RoundOutcome.GROUP)
    assert unchanged and gate.rejected == 1
    assert all(torch.equal(a, b) for a, b in zip(twin.shared_tensors(), outer.shared_tensors(), strict=True))


def test_gate_own_tolerance_is_checked_and_its_default_keeps_the_run_hash() -> None:
    with pytest.raises(ConfigError, match=r"aggregation.gate_own_tolerance must be in \[0, 10\]"):
        load_node_config(None, {"run.aggregation.gate_own_tolerance": -0.01})
    default = load_node_config(None, {}).run
    assert "gate_own_tolerance" not in default.shared_dict()["aggregation"]
    assert default.digest() != load_node_config(None, {"run.aggregation.gate_own_tolerance": 0.03}).run.digest()
    assert LossGate.for_run(default, lambda: 0.0).own_tolerance == 0.0  # opt-in: honest non-IID means can fail it
    chosen = load_node_config(None, {"run.aggregation.gate_own_tolerance": 0.03}).run
    assert LossGate.for_run(chosen, lambda: 0.0).own_tolerance == 0.03
    overlapped = {"run.aggregation.gate_own_tolerance": 0.03, "run.train.overlap": True}
    assert LossGate.for_run(load_node_config(None, overlapped).run, lambda: 0.0).own_tolerance == 0.0


def test_rises_each_under_the_tolerance_cannot_ratchet_the_loss_up() -> None:
    """The reference is the best loss of the steps applied in a row: +4% then +2.9% is +7% over that best,
    so a 5% gate applies the first and rejects the second (a gate on the last loss took both). A change of
    the parameters outside the gate (a merge, a round alone) restarts the reference from its loss."""
    model = build_model(ModelConfig(d_model=16, context=8), seed=0)
    outer = OuterState(model, TrainConfig())
    losses = iter([2.08, 2.14, 2.2])  # after each candidate step
    gate = LossGate(0.05, lambda: next(losses))
    gate.remember(2.0)
    step = [torch.full_like(p, 1e-3) for p in outer.params]

    first = gate.step(outer, step, round_no=1)
    gate.remember(2.08)  # the report's loss of the applied step: no change outside the gate
    second = gate.step(outer, step, round_no=2)
    gate.remember(2.1)  # e.g. the node's own update alone after the rejection
    third = gate.step(outer, step, round_no=3)

    assert (first, second, third) == (RoundOutcome.GROUP, RoundOutcome.REJECTED, RoundOutcome.GROUP)
    assert gate.reference() == 2.1


def test_the_report_reuses_the_gates_evaluation_only_while_the_parameters_are_unchanged() -> None:
    """An applied step's loss is the report's (no second evaluation); after any change it is evaluated again."""
    # Prepare
    model = build_model(ModelConfig(d_model=16, context=8), seed=0)
    outer = OuterState(model, TrainConfig())
    calls: list[float] = []
    losses = iter([2.0, 1.9, 1.8])

    def evaluate() -> float:
        calls.append(next(losses))
        return calls[-1]

    gate = LossGate(0.05, evaluate)
    gate.step(outer, [torch.full_like(p, 1e-3) for p in outer.params], round_no=1)  # evaluates before and after

    # Execute
    applied = gate.loss_at(outer.digest())
    outer.step([torch.full_like(p, 1e-3) for p in outer.params])  # e.g. a lineage merge: the parameters move
    moved = gate.loss_at(outer.digest())

    # Assert
    assert (applied, moved) == (1.9, 1.8)
    assert calls == [2.0, 1.9, 1.8]


def test_the_held_out_evaluation_is_the_same_twice_under_dropout() -> None:
    """With dropout in the model (``lora.dropout``) the held-out loss is evaluated without it: two evaluations of
    the same parameters agree, so the gate compares parameters, not dropout masks; the training mode comes back."""

    class Dropped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear, self.dropout = torch.nn.Linear(8, 8), torch.nn.Dropout(0.5)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.mse_loss(self.linear(self.dropout(x)), y)

    torch.manual_seed(0)
    model = Dropped().train()
    batches = [(torch.randn(4, 8), torch.randn(4, 8)) for _ in range(4)]
    params = [p.detach().clone() for p in model.parameters()]

    first, second = (evaluate(model, params, batches, torch.device("cpu")) for _ in range(2))

    assert first == second
    assert model.training


@pytest.mark.slow
@pytest.mark.parametrize(
    ("deviation", "reason"),
    [
        ("poison-mean", "rejected the group's mean"),
        # -3x its own update: the mean shrinks and the loss barely moves (under the loss check's 20%), far
        # behind what our own update alone does: the own-update check refuses it
        ("flip-update", "over our own update alone"),
    ],
)
def test_honest_nodes_reject_a_poisoned_mean_and_keep_learning(
    tmp_path: Path, bootstrap_maddr: str, deviation: str, reason: str
) -> None:
    """A peer that pulls every coordinate of the mean to the clip bound (inside bounds.py's ranges), or sends
    minus three times its update, is gated: honest nodes report ``rejected`` rounds, name the reason in their
    logs, and their loss falls."""
    # Prepare
    rounds = 3
    config = write_run_config(
        tmp_path / "run.toml",
        run_id="gate",
        aggregation={"matchmaking_time": 1.0, "gate_tolerance": 0.2, "gate_own_tolerance": 0.03},
    )
    corpus = generate_corpus(3 * 20_000, seed=5)
    args = ("--rounds", str(rounds), "--min-peers", "3")
    honest = NodeProcess.on_slices(tmp_path, config, bootstrap_maddr, corpus, 2, *args)
    program = [*POISON_MEAN[:2], deviation]
    poisoner = NodeProcess(tmp_path, "poisoner", config, bootstrap_maddr, corpus[40_000:], *args, program=program)

    # Execute
    try:
        codes = [node.wait(timeout=180) for node in honest]
    finally:
        for node in [*honest, poisoner]:
            node.stop()

    # Assert
    assert codes == [0, 0], [node.tail() for node in honest]
    assert "deviant: sending" in poisoner.output(), poisoner.tail()  # the attack ran (not an honest node)
    for node in honest:
        reports = node.reports()
        trained = [r for r in reports if r["mode"] not in ("initial", "loaded")]
        assert [r["mode"] for r in trained] == ["rejected"] * rounds, node.tail()
        assert all(r["group_size"] == 3 for r in trained)
        assert trained[-1]["eval_loss"] < reports[0]["eval_loss"] - 0.1, reports
        assert "rejected the group's mean" in node.output() and reason in node.output()
        assert "Traceback" not in node.output()


@pytest.mark.parametrize(
    ("overrides", "expected", "norm_ratio"),
    [
        ({}, 0.05, 4.0),
        ({"run.train.overlap": True}, 0.0, 4.0),  # a stale mean raises the loss, not the norm
        ({"run.privacy.enabled": True, "run.privacy.level": "user", "run.privacy.noise_multiplier": 1.0}, 0.0, 0.0),
        ({"run.privacy.enabled": True, "run.privacy.target_epsilon": 8.0}, 0.05, 4.0),
        ({"run.train.round_seconds": 30.0}, 0.05, 4.0),  # phases end on time: scaled to a whole phase (below)
    ],
)
def test_the_gate_is_off_where_honest_means_raise_the_loss(
    overrides: dict[str, object], expected: float, norm_ratio: float
) -> None:
    """The loss check is on by default and with record-level DP; off in the overlapped loop and with user-level DP.
    The norm check is off with user-level DP, whose noise makes honest means large; where phases end on time it
    measures our own update against a whole phase of ``inner_steps``."""
    run = load_node_config(None, overrides).run
    gate = LossGate.for_run(run, lambda: 1.0)
    assert (gate.tolerance, gate.norm_ratio) == (expected, norm_ratio)
    assert gate.phase_steps == (run.train.inner_steps if run.train.round_seconds else 0)


def test_where_phases_end_on_time_a_short_phase_is_scaled_to_a_whole_one_before_the_norm_check() -> None:
    """A slow peer whose phase was cut to 2 of 10 steps does not reject an honest mean of the others' whole phases
    (3x its own update's norm, within 4 x 10/2), and still rejects one over that bound (25x); a 5x mean against a
    whole phase of ours is rejected, as without ``round_seconds``."""
    model = build_model(ModelConfig(d_model=16, context=8), seed=0)
    outer = OuterState(model, TrainConfig())
    own = [torch.full_like(p, 1e-3) for p in outer.params]
    gate = LossGate(0.0, lambda: pytest.fail("the norm-only gate evaluated a mean"), norm_ratio=4.0, phase_steps=10)

    def mean(times: float) -> list[torch.Tensor]:
        return [torch.full_like(p, times * 1e-3) for p in outer.params]

    honest = gate.step(outer, mean(3.0), round_no=1, own=own, own_steps=2)
    poisoned = gate.step(outer, mean(25.0), round_no=2, own=own, own_steps=2)
    whole_phase = gate.step(outer, mean(5.0), round_no=3, own=own, own_steps=10)
    assert (honest, poisoned, whole_phase) == (RoundOutcome.GROUP, RoundOutcome.REJECTED, RoundOutcome.REJECTED)


def test_the_overlapped_loops_gate_checks_the_norm_alone() -> None:
    """With the loss check off (``tolerance`` 0) a mean over the norm ratio is still rejected, and one within it
    is applied; neither is evaluated."""
    model = build_model(ModelConfig(d_model=16, context=8), seed=0)
    outer = OuterState(model, TrainConfig())
    own = [torch.full_like(p, 1e-3) for p in outer.params]
    gate = LossGate(0.0, lambda: pytest.fail("the overlapped loop's gate evaluated a mean"), norm_ratio=4.0)

    poisoned = gate.step(outer, [torch.ones_like(p) for p in outer.params], round_no=1, own=own)
    honest = gate.step(outer, [torch.full_like(p, 2e-3) for p in outer.params], round_no=2, own=own)

    assert (poisoned, honest) == (RoundOutcome.REJECTED, RoundOutcome.GROUP)

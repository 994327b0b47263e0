"""The held-out loss gate: a group's mean is applied only if it does not wreck this node's held-out loss.

Why a gate: bounds.py refuses any group sum that no honest group can produce, but within those
bounds one contributor may still pull each coordinate of the mean anywhere in ``[-B, B]``
(``aggregation.clip_bound``), which is orders of magnitude beyond an honest update. Masking hides
who did it, so nothing in the sum names the culprit; what every member can still check is the
effect. Before the outer step lands, the node evaluates the global parameters the step would make
on its fixed held-out batches (the ones its reports already use) and compares them with the best
loss of the steps it applied in a row (up to the last ``GATE_WINDOW``): if the loss would be more
than ``aggregation.gate_tolerance`` (a fraction) above it, the step is rolled back, the round is
reported as ``rejected`` and the node applies its own update alone, as a round without a group
would (trainer.py). The reference is the best recent loss, not the last one, so a poisoner cannot
ratchet the loss up by rises each under the tolerance; it restarts from the current loss whenever
the global parameters change other than by a gated step (a lineage merge, a resync, a round alone).

Why this is safe for honest runs: secure aggregation keeps every member's global parameters
bit-identical only if all of them apply the same mean, so an honest mean must pass everywhere. The
comparison is paired (the same batches before and after, no sampling noise between the two), and
an honest DiLoCo step moves the global parameters to the mean of models that each just lowered
their own loss: measured on the training tests' swarms, an honest step lowers the held-out loss or
raises it by well under 1%: on the 4-peer tinyshakespeare swarm of benchmarks/efficiency.py (200
rounds, 800 gated steps) at most 1.1% over the last loss and 1.5% over the best of the last 50. But
not always: in the overlapped loop's test (tests/test_overlap.py,
local models far ahead of the stale global) honest means raised it by 20-21% on every member, and a
5% gate rejected them (the gate is off there, below). A mean poisoned within the bounds by one member
of three raised it by 30% in its first round and 78-140% after (tests/test_loss_gate.py); one member
of four, by 15% a round, and one of six by 2.5-4% a round, which a 50% gate (the previous default) let
through every round until the held-out loss was 2.6x (4 peers) and 1.8x (6 peers) an honest run's
(benchmarks/integrity_swarm.py). The default 5% over the best recent loss stops both (BENCHMARKS.md).
What the gate cannot stop: a poisoner that keeps the loss within the tolerance of its best (its harm
is then bounded by it), and a rejection leaves this node's global parameters apart from those of the
members that accepted until a lineage merge (node/training/lineage.py).
First, without an evaluation, the norm check: a mean whose L2 norm is over ``aggregation.gate_norm_ratio``
(default 4) times this node's own update's is not applied either. An honest mean is a weighted average of
updates that AdamW makes alike in size (the same learning rate and steps on every peer), so its norm is at
most about its largest input's; non-IID inputs cancel and shrink it. Measured: 0.48-1.27x over 920 honest
means (the 4-peer efficiency benchmark and the 6-peer integrity one); the poisoner of six made 12-88x, so its
first round, which the loss check let through at +2.5%, is rejected too. A poisoner that scales itself under
the ratio is left to the loss check, and its pull on the mean is bounded by the ratio, not by the clip bound.
Last, opt-in, the own-update check (``aggregation.gate_own_tolerance``, 0 = off, the default; it needs the loss
check on): the node also evaluates the global parameters its own update alone would make, the round's fallback,
and does not apply a mean whose step leaves the held-out loss more than that fraction above them. It catches what
the two checks above let through by design: a member that sends minus a few times its own update shrinks the mean
(under the norm ratio) and slows the group (the step still lowers the loss): one such member of six cost the
honest members 20-22% of held-out loss over 20 rounds with every step accepted. On tinyshakespeare's contiguous
slices at H = 5 honest steps were at most +1.9% over our own update alone (800 steps; median -3.3%) and that
member's groups +4.8% median, so 3% separates them there; but on more different data or longer phases a member's
own update fits its own held-out split better than any group's mean: honest means were +4.1% and +5.3% in
tests/test_training.py's 3-node swarm (H = 24, generated text), and rejecting them parts the members. So it is
off unless a run whose members' data are alike turns it on. It costs one more evaluation per gated round.
Where phases end on time (``train.round_seconds``) a slow peer's update is smaller than the others' by its share
of their steps, so the norm check first scales our own update's norm up to a whole phase (``inner_steps`` over
the steps we took, as if each step had moved as far as ours did on average). With user-level DP the gate is off,
both checks: a noisy mean raises the held-out loss and its norm by design, and honest members would reject it.
In the overlapped loop (``train.overlap``) the loss check is off: a mean lands a phase late, on local models
that kept training, and honest means raised the loss by 20% to over 50% there (two fresh-clone CI runs of
tests/test_overlap.py), so no tolerance separates them from a poisoner's. The norm check stays on there: the
mean and our own update are of the same phase (honest ratios 0.43-1.25 over 800 overlapped means of the 4-peer
efficiency benchmark).
Sharded trainers' parts pass the same norm check (node/sharding/fronts.py; honest 0.59-1.05 over 120 means of
benchmarks/sharded_fronts.py).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from node.config import RunConfig
from node.training.outer import OuterState
from node.training.report import RoundOutcome

logger = logging.getLogger(__name__)

GATE_WINDOW = 50  # the applied steps in a row whose best held-out loss is the gate's reference


def norm_ratio_for(run: RunConfig) -> float:
    """The run's norm check: ``aggregation.gate_norm_ratio``, but off with user-level DP (noisy means are large by
    design)."""
    return 0.0 if _user_dp(run) else run.aggregation.gate_norm_ratio


def _user_dp(run: RunConfig) -> bool:
    """Whether the run adds DP noise to each node's whole update (its means are noisy by design)."""
    return run.privacy.enabled and run.privacy.level == "user"


def l2_norm(tensors: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors))


def norm_admits(mean_norm: float, own_norm: float, bound: float, round_no: int, what: str, instead: str) -> bool:
    """The norm check: whether ``what`` (a mean, of L2 norm ``mean_norm``) is within ``bound`` times our own update's
    norm ``own_norm`` (0: no check; a node that did not train has no yardstick). Logs the ratio every round, and a
    rejection (with ``instead``: what the node does then) as a warning."""
    ratio = mean_norm / own_norm if own_norm > 0 else math.inf
    logger.info(f"round {round_no}: {what} has norm {mean_norm:.4g}, {ratio:.3f} x our own update's")
    if bound == 0 or own_norm == 0 or ratio <= bound:
        return True
    logger.warning(
        f"round {round_no}: rejected {what}: its norm {mean_norm:.4g} is {ratio:.1f} x our own update's "
        f"(aggregation.gate_norm_ratio = {bound:g}); {instead}"
    )
    return False


def admits(before: float, after: float, tolerance: float) -> bool:
    """Whether moving the held-out loss from ``before`` to ``after`` passes a gate of ``tolerance`` (0: off)."""
    if tolerance == 0:
        return True
    if not math.isfinite(after):
        return False
    return not math.isfinite(before) or after <= before * (1.0 + tolerance)


class LossGate:
    """Applies a group's mean as an outer step only if the held-out loss rises by at most ``tolerance``.

    Args:
        tolerance: the largest relative rise of the held-out loss an outer step may cause; 0 disables the gate.
        evaluate: the held-out loss of the global parameters as they are now.
        norm_ratio: the largest L2 norm of a mean, in units of this node's own update's (0: no such check).
        own_tolerance: the largest relative excess of the held-out loss after the step over the loss after our own
            update alone (0: no such check, the run's default; it needs ``tolerance`` on, and ``own`` in ``step``).
        phase_steps: where phases end on time (``train.round_seconds``), a whole phase's steps: our own update's
            norm is scaled by ``phase_steps`` over the steps behind it before the norm check (0: no scaling).
    """

    def __init__(
        self,
        tolerance: float,
        evaluate: Callable[[], float],
        norm_ratio: float = 0.0,
        own_tolerance: float = 0.0,
        phase_steps: int = 0,
    ):
        self.tolerance, self.norm_ratio, self.own_tolerance = tolerance, norm_ratio, own_tolerance
        self.phase_steps = phase_steps
        self._evaluate = evaluate
        self._current: float | None = None  # the held-out loss of the global parameters, if known (``remember``)
        self._recent: deque[float] = deque(maxlen=GATE_WINDOW)  # losses since the last change outside the gate
        self._evaluated: tuple[bytes, float] | None = None  # the digest of the parameters last evaluated, and loss
        self.rejected = 0  # rounds refused so far

    @classmethod
    def for_run(cls, run: RunConfig, evaluate: Callable[[], float]) -> LossGate:
        """The run's gate: ``aggregation.gate_tolerance``, but off with user-level DP, whose noisy means raise
        the held-out loss by design (measured: +114% to +469% on tests/test_privacy.py's honest swarm), and off
        in the overlapped loop, whose means land a phase late on local models that kept training (measured:
        honest means raised the loss by 20% to over 50% in tests/test_overlap.py, and the gate parted members)."""
        tolerance = 0.0 if _user_dp(run) or run.train.overlap else run.aggregation.gate_tolerance
        own_tolerance = run.aggregation.gate_own_tolerance if tolerance else 0.0
        phase_steps = run.train.inner_steps if run.train.round_seconds > 0 else 0
        return cls(tolerance, evaluate, norm_ratio_for(run), own_tolerance, phase_steps)  # overlapped: norm only

    def remember(self, loss: float) -> float:
        """Note ``loss`` as the held-out loss of the global parameters as they now are; returns it. A loss
        other than the last gated step's means they changed outside the gate: the reference restarts."""
        if not self._recent or self._recent[-1] != loss:
            self._recent.clear()
            self._recent.append(loss)
        self._current = loss
        return loss

    def loss_at(self, digest: bytes) -> float:
        """The held-out loss of the global parameters whose ``outer.digest()`` is ``digest``: the gate's own
        evaluation of them if it made one (an applied step not changed since), else a fresh one."""
        if self._evaluated is not None and self._evaluated[0] == digest:
            return self._evaluated[1]
        return self._evaluate()

    def reference(self) -> float | None:
        """The loss a step is compared with: the best since the last change outside the gate (None: unknown)."""
        finite = [x for x in self._recent if math.isfinite(x)]
        return min(finite) if finite else self._current

    def step(
        self,
        outer: OuterState,
        mean: list[torch.Tensor],
        round_no: int,
        own: list[torch.Tensor] | None = None,
        own_steps: int = 0,
    ) -> RoundOutcome:
        """The outer step with the group's ``mean``, kept if it passes the gate; ``own``: our own update in it, from
        ``own_steps`` inner steps (used with ``phase_steps``).

        Returns:
            ``GROUP`` if the step was applied, ``REJECTED`` if it was not (``outer`` is then as before).
        """
        scale = self.phase_steps / own_steps if self.phase_steps > own_steps > 0 else 1.0  # a phase cut short
        instead = "applying our own update alone"
        if own is not None and not norm_admits(
            l2_norm(mean), l2_norm(own) * scale, self.norm_ratio, round_no, "the group's mean", instead
        ):
            self.rejected += 1
            return RoundOutcome.REJECTED
        if self.tolerance == 0:
            outer.step(mean)
            return RoundOutcome.GROUP
        if self._current is None:
            self.remember(self._evaluate())
        before = self.reference()
        assert before is not None
        saved = outer.save()
        outer.step(mean)
        after = self._evaluate()
        self._evaluated = (outer.digest(), after)
        if not admits(before, after, self.tolerance):
            why = f"{after / before - 1:+.1%} over the best recent {before:.4f} (aggregation.gate_tolerance = "
            return self._reject(outer, saved, round_no, after, f"{why}{self.tolerance:.1%})")
        alone = self._alone(outer, saved, own, round_no) if own is not None and self.own_tolerance else math.nan
        if math.isfinite(alone) and not after <= alone * (1.0 + self.own_tolerance):
            why = f"{after / alone - 1:+.1%} over our own update alone ({alone:.4f}; aggregation.gate_own_tolerance = "
            return self._reject(outer, saved, round_no, after, f"{why}{self.own_tolerance:.1%})")
        self._current = after
        self._recent.append(after)
        return RoundOutcome.GROUP

    def _alone(self, outer: OuterState, saved: tuple[Any, Any], own: list[torch.Tensor], round_no: int) -> float:
        """The held-out loss our own update alone would give (``outer`` is left with the group's step applied)."""
        group = outer.save()
        outer.restore(saved)
        outer.step(own)
        alone = self._evaluate()
        outer.restore(group)
        logger.info(f"round {round_no}: our own update alone would take the held-out loss to {alone:.4f}")
        return alone

    def _reject(self, outer: OuterState, saved: tuple[Any, Any], round_no: int, after: float, why: str) -> RoundOutcome:
        """Undo the group's step (``outer`` back to ``saved``) and log why its mean was not applied."""
        outer.restore(saved)
        self.rejected += 1
        logger.warning(
            f"round {round_no}: rejected the group's mean: its outer step takes the held-out loss to {after:.4f}, "
            f"{why}; applying our own update alone"
        )
        return RoundOutcome.REJECTED

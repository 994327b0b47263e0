"""User-level differential privacy that composes with secure aggregation.

Each round a node clips its pseudo-gradient to L2 norm C and adds, inside the integer ring and
before masking, its share of the noise: a Gaussian sample rounded to an integer. Shares are sized
so that any ``n - t`` of the ``n`` peers of a group together carry noise of standard deviation
``sigma * C``: if up to ``t`` peers drop out or collude (subtracting their own shares), the
aggregate is still the Gaussian mechanism with multiplier ``sigma``. A round whose contributor set
is smaller than ``n - t`` aborts before anything is revealed (``NoiseShare.contributors_needed``).
The noise lives in the integers, so quantization never touches it.

The budget is tracked with Google's ``dp-accounting``: the privacy loss distribution (PLD)
accountant gives the epsilon the node reports and stops at; the RDP accountant is kept as a
cross-check.

What counts as a release: a round counts once this node's noised, masked parts leave it (the
"parts" phase of the masked all-reduce), whatever happens after. Once they are out, a group that
reaches the reveal phase can unmask the sum even if the round then fails for us (a peer that holds
every partial sum may fail it with a bad ``sum`` of its own), so counting only rounds that decoded
would miss releases. The ``ReleaseLedger`` (shared memory between the trainer and its averager
process) makes the accounting exact and bounded: the trainer grants one permit per round it may
spend budget on; a session without a permit stops at its "keys" phase, before anything of ours
leaves (``ReleaseRefused``, which hivemind does not retry), and each "parts" phase takes the permit
and counts one release. So hivemind's retry of a failed step on the same tensors (fresh noise, a
second noisy copy) cannot run once the first attempt released: at most one release per granted
round, and the accountant counts every one (``PrivacyAccountant.sync``). A round that fails after
its parts went out is counted although its sum may never have been formed: the count is an upper
bound on what was released, never below it.

With cohorts a round runs up to two rings (node/aggregation/hierarchy.py): the cohort ring, and
every ``global_every`` rounds the cross-cohort ring. Each is its own secure all-reduce with its own
noise share (``NoiseShare.ring`` names it), and each release is its own accounting event: the
ledger then has one slot per ring, and a round's permit allows as many releases as the budget
still fits (at most one per ring, taken in the order the rings run), so a retry inside one ring
cannot spend the other ring's release and the count stays exact.

Gaps, stated plainly:
- Accounting treats each round as a Gaussian mechanism with multiplier
  ``sigma * C * s / (C * s + sqrt(d))``: stochastic rounding can add up to ``sqrt(d)`` (ring
  units) to the L2 norm of the encoded update, so the sensitivity is inflated by that much.
- The shares are rounded Gaussians (standard deviation about 1e7 ring units), and their sum is
  accounted as a continuous Gaussian. At this scale a rounded Gaussian is very close to a
  discrete Gaussian, and sums of discrete Gaussians are close to a discrete Gaussian (Kairouz,
  Liu, Steinke 2021), but we have not proven the (tiny) gap. Skellam noise (closed under
  addition) was the first choice; numpy's Poisson sampler is off by 12% in variance at the
  lambda of about 4e14 it would need here (measured), so it was dropped.
- The weight word (the node's samples this round, scaled into (0, 1]) is summed without noise:
  the group learns the total weight, not who brought how much.
- The noise generator is numpy's PCG64 seeded from the OS; its output is masked before it
  leaves the node, but it is not a cryptographic generator.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    import dp_accounting

VALUE_DISCRETIZATION = 1e-3  # PLD grid: epsilon to about 1e-3, a fraction of a second per evaluation


class ReleaseRefused(Exception):
    """A DP session had no permit to release this node's update: it ends before sending anything.

    Deliberately not a SecAggError (nor one of hivemind's retried errors): hivemind must not retry
    the step on the same tensors, which would release another noisy copy.
    """


class ReleaseLedger:
    """Permits and releases of this node's noised update, in memory shared with the averager processes.

    The trainer sets ``permit(n)`` before a round (``n`` releases the budget still fits, at most one per
    ring; ``permit(0)``: none); each masked all-reduce calls ``NoiseShare.at_phase``, which checks its ring's
    permit at "keys" and takes it at "parts" (one release). ``released`` counts every release since the
    ledger was made, over all rings.

    Args:
        rings: the secure all-reduces a round may run, each releasing at most once (1; 2 with cohorts).
    """

    def __init__(self, rings: int = 1) -> None:
        if rings < 1:
            raise ValueError(f"a release ledger needs at least one ring, got {rings}")
        self.rings = rings
        self._permits = mp.Value("i", 0)  # releases this round may still make, over all rings
        self._done = mp.Array("b", rings, lock=False)  # 1: this ring released this round (guarded by _permits)
        self._released = mp.Value("i", 0)

    def permit(self, count: int) -> None:
        """Allow this round ``count`` releases in all, one per ring at most (replacing whatever the last round
        left unused: a round never inherits a permit)."""
        with self._permits.get_lock():
            self._permits.value = count
            for ring in range(self.rings):
                self._done[ring] = 0

    @property
    def permits(self) -> int:
        return int(self._permits.value)

    @property
    def released(self) -> int:
        return int(self._released.value)

    def check(self, ring: int = 0) -> None:
        """ReleaseRefused unless ``ring`` may still release this round (a session's first phase)."""
        with self._permits.get_lock():
            self._refuse_unless_permitted(ring)

    def take(self, ring: int = 0) -> None:
        """Use ``ring``'s permit and count one release (our noised parts are about to leave)."""
        with self._permits.get_lock():
            self._refuse_unless_permitted(ring)
            self._permits.value -= 1
            self._done[ring] = 1
            with self._released.get_lock():
                self._released.value += 1

    def _refuse_unless_permitted(self, ring: int) -> None:
        if not 0 <= ring < self.rings:
            raise ReleaseRefused(f"no ring {ring} in this release ledger (it has {self.rings})")
        if self._permits.value <= 0 or self._done[ring]:
            raise ReleaseRefused("no DP release permitted for this round (already released, or budget spent)")


@dataclass(frozen=True)
class NoiseShare:
    """What one peer adds to its encoded update: its share of the group's DP noise."""

    noise_multiplier: float  # sigma
    clip_norm: float  # C
    max_dropouts: int  # t: the noise survives this many peers dropping or colluding
    ledger: ReleaseLedger | None = field(default=None, compare=False, repr=False)  # None: releases not gated
    ring: int = 0  # the ledger's slot this share releases under (with cohorts: 0 the cohort ring, 1 cross-cohort)

    def at_phase(self, phase: str) -> None:
        """The masked all-reduce's hook at each phase: the ring's permit checked at "keys", taken at "parts"."""
        if self.ledger is None:
            return
        if phase == "keys":
            self.ledger.check(self.ring)
        elif phase == "parts":
            self.ledger.take(self.ring)

    def contributors_needed(self, group_size: int) -> int:
        """The fewest shares that together carry the full sigma * C: the smallest U a round may accept.

        Shares are sized for ``group_size - max_dropouts`` contributors, so a smaller U would carry
        less noise than the accountant records; the masked all-reduce aborts such a round before
        anything is revealed (``max_dropouts`` covers dropouts and colluders inside U together).
        """
        return max(1, group_size - self.max_dropouts)

    def std(self, group_size: int) -> float:
        """This peer's share, in value units, for a group of ``group_size``."""
        return self.noise_multiplier * self.clip_norm / math.sqrt(self.contributors_needed(group_size))

    def add_to(self, words: np.ndarray, group_size: int, scale: float) -> None:
        """Add rounded Gaussian noise of this share's standard deviation (times ``scale``) to ring words."""
        rng = np.random.Generator(np.random.PCG64(int.from_bytes(os.urandom(16), "little")))
        noise = np.rint(rng.normal(0.0, self.std(group_size) * scale, words.size)).astype(np.int64)
        words += noise.astype(np.uint32)  # two's complement: a negative draw wraps to its ring element


def mean_noise_ratio(noise_multiplier: float, dimension: int, group_size: int, max_dropouts: int) -> float:
    """Expected L2 norm of the DP noise on a group's mean over the clipped update bound C.

    Every one of the ``n`` peers adds a share of std ``sigma * C / sqrt(n - t)`` per coordinate
    (``NoiseShare.std``), so the sum carries ``sigma * C * sqrt(n / (n - t))`` and the mean (weights
    1: every peer brings a full round) ``sigma * C * sqrt(n / (n - t)) / n`` per coordinate; over
    ``d`` coordinates its RMS norm is ``sqrt(d)`` times that, against a mean update of norm <= C:
    ``ratio = sigma * sqrt(d) * sqrt(n / (n - t)) / n`` (about ``sigma * sqrt(d) / n``). A round that
    decodes with only ``n - t`` contributors carries ``sigma * C`` over ``n - t``: ratio
    ``sigma * sqrt(d) / (n - t)``, worse; lighter weights (omega < 1) make it worse still.
    """
    needed = max(1, group_size - max_dropouts)  # NoiseShare.contributors_needed
    return noise_multiplier * math.sqrt(dimension * group_size / needed) / group_size


def group_size_floor(noise_multiplier: float, dimension: int, max_dropouts: int, ratio: float = 1.0) -> int:
    """The smallest group whose mean's noise is at most ``ratio`` times the clipped signal (``mean_noise_ratio``).

    ``n (n - t) >= (sigma / ratio)**2 d``, so ``n = ceil(t / 2 + sqrt(t**2 / 4 + (sigma / ratio)**2 d))``,
    about ``sigma * sqrt(d) + t / 2``.
    """
    target = (noise_multiplier / ratio) ** 2 * dimension
    n = max(1, math.ceil(max_dropouts / 2 + math.sqrt(max_dropouts**2 / 4 + target)))
    while n > 1 and mean_noise_ratio(noise_multiplier, dimension, n - 1, max_dropouts) <= ratio:
        n -= 1  # float rounding, and the n <= t regime (one full share each)
    while mean_noise_ratio(noise_multiplier, dimension, n, max_dropouts) > ratio:
        n += 1
    return n


def clip_update(tensors: Sequence[torch.Tensor], clip_norm: float) -> float:
    """Scale ``tensors`` in place so their joint L2 norm is at most ``clip_norm``; returns the norm before."""
    norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))
    if norm > clip_norm:
        for tensor in tensors:
            tensor.mul_(clip_norm / norm)
    return norm


# dp-accounting is imported where it is used: it costs 0.6 s at start-up, and only DP runs need it.


def gaussian_rounds(noise_multiplier: float, rounds: int) -> dp_accounting.DpEvent:
    import dp_accounting

    return dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(noise_multiplier), rounds)


def pld_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Epsilon of ``rounds`` Gaussian mechanisms with this multiplier (PLD accountant)."""
    if rounds == 0:
        return 0.0
    from dp_accounting.pld import pld_privacy_accountant

    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=VALUE_DISCRETIZATION)
    accountant.compose(gaussian_rounds(noise_multiplier, rounds))
    return float(accountant.get_epsilon(delta))


def rdp_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """The same with the RDP accountant (a looser cross-check)."""
    if rounds == 0:
        return 0.0
    from dp_accounting.rdp import rdp_privacy_accountant

    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(gaussian_rounds(noise_multiplier, rounds))
    return float(accountant.get_epsilon(delta))


def calibrate_noise_multiplier(target_epsilon: float, delta: float, rounds: int) -> float:
    """The smallest multiplier whose ``rounds`` compositions stay within ``target_epsilon`` (PLD)."""
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    sigma = dp_accounting.calibrate_dp_mechanism(
        lambda: pld_privacy_accountant.PLDAccountant(value_discretization_interval=VALUE_DISCRETIZATION),
        lambda s: gaussian_rounds(s, rounds),
        target_epsilon,
        delta,
        bracket_interval=dp_accounting.ExplicitBracketInterval(0.3, 500.0),  # below 0.3 the PLD grid explodes
    )
    return float(sigma)


def effective_multiplier(noise_multiplier: float, clip_norm: float, scale: float, dimension: int) -> float:
    """The multiplier to account with once rounding's worst-case L2 growth is added to the sensitivity."""
    return noise_multiplier * clip_norm * scale / (clip_norm * scale + math.sqrt(dimension))


class PrivacyAccountant:
    """One node's budget: the releases it made, epsilon spent, and whether it may send again.

    Every release is one Gaussian mechanism, and ``rounds`` counts releases, not outer rounds: with cohorts
    a round releases once per ring that ran (the cohort ring, and on cross-cohort rounds the run-wide one).

    Args:
        noise_multiplier: the multiplier each release is accounted with (``effective_multiplier``).
        delta: the delta of every reported epsilon.
        budget: the epsilon the node may spend; ``math.inf`` for no limit.
        rounds: releases already counted (restored from a checkpoint).
        ledger: the releases the averager counted (``sync`` adds the new ones); None: ``record`` only.
    """

    def __init__(
        self, noise_multiplier: float, delta: float, budget: float, rounds: int = 0, ledger: ReleaseLedger | None = None
    ):
        if noise_multiplier <= 0:
            raise ValueError("the noise multiplier must be > 0")
        self.noise_multiplier, self.delta, self.budget, self.rounds = noise_multiplier, delta, budget, rounds
        self.ledger = ledger
        self._synced = 0  # the ledger's releases already in ``rounds``
        self._cache: dict[int, float] = {}

    def epsilon(self, rounds: int | None = None) -> float:
        """Epsilon (PLD) after ``rounds`` contributions (default: those made so far)."""
        rounds = self.rounds if rounds is None else rounds
        if rounds not in self._cache:
            self._cache[rounds] = pld_epsilon(self.noise_multiplier, rounds, self.delta)
        return self._cache[rounds]

    def rdp_epsilon(self) -> float:
        return rdp_epsilon(self.noise_multiplier, self.rounds, self.delta)

    def can_contribute(self, more: int = 1) -> bool:
        """Whether ``more`` contributions keep epsilon within the budget."""
        return math.isinf(self.budget) or self.epsilon(self.rounds + more) <= self.budget

    def record(self) -> None:
        """Count one release of this node's update."""
        self.rounds += 1

    def sync(self) -> int:
        """Add the releases the ledger counted since the last sync; returns how many."""
        if self.ledger is None:
            return 0
        released = self.ledger.released
        new, self._synced = released - self._synced, released
        self.rounds += new
        return new

    def permit_round(self) -> bool:
        """Before a round: grant the ledger as many releases as the budget still fits, one per ring at most;
        returns whether it granted any."""
        rings = self.ledger.rings if self.ledger is not None else 1
        allowed = 0
        while allowed < rings and self.can_contribute(allowed + 1):
            allowed += 1
        if self.ledger is not None:
            self.ledger.permit(allowed)
        return allowed > 0

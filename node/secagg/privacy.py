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
cross-check. A round counts only if the node's input was in the group's contributor set.

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
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    import dp_accounting

VALUE_DISCRETIZATION = 1e-3  # PLD grid: epsilon to about 1e-3, a fraction of a second per evaluation


@dataclass(frozen=True)
class NoiseShare:
    """What one peer adds to its encoded update: its share of the group's DP noise."""

    noise_multiplier: float  # sigma
    clip_norm: float  # C
    max_dropouts: int  # t: the noise survives this many peers dropping or colluding

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
    """One node's budget: the rounds it contributed to, epsilon spent, and whether it may send again.

    Args:
        noise_multiplier: the multiplier each round is accounted with (``effective_multiplier``).
        delta: the delta of every reported epsilon.
        budget: the epsilon the node may spend; ``math.inf`` for no limit.
        rounds: rounds already contributed (restored from a checkpoint).
    """

    def __init__(self, noise_multiplier: float, delta: float, budget: float, rounds: int = 0):
        if noise_multiplier <= 0:
            raise ValueError("the noise multiplier must be > 0")
        self.noise_multiplier, self.delta, self.budget, self.rounds = noise_multiplier, delta, budget, rounds
        self._cache: dict[int, float] = {}

    def epsilon(self, rounds: int | None = None) -> float:
        """Epsilon (PLD) after ``rounds`` contributions (default: those made so far)."""
        rounds = self.rounds if rounds is None else rounds
        if rounds not in self._cache:
            self._cache[rounds] = pld_epsilon(self.noise_multiplier, rounds, self.delta)
        return self._cache[rounds]

    def rdp_epsilon(self) -> float:
        return rdp_epsilon(self.noise_multiplier, self.rounds, self.delta)

    def can_contribute(self) -> bool:
        """Whether one more contribution keeps epsilon within the budget."""
        return math.isinf(self.budget) or self.epsilon(self.rounds + 1) <= self.budget

    def record(self) -> None:
        """Count one round whose aggregate included this node's update."""
        self.rounds += 1

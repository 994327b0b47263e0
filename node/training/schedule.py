"""The inner learning rate at each inner step of the run: linear warmup, then constant or cosine.

The step is the run's, not the node's: phase ``p`` (the one whose progress is sent as round ``p``)
takes steps ``(p - 1) * inner_steps`` onward, whatever it did before. Every peer of a run derives it
from the round counter they share, so every peer, a late joiner and a resumed node included, follows
the same schedule, and a checkpoint needs nothing beyond its round to continue it. A phase cut short
by ``train.round_seconds`` skips the rest of its steps' learning rates rather than shifting the next
phase's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from node.config import TrainConfig
from node.run_config import LrSchedule

FINAL_RATIO = 0.1  # the cosine schedule ends at this fraction of inner_lr


@dataclass(frozen=True)
class InnerSchedule:
    """The inner learning rate as a function of the run's inner-step count.

    Args:
        base_lr: the peak learning rate (``train.inner_lr``).
        kind: after warmup, "constant" holds ``base_lr``; "cosine" decays it to ``FINAL_RATIO * base_lr``.
        warmup_steps: steps over which the rate rises linearly to ``base_lr``.
        total_steps: the step at which the cosine decay ends (the rate stays at its floor after it).
    """

    base_lr: float
    kind: LrSchedule = "constant"
    warmup_steps: int = 0
    total_steps: int = 0

    @classmethod
    def for_run(cls, train: TrainConfig, rounds: int) -> InnerSchedule:
        """The run's schedule (``rounds``: the node's ``--rounds``, which sizes a cosine without total_steps).

        Raises:
            ConfigError: "cosine" with neither ``train.total_steps`` nor ``rounds``.
        """
        return cls(train.inner_lr, train.lr_schedule, train.warmup_steps, train.schedule_steps(rounds))

    def lr(self, step: int) -> float:
        """The learning rate of inner step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.base_lr
        span = self.total_steps - self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / span) if span > 0 else 1.0
        return self.base_lr * (FINAL_RATIO + (1 - FINAL_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))

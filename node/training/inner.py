"""The inner phase of DiLoCo: local AdamW steps on this node's own batches, and held-out evaluation.

A phase takes up to ``train.inner_steps`` steps and is cut short once ``train.round_seconds`` have
passed (after at least one step), so a slow peer sends fewer samples rather than holding up its
group. What the phase trained is sent later as the pseudo-gradient (outer.py). Between two steps
the trainer may land the previous round's outer update (``between_steps``: the overlapped loop);
each step's learning rate comes from the run's ``InnerSchedule`` (schedule.py). With record-level DP
each step is a DP-SGD step on a Poisson sample of the node's records (``step``: node/training/dpsgd.py)
in place of a plain step on ``batches``, and the privacy budget may cap the phase (``steps``).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence

import torch

from node.config import TrainConfig
from node.data import TokenBatches
from node.training.schedule import InnerSchedule


def inner_phase(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: TokenBatches,
    device: torch.device,
    train: TrainConfig,
    stop_event: threading.Event,
    *,
    schedule: InnerSchedule | None = None,
    first_step: int = 0,
    between_steps: Callable[[int], None] | None = None,
    step: Callable[[], float] | None = None,
    steps: int | None = None,
) -> list[float]:
    """Up to ``inner_steps`` steps, cut short after ``round_seconds`` or when ``stop_event`` is set.

    Args:
        schedule: the learning rate of each step, by the run's step count (None: the optimizer's as is).
        first_step: the run's step count at this phase's first step.
        between_steps: called between two steps with the number taken so far (the trainer lands a ready
            outer round there).
        step: takes one step and returns its loss, in place of a plain step on ``batches`` (DP-SGD).
        steps: the most steps to take (None: ``train.inner_steps``).

    Returns:
        The training loss of each step taken.
    """
    deadline = time.perf_counter() + train.round_seconds if train.round_seconds else math.inf
    losses: list[float] = []
    model.train()
    for index in range(train.inner_steps if steps is None else steps):
        if stop_event.is_set() or (losses and time.perf_counter() >= deadline):
            break
        if losses and between_steps is not None:
            between_steps(len(losses))
        if schedule is not None:
            for group in optimizer.param_groups:
                group["lr"] = schedule.lr(first_step + index)
        losses.append(step() if step is not None else plain_step(model, optimizer, batches, device))
    return losses


def plain_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: TokenBatches, device: torch.device
) -> float:
    """One AdamW step on the next batch; returns its loss."""
    tokens, targets = batches.next()
    loss = model(tokens.to(device), targets.to(device))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def evaluate(
    model: torch.nn.Module,
    params: Sequence[torch.Tensor],
    eval_set: Sequence[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
) -> float:
    """Mean loss of ``params`` (put into ``model`` for the while) on the held-out batches, in eval mode (no dropout,
    e.g. ``lora.dropout``: the gate compares two evaluations, which must differ only by the parameters)."""
    training = model.training
    with torch.no_grad():
        saved = [p.detach().clone() for p in model.parameters()]
        for local, param in zip(model.parameters(), params, strict=True):
            local.copy_(param)
        model.eval()
        try:
            losses = [float(model(x.to(device), y.to(device))) for x, y in eval_set]
        finally:
            model.train(training)
            for local, value in zip(model.parameters(), saved, strict=True):
                local.copy_(value)
    return sum(losses) / len(losses)

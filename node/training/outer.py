"""The outer step of DiLoCo and the staleness rule of the overlapped loop.

One outer round (see docs/architecture.md):

1. ``inner_steps`` AdamW steps (or fewer, if ``round_seconds`` runs out) on the local model.
2. pseudo-gradient = global params - local params - what is already in flight: everything this
   node has trained and not yet sent, so a missed round's progress is carried, not lost.
3. the Aggregator replaces it with the weighted (by samples) mean over a group at this round,
   in a background thread: with ``train.overlap`` the next round's inner steps run meanwhile.
4. when the mean lands, an outer Nesterov step on the global params; the local model moves by
   the same change and drops its own in-flight delta, which the mean now stands for (the
   staleness rule): ``local += (global_new - global_old) + delivered`` (with compression,
   ``delivered`` is only the part of our delta the ring carried; the rest stays in the local
   model: error feedback). With the overlap it lands between two inner steps of the next phase
   as soon as ``InFlight.ready()`` (late by the steps the all-reduce took, not a whole phase), or at
   that phase's end if it is not ready by then; the rule holds at any step, since the local model is then
   ``global_new`` plus the progress since the launch. Without it, it lands at once.
5. checkpoint, report, heartbeat with the new round and state digest.

If no group forms while other trainers are alive, the node waits for one of them to finish the
round and downloads its state (``resync``), keeping its own unsent progress on top of it: the local
model then moves by the global change only. A node alone applies its own delta (``solo``).

With ``[run.cohorts]``, local parameters are never sent: in the state shared with late joiners they
are zeros, and a downloaded state leaves this node's own untouched.

``OuterState`` holds the global parameters and their outer optimizer and applies steps 2 and 4;
``InFlight`` is one round's aggregation between its launch and its landing. The loop that drives
them is TrainingNode (trainer.py).
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Collection, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from node.config import TrainConfig
from node.training.report import RoundOutcome

AggregationOutcome = tuple[RoundOutcome, Any]  # the outcome and its AggregationResult, SharedState or None


def state_digest(tensors: Sequence[torch.Tensor]) -> bytes:
    """BLAKE2b-16 over the raw bytes of the global parameters."""
    digest = hashlib.blake2b(digest_size=16)
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.digest()


@dataclass
class InFlight:
    """One round's aggregation running in the background."""

    round: int
    sent: list[torch.Tensor]  # our own delta as sent (it stands in for the group's mean until it lands)
    mean: list[torch.Tensor]  # overwritten with the group's mean on success
    samples: int  # the samples behind ``sent`` (its weight)
    undelivered: list[torch.Tensor]  # filled on success with compression: what of ``sent`` the group's sum left out
    future: Future[AggregationOutcome] = field(repr=False)
    inner: tuple[float, int] = (float("nan"), 0)  # mean train loss and steps of the inner phase behind ``sent``

    def ready(self) -> bool:
        """Whether the aggregation has finished (landing it now would not wait)."""
        return self.future.done()

    def delivered(self) -> list[torch.Tensor]:
        """What of ``sent`` the group's mean carries (all of it without compression)."""
        if not self.undelivered:
            return self.sent
        return [s - u for s, u in zip(self.sent, self.undelivered, strict=True)]


class OuterState:
    """The global parameters, their outer Nesterov-SGD optimizer, and the staleness rule.

    Args:
        model: the local model; the global parameters start as copies of its parameters.
        train: the run's training settings (outer learning rate and momentum).
    """

    def __init__(self, model: torch.nn.Module, train: TrainConfig):
        self.params = [torch.nn.Parameter(p.detach().clone(), requires_grad=True) for p in model.parameters()]
        nesterov = train.outer_momentum > 0  # torch refuses Nesterov without momentum
        self.optimizer = torch.optim.SGD(
            self.params, lr=train.outer_lr, momentum=train.outer_momentum, nesterov=nesterov
        )

    def pseudo_gradient(self, model: torch.nn.Module) -> list[torch.Tensor]:
        """Global - local: everything the local model trained and not yet sent."""
        with torch.no_grad():
            return [g.detach() - p.detach() for g, p in zip(self.params, model.parameters(), strict=True)]

    def step(self, mean_delta: list[torch.Tensor]) -> None:
        """One outer step with ``mean_delta`` as the gradient."""
        for param, grad in zip(self.params, mean_delta, strict=True):
            param.grad = grad.to(param.device, param.dtype)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def snapshot(self) -> list[torch.Tensor]:
        return [g.detach().clone() for g in self.params]

    def save(self) -> tuple[list[torch.Tensor], dict[str, Any]]:
        """The global parameters and the optimizer's state, copied (``restore`` puts them back)."""
        return self.snapshot(), copy.deepcopy(self.optimizer.state_dict())

    def restore(self, saved: tuple[list[torch.Tensor], dict[str, Any]]) -> None:
        """Undo the steps since ``save``."""
        params, optimizer = saved
        with torch.no_grad():
            for param, value in zip(self.params, params, strict=True):
                param.copy_(value)
        self.optimizer.load_state_dict(optimizer)

    def follow(self, model: torch.nn.Module, before: list[torch.Tensor], delivered: list[torch.Tensor] | None) -> None:
        """The staleness rule: ``local += (global - before) + delivered`` (``delivered`` None: after a resync,
        our delta was not merged and stays in the local model)."""
        with torch.no_grad():
            for i, (local, new, old) in enumerate(zip(model.parameters(), self.params, before, strict=True)):
                local.add_(new.detach() - old)
                if delivered is not None:
                    local.add_(delivered[i])  # the global step now carries it (or the group's mean in its place)

    def copy_to(self, model: torch.nn.Module) -> None:
        """Set the local model to the global parameters."""
        with torch.no_grad():
            for local, param in zip(model.parameters(), self.params, strict=True):
                local.copy_(param)

    def digest(self) -> bytes:
        return state_digest(self.params)

    def shared_tensors(self, local: Collection[int] = ()) -> list[torch.Tensor]:
        """Global params and outer momentum, as shared with late joiners (the ``local`` indices as zeros)."""
        momentum = [self.optimizer.state.get(p, {}).get("momentum_buffer") for p in self.params]
        params = [torch.zeros_like(p) if i in local else p.detach() for i, p in enumerate(self.params)]
        return params + [
            m.detach() if m is not None and i not in local else torch.zeros_like(p)
            for i, (m, p) in enumerate(zip(momentum, self.params, strict=True))
        ]

    def load_shared(self, tensors: Sequence[torch.Tensor], local: Collection[int] = ()) -> None:
        """Global params and outer momentum from ``shared_tensors`` of a peer (the ``local`` indices left as is)."""
        count = len(self.params)
        with torch.no_grad():
            for i, (param, value, momentum) in enumerate(
                zip(self.params, tensors[:count], tensors[count:], strict=True)
            ):
                if i in local:
                    continue
                param.copy_(value.to(param.device))
                self.optimizer.state[param]["momentum_buffer"] = momentum.to(param.device).clone()

"""One step's trip through the remote stages: each micro-batch's forward and backward, then the commits.

A trainer's step (node/sharding/trainer.py) cuts its batch into micro-batches. For each, ``forward``
sends the local front's output through every stage (the server of each stage is kept for the step:
its backward and commit go to the one that holds its activations), and ``backward`` sends the
gradient of the last stage's output back through them, returning the gradient of the front's output.
``commit`` then applies the step on every stage exactly once (node/sharding/client.py).
"""

from __future__ import annotations

import torch

from node.sharding.client import RemoteStages


class StepPipeline:
    """The remote part of one step.

    Args:
        remote: the stages' client.
        step_id: the step's id (unique per trainer session and step).
        stages: the run's stage count.
        micro_batches: the micro-batches this step sends (each stage applies once all are in).
    """

    def __init__(self, remote: RemoteStages, step_id: int, stages: int, micro_batches: int):
        self.remote, self.step_id, self.micro_batches = remote, step_id, micro_batches
        self.servers: list[str | None] = [None] * stages
        self.saved: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(stages)]
        self._inputs: list[torch.Tensor] = []  # the current micro-batch's input of each stage
        self.clip: list[torch.Tensor] = []  # a DP step: each micro-batch's clip factors (node/sharding/private.py)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """The last stage's output for the front's output ``hidden`` (on the CPU; detached)."""
        hidden, self._inputs = hidden.detach().cpu(), []
        for stage in range(len(self.servers)):
            self._inputs.append(hidden)
            hidden, self.servers[stage] = self.remote.forward(stage, self.step_id, hidden, self.servers[stage])
        return hidden

    def backward(self, grad: torch.Tensor) -> torch.Tensor:
        """The gradient of the front's output, given ``grad`` of the last stage's output (the micro-batch that
        ``forward`` sent last); the stages keep their parameter gradients for ``commit``."""
        grad, micro_batch = grad.detach().cpu(), len(self.saved[0]) if self.saved else 0
        for stage in reversed(range(len(self.servers))):
            self.saved[stage].append((self._inputs[stage], grad))
            grad, self.servers[stage] = self.remote.backward(
                stage, self.step_id, micro_batch, self._inputs[stage], grad, self.servers[stage], self.micro_batches
            )
        return grad

    def backward_per_example(self, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A DP step's ``backward`` (node/sharding/clipped.py): ``grad`` holds each example's gradient of its own
        loss; returns the front output's gradient and each example's squared norm of every stage's parameter
        gradient, summed over the stages."""
        grad, micro_batch = grad.detach().cpu(), self.sent
        squared = torch.zeros(grad.shape[0])
        for stage in reversed(range(len(self.servers))):
            self.saved[stage].append((self._inputs[stage], grad))
            grad, norms, self.servers[stage] = self.remote.backward_per_example(
                stage, self.step_id, micro_batch, self._inputs[stage], grad, self.servers[stage], self.micro_batches
            )
            squared += norms
        return grad, squared

    def commit(self, private: tuple[float, float] | None = None, share: float = 1.0) -> list[int]:
        """Apply the step on every stage, exactly once, at ``share`` of the stages' learning rate (1 / the run's
        trainers, messages.py); each stage's version after it. A DP step passes ``private`` = (noise std, scale):
        the stages clip by ``clip`` and add that noise (node/sharding/clipped.py)."""
        sent = None if private is None else (torch.cat(self.clip), torch.tensor(private, dtype=torch.float32))
        return [
            self.remote.commit(stage, self.step_id, self.saved[stage], self.servers[stage], sent, share)
            for stage in range(len(self.servers))
        ]

    @property
    def sent(self) -> int:
        """Micro-batches sent back through the stages so far."""
        return len(self.saved[0]) if self.saved else 0

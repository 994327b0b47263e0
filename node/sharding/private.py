"""Record-level DP-SGD for a sharded trainer: one clip over the whole model, across the trainer and its stages.

A sharded trainer holds the embeddings, the first ``local_blocks`` blocks, the final norm and the
tied head (``LocalParts``); the middle blocks run on stage servers. DP-SGD on the trainer's parts
alone would not be DP: their gradients run through stage weights trained on the same records
without clipping or noise, so a record would reach them outside the mechanism. So each step is
DP-SGD on every parameter (docs/architecture.md, "DP with sharding"): the sampling, accountant and
budget of ``zen-node join`` (node/training/dpsgd.py), with the per-example gradients taken one
micro-batch of examples at a time:

1. the front runs here, batched (no gradient), and its output goes through every stage
   (node/sharding/pipeline.py);
2. the head: each example's gradient of its own loss with respect to the head's parameters (the
   final norm and the tied embedding) and to the last stage's output (``vmap`` of ``grad``);
3. the latter goes back through the stages by ``backward_dp`` (node/sharding/clipped.py): each
   server keeps each example's gradient of its stage and returns each example's gradient of its
   input and the squared norm of its stage's share (examples never mix in a transformer's blocks);
   each example's gradient of the front's parameters is then a ``vmap`` of ``vjp`` here;
4. each example's norm over the whole model gives one factor ``min(1, C / norm)``; our per-example
   gradients, scaled by it, go to Opacus' ``DPOptimizer`` (whose clip is then a no-op: it adds noise
   ``sigma * C`` and divides by the expected batch), and the factors go with each stage's commit,
   whose server sums its share with them and adds its own noise of the same std (``commit_noise``).

tests/test_sharded_privacy.py checks the gradients and factors against one backward per example
through the whole model, across a real stage server. Not covered: the stage servers see each
sampled record's hidden states and their gradients, and add the noise on their share; run sharded
DP with servers you trust with your data. User-level DP with sharding is refused by the run's config.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from node.config import ConfigError
from node.sharding.pipeline import StepPipeline
from node.sharding.stages import LocalParts
from node.training.dpsgd import DPSGDStep, RecordSampler

DP_STEPS_FILE = "dp_steps.json"  # the DP-SGD steps counted so far, written before each step's commit
HEAD_PREFIXES = ("wte.", "ln_f.")  # what LocalParts.head uses: the final norm and the tied embedding
MAX_MICRO_BATCHES = 64  # the stage protocol's limit (node/sharding/messages.py)


def save_dp_steps(workdir: Path, run_hash: str, steps: int) -> None:
    """Record the DP-SGD steps counted so far (atomically). A sharded step releases its stages' update at its
    commit, mid-round, so the round-end checkpoint alone would undercount after a crash."""
    path = workdir / DP_STEPS_FILE
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"run_hash": run_hash, "steps": steps}))
    os.replace(temporary, path)


def load_dp_steps(workdir: Path, run_hash: str) -> int:
    """The steps ``save_dp_steps`` recorded for this run (0: none, or another run's).

    Raises:
        ConfigError: the file is malformed (starting on would forget steps whose updates left the node).
    """
    path = workdir / DP_STEPS_FILE
    if not path.exists():
        return 0
    try:
        saved = json.loads(path.read_text()[:4096])
        steps = saved["steps"]
        if not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be a count, got {steps!r}")
        return steps if saved["run_hash"] == run_hash else 0
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"{path} is malformed ({e}); restore it, or resume without it only if you accept that its DP steps "
            "go uncounted"
        ) from None


class _Method(nn.Module):
    """``parts.<method>`` as a module's forward, for ``functional_call`` (its parameters are ``parts.<name>``)."""

    def __init__(self, parts: LocalParts, method: str):
        super().__init__()
        self.parts, self.method = parts, method

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return getattr(self.parts, self.method)(*args)


class ShardedDPSGD(DPSGDStep):
    """DP-SGD on a sharded trainer's own parts (module docstring). Args as for ``DPSGDStep``, and:

    Args:
        micro_batches: the fewest pieces a step's sample is cut into (``sharding.micro_batches``; more if a
            piece's per-example gradients would exceed ``MAX_PER_SAMPLE_FLOATS``).

    Before each call, set ``pipeline_for``: it gives the step's ``StepPipeline`` for a number of micro-batches;
    after it, ``pipeline`` is the one used (commit it if it sent anything: ``pipeline.sent``).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        sampler: RecordSampler,
        noise_multiplier: float,
        clip_norm: float,
        device: torch.device,
        lr_scale: float = 1.0,
        micro_batches: int = 1,
    ):
        if not isinstance(model, LocalParts):
            raise TypeError("ShardedDPSGD trains a sharded trainer's LocalParts")
        super().__init__(model, optimizer, sampler, noise_multiplier, clip_norm, device, lr_scale)
        self.local, self.micro_batches = model, micro_batches
        self.expected_batch = max(1, round(sampler.sample_rate * sampler.count))  # Opacus divides by the same
        self.pipeline_for: Callable[[int], StepPipeline] | None = None
        self.pipeline: StepPipeline | None = None
        self.last_batch = 0  # examples in the last call's Poisson sample
        self._front, self._head = _Method(model, "front"), _Method(model, "head")
        self._head_names = [name for name in self.params if name.startswith(HEAD_PREFIXES)]
        self._front_names = [name for name in self.params if not name.startswith("ln_f.")]
        self._per_example_head = vmap(
            grad_and_value(self._head_loss, argnums=(0, 1)), in_dims=(None, 0, 0), randomness="different"
        )
        self._per_example_front = vmap(self._front_pullback, in_dims=(None, 0, 0), randomness="different")

    def slices(self, count: int) -> list[slice]:
        """At least ``micro_batches`` pieces (fewer if there are fewer examples), none over the memory chunk."""
        pieces = min(MAX_MICRO_BATCHES, max(self.micro_batches, math.ceil(count / self.chunk)), max(1, count))
        size = math.ceil(max(1, count) / pieces)
        return [slice(start, start + size) for start in range(0, max(1, count), size)]

    def __call__(self) -> float:
        """One step on a fresh Poisson sample; ``pipeline`` then holds its remote part, still to be committed
        (``commit_noise`` is what its commit carries)."""
        if self.pipeline_for is None:
            raise RuntimeError("ShardedDPSGD.pipeline_for was not set")
        tokens, targets = self.sampler.sample()
        self.last_batch = tokens.shape[0]
        self.pipeline = self.pipeline_for(len(self.slices(tokens.shape[0])))
        return self.step_on(tokens, targets)

    @property
    def commit_noise(self) -> tuple[float, float]:
        """(noise std, scale) of the stages' share: ``sigma * C`` on the clipped sum, divided by the expected batch
        (what Opacus does with the trainer's)."""
        return self.noise_multiplier * self.clip_norm, 1.0 / self.expected_batch

    def per_example_gradients(
        self, tokens: torch.Tensor, targets: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], float]:
        """Each example's gradient of our parts, already scaled by its clip factor over the whole model (module
        docstring), and the mean loss. An empty sample sends one blank window with factor 0, so the stages still
        add their noise (a step's output never shows that its sample was empty)."""
        if self.pipeline is None:
            raise RuntimeError("ShardedDPSGD has no pipeline for this step")
        empty = tokens.shape[0] == 0
        if empty:
            blank = torch.zeros(1, self.sampler.records.shape[1] - 1, dtype=torch.long)
            tokens, targets = blank, blank
        tokens, targets = tokens.to(self.device), targets.to(self.device)
        params = {name: p.detach() for name, p in self.params.items()}
        with torch.no_grad():
            hidden = self.local.front(tokens)
        out = self.pipeline.forward(hidden).to(self.device)
        with sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernels have no vmap rule
            head = self._per_example_head({name: params[name] for name in self._head_names}, out, targets)
            (head_grads, out_grads), losses = head[0], head[1]
            front_out, stage_squared = self.pipeline.backward_per_example(out_grads)
            front_grads = self._per_example_front(
                {name: params[name] for name in self._front_names}, tokens, front_out.to(self.device)
            )
        grads = {name: front_grads.get(name, 0) + head_grads.get(name, 0) for name in self.params}
        squared = stage_squared.to(self.device) + sum((g.flatten(1) ** 2).sum(1) for g in grads.values())
        factors = torch.zeros_like(squared) if empty else (self.clip_norm / (squared.sqrt() + 1e-6)).clamp(max=1.0)
        self.pipeline.clip.append(factors.cpu())
        scaled = {name: g * factors.view(-1, *[1] * (g.dim() - 1)) for name, g in grads.items()}
        return scaled, math.nan if empty else float(losses.mean())

    def _head_loss(self, params: dict[str, torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        named = {f"parts.{name}": value for name, value in params.items()}
        return functional_call(self._head, named, (hidden[None], targets[None]))

    def _front_pullback(
        self, params: dict[str, torch.Tensor], tokens: torch.Tensor, cotangent: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        def front(chosen: dict[str, torch.Tensor]) -> torch.Tensor:
            named = {f"parts.{name}": value for name, value in chosen.items()}
            return functional_call(self._front, named, (tokens[None],))

        pullback = vjp(front, params)[1]
        return pullback(cotangent[None])[0]

"""A stage server's part of a DP-SGD step: per-example gradients, and their clipped, noised sum.

Record-level DP for a sharded run clips each example's gradient over the *whole* model (the
trainer's parts and every stage's) to one norm ``C``, and adds Gaussian noise of std ``sigma * C``
to the sum of every part (node/sharding/private.py says why the trainer's parts alone are not
enough). A stage's share, on its server:

- ``backward_dp`` (``per_example_backward``): each example's gradient of the stage's parameters,
  kept pending ([batch, *shape] per parameter), and the gradient of its input; the reply carries
  the input gradient and each example's squared norm of the stage's parameter gradient, from which
  the trainer computes the examples' clip factors ``min(1, C / total norm)``.
- ``commit`` then carries the clip factors of all the step's examples (micro-batch order) and
  ``[noise std, scale]``; the stage applies ``(sum_i c_i g_i + N(0, std^2 I)) * scale`` (``clipped_sum``),
  noise drawn once per step from a generator seeded by the OS, so a repeated commit (to sign its
  digest) sums the same bits, and replicas receive the sum as any step's.

The noise is trusted to the server: it sees the examples' hidden states anyway (what DP does not cover
in a sharded run, node/sharding/private.py).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from node.sharding.messages import StageMessageError

MAX_NOISE_STD = 1e6  # a commit's noise std beyond this is refused (sigma <= 1000 and C bounded by the run)
NOISE_SLOT = -1  # where a step's drawn noise waits among its pending micro-batches


def per_example_backward(
    module: nn.Module, hidden: torch.Tensor, grad: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Each example's parameter gradients ([batch, *shape] per parameter, in ``module.parameters()`` order), the
    gradient of the input, and each example's squared parameter-gradient norm, for output gradients ``grad``."""
    names = [name for name, _ in module.named_parameters()]
    params = {name: p.detach() for name, p in module.named_parameters()}

    def one(chosen: dict[str, torch.Tensor], x: torch.Tensor, g: torch.Tensor) -> tuple[dict, torch.Tensor]:
        pullback = vjp(lambda p, h: functional_call(module, p, (h[None],)), chosen, x)[1]
        param_grads, input_grad = pullback(g[None])
        return param_grads, input_grad

    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernels have no vmap rule
        param_grads, input_grad = vmap(one, in_dims=(None, 0, 0), randomness="different")(params, hidden, grad)
    grads = [param_grads[name].detach() for name in names]
    squared = torch.stack([(g.flatten(1) ** 2).sum(1) for g in grads]).sum(0)
    return grads, input_grad.detach(), squared


class StageNoise:
    """The noise a stage adds to DP steps: a generator seeded by the OS (no one can predict it)."""

    def __init__(self) -> None:
        self.generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))

    def draw(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.randn(p.shape, generator=self.generator).to(p.device) for p in params]


def is_per_example(parts: dict[int, list[torch.Tensor]], params: Sequence[torch.Tensor]) -> bool:
    """Whether a step's pending micro-batches hold per-example gradients (``backward_dp``); refuses a mix."""
    kinds = {grads[0].dim() == params[0].dim() + 1 for m, grads in parts.items() if m != NOISE_SLOT}
    if len(kinds) > 1:
        raise StageMessageError("a step mixes backward and backward_dp micro-batches")
    return kinds == {True}


def clipped_sum(
    parts: dict[int, list[torch.Tensor]],
    micro_batches: int,
    private: Sequence[torch.Tensor],
    noise: list[torch.Tensor],
) -> list[torch.Tensor]:
    """``(sum_i c_i g_i + std * noise) * scale`` over the step's micro-batches (module docstring).

    Raises:
        StageMessageError: the commit does not carry one clip factor in [0, 1] per example and a finite
            ``[std, scale]`` with std in [0, MAX_NOISE_STD] and scale in (0, 1].
    """
    sizes = [parts[m][0].shape[0] for m in range(micro_batches)]
    if len(private) != 2 or private[0].shape != (sum(sizes),) or private[1].shape != (2,):
        raise StageMessageError(
            f"a DP step's commit carries its {sum(sizes)} clip factors and [noise std, scale]; resend the commit"
        )
    factors, (std, scale) = private[0], private[1].tolist()
    if not (torch.isfinite(factors).all() and factors.min() >= 0 and factors.max() <= 1):
        raise StageMessageError("clip factors must be in [0, 1]")
    if not (math.isfinite(std) and 0 <= std <= MAX_NOISE_STD and math.isfinite(scale) and 0 < scale <= 1):
        raise StageMessageError(f"noise std must be in [0, {MAX_NOISE_STD:g}] and scale in (0, 1]")
    chunks = factors.split(sizes)
    out = []
    for k, drawn in enumerate(noise):
        total = sum(
            (chunks[m].to(parts[m][k].device).view(-1, *[1] * drawn.dim()) * parts[m][k]).sum(0)
            for m in range(micro_batches)
        )
        out.append((total + std * drawn) * scale)
    return out

"""The inner optimizer of a run: AdamW, or Muon on the hidden matrices with AdamW for the rest (MuLoCo).

``train.inner_optimizer = "adamw"`` (the default) is one AdamW over every parameter. ``"muon"``
follows MuLoCo (Muon as DiLoCo's inner optimizer): the 2-D weight matrices inside the blocks are
stepped by ``torch.optim.Muon`` (momentum, then a Newton-Schulz orthogonalization of the update),
with its learning rate scaled to match AdamW's update RMS (``adjust_lr_fn="match_rms_adamw"``), so one
``inner_lr`` serves both; embeddings, the tied head, norms and biases stay on AdamW. Both keep their
state per node, like AdamW alone; nothing of it goes on the wire, so the masked all-reduce, the
compression and the outer step are unchanged.

``InnerOptimizer`` is what the trainer holds either way: ``param_groups`` (the schedule sets their
``lr``), ``zero_grad``, ``step``, ``state_dict`` and ``load_state_dict`` (checkpoints).
"""

from __future__ import annotations

from typing import Any

import torch

from node.run_config import InnerOptimizerKind

MUON_MOMENTUM = 0.95  # Muon's default


class InnerOptimizer(torch.optim.Optimizer):
    """One optimizer over parts that each step their own parameters (AdamW alone, or Muon + AdamW)."""

    def __init__(self, parts: list[torch.optim.Optimizer]) -> None:
        self.parts = parts
        groups = [group for part in parts for group in part.param_groups]
        self.defaults: dict[str, Any] = {}
        self.param_groups = groups
        self.state = {}  # type: ignore[assignment]  # each part keeps its own

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for part in self.parts:
            part.step()

    def state_dict(self) -> dict[str, Any]:
        if len(self.parts) == 1:
            return self.parts[0].state_dict()  # AdamW alone: the state_dict it always had (old checkpoints load)
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = list(state_dict["parts"]) if "parts" in state_dict else [state_dict]
        if len(states) != len(self.parts):
            raise ValueError(
                f"the checkpoint's inner optimizer has {len(states)} parts, this run's has {len(self.parts)}: "
                "it was written under another train.inner_optimizer; resume with that setting or start a new workdir"
            )
        for part, state in zip(self.parts, states, strict=True):
            part.load_state_dict(state)


def is_hidden_matrix(name: str, param: torch.Tensor) -> bool:
    """Muon's share: 2-D weights inside the transformer blocks (not embeddings, the head, norms or biases)."""
    lowered = name.lower()
    outside = ("wte", "wpe", "embed", "lm_head", "head.")
    return param.ndim == 2 and not any(word in lowered for word in outside)


def build_inner_optimizer(
    model: torch.nn.Module, kind: InnerOptimizerKind, lr: float, weight_decay: float
) -> InnerOptimizer:
    """The run's inner optimizer over ``model``'s trainable parameters."""
    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    if kind == "adamw":
        return InnerOptimizer([torch.optim.AdamW([p for _, p in named], lr=lr, weight_decay=weight_decay)])
    hidden = [p for name, p in named if is_hidden_matrix(name, p)]
    rest = [p for name, p in named if not is_hidden_matrix(name, p)]
    parts: list[torch.optim.Optimizer] = []
    if hidden:
        parts.append(
            torch.optim.Muon(
                hidden, lr=lr, weight_decay=weight_decay, momentum=MUON_MOMENTUM, adjust_lr_fn="match_rms_adamw"
            )
        )
    if rest:
        parts.append(torch.optim.AdamW(rest, lr=lr, weight_decay=weight_decay))
    return InnerOptimizer(parts)

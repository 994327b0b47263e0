"""LoRA adapters (``peft``) on a frozen base: ``[run.lora] r, alpha, dropout, target_modules``.

Only the adapters are the run's parameters. ``with_adapters`` wraps the base with peft's LoRA
layers and then turns every frozen base parameter into a buffer of the same name, so
``model.parameters()`` yields the adapters alone: the inner AdamW, the outer step, the masked
all-reduce, checkpoints, round parameters and the state a late joiner downloads all hold adapters,
and no byte of the base goes on the wire. Every peer rebuilds the base from the same local files
(their digests are in the run hash) or the same seed. The adapters' own init (peft's: A random, B
zero, so the adapted model starts as the base) is drawn from the run's seed, identical on every peer.

For the export, ``merged_model`` folds the adapters into a plain transformers model (``merge_and_unload``)
that ``AutoModelForCausalLM.from_pretrained`` loads, and ``adapter_model`` gives the adapters alone
for ``peft.PeftModel.from_pretrained`` over the same base.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from node.config import ConfigError
from node.model_config import LoraConfig


def with_adapters(hf_model: Any, lora: LoraConfig) -> Any:
    """``hf_model`` with LoRA adapters (drawn from torch's current generator) and its base frozen as buffers.

    Raises:
        ConfigError: ``lora.target_modules`` names no module of the model, or peft knows no default for it.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    settings = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules or None,
        bias="none",
        fan_in_fan_out=_has_conv1d(hf_model),
    )
    try:
        with _peft_on_transformers_5():
            adapted = get_peft_model(hf_model, settings)
    except ValueError as e:
        reason = str(e).splitlines()[0][:200]
        raise ConfigError(f"lora.target_modules do not fit the model ({reason}); name its linear layers") from None
    freeze_base(adapted)
    return adapted


def _has_conv1d(hf_model: Any) -> bool:
    """Whether the base's linear layers are transformers' ``Conv1D`` (GPT-2: weights stored (in, out)), whose
    adapters peft must build transposed; left False, peft sets it itself with a UserWarning."""
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(module, Conv1D) for module in hf_model.modules())


@contextmanager
def _peft_on_transformers_5() -> Iterator[None]:
    """peft reads ``is_gradient_checkpointing``, which transformers 5 deprecates with a FutureWarning: not ours."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def freeze_base(module: nn.Module) -> None:
    """Turn every parameter that does not require a gradient into a (persistent) buffer of the same name."""
    for child in module.modules():
        for name, param in list(child._parameters.items()):
            if param is not None and not param.requires_grad:
                del child._parameters[name]
                child.register_buffer(name, param.data)


def adapter_count(module: nn.Module) -> int:
    """Values in the adapters (the run's parameters)."""
    return sum(p.numel() for p in module.parameters())


def merged_model(adapted: Any, config: Any) -> Any:
    """A plain transformers model of ``config`` with ``adapted``'s adapters folded into its weights.

    ``adapted`` is changed (peft merges in place): call it last.

    Raises:
        RuntimeError: the merged weights do not cover the plain model's (a peft or transformers change).
    """
    from transformers import AutoModelForCausalLM

    with _peft_on_transformers_5():
        state = adapted.merge_and_unload().state_dict()
    plain = AutoModelForCausalLM.from_config(config)
    result = plain.load_state_dict(state, strict=False)
    tied = {name for name, _ in plain.named_parameters(remove_duplicate=False)} - dict(plain.named_parameters()).keys()
    missing = [name for name in result.missing_keys if name not in tied]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"merged LoRA weights do not fit the base: missing {missing[:3]}, extra {result.unexpected_keys[:3]}"
        )
    return plain.eval()

"""A ``transformers`` causal LM behind the built-in GPT's call signature (``[run.model] family = "hf"``).

The trainer, the held-out evaluation, the capacity probe and the export call the run's model as
``model(tokens)`` -> logits, or ``model(tokens, targets)`` -> the mean next-token cross-entropy
(node/model.py). ``HFCausalLM`` gives any ``AutoModelForCausalLM`` (Llama, Qwen2, GPT-2, Mistral
shapes, ...) that signature, so nothing downstream forks by family: its parameters are the wrapped
model's (tied ones once), in the wrapped model's order, and ``hf_model`` is what ``save_pretrained``
writes.

``build_hf_model`` builds it from a local ``config.json`` only (``local_files_only``; nothing is
fetched from a hub), in float32, either seeded (every peer draws the same init from ``train.seed``)
or from a local folder of ``*.safetensors`` weights, read with ``safetensors`` (never a pickle).
The files were checked and digested when the config was loaded (node/model_files.py); what only
building can reveal (a config transformers cannot build, weights of another shape) is a ConfigError
naming the file here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from node.config import ConfigError, ModelConfig
from node.model_config import LoraConfig
from node.model_files import weight_files

logger = logging.getLogger(__name__)


class HFCausalLM(nn.Module):
    """``model(tokens, targets=None)`` over a transformers causal LM: logits, or the mean loss with targets.

    Args:
        hf_model: a ``PreTrainedModel`` with a causal LM head.
    """

    def __init__(self, hf_model: Any):
        super().__init__()
        self.hf_model = hf_model
        self.config = hf_model.config  # its ``vocab_size`` is read as the built-in GPT's ``config.vocab_size``

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Return logits (batch, length, vocab), or the mean cross-entropy loss when ``targets`` is given."""
        logits = self.hf_model(input_ids=tokens, use_cache=False).logits
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def load_hf_config(model: ModelConfig) -> Any:
    """The ``PretrainedConfig`` of the run's local ``config.json`` or inline ``[run.model.hf]`` keys (no hub),
    its dropout off for reproducible steps.

    Raises:
        ConfigError: transformers cannot read it or does not know its ``model_type``.
    """
    from transformers import AutoConfig

    where = "[run.model.hf]" if model.hf else f"model.hf_config {model.hf_config}"
    try:
        if model.hf:
            keys = {k: v for k, v in model.hf.items() if k != "model_type"}
            config = AutoConfig.for_model(model.hf["model_type"], **keys)
        else:
            config = AutoConfig.from_pretrained(str(Path(model.hf_config).expanduser()), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"{where} is not a config transformers builds ({str(e).splitlines()[0][:200]}); "
            "point it at a causal LM's config.json"
        ) from None
    for name in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)
    return config


def build_hf_model(
    model: ModelConfig, seed: int, load_weights: bool = True, lora: LoraConfig | None = None
) -> HFCausalLM:
    """The run's "hf" model: seeded by ``seed``, then overwritten by ``model.weights`` when given and wanted.

    Args:
        model: the run's model section (``family = "hf"``).
        seed: seeds the init, so every peer starts from the same point.
        load_weights: read the base weights (False: the seeded init only, e.g. to measure speed).
        lora: with ``r > 0``, LoRA adapters (seeded too) on the frozen base: the parameters are the adapters
            (node/model_lora.py).

    Raises:
        ConfigError: the config cannot be built, or the weights do not fit it.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    config = load_hf_config(model)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        hf_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except (ValueError, KeyError, TypeError) as e:
        reason = str(e)[:200]
        where = "[run.model.hf]" if model.hf else f"model.hf_config {model.hf_config}"
        raise ConfigError(f"{where} builds no causal LM ({reason}); use another") from None
    finally:
        torch.random.set_rng_state(generator_state)
    if load_weights and model.weights:
        load_weights_into(hf_model, model.weights)
    if lora is not None and lora.active:
        from node.model_lora import with_adapters

        torch.manual_seed(seed)
        try:
            hf_model = with_adapters(hf_model, lora)
        finally:
            torch.random.set_rng_state(generator_state)
    return HFCausalLM(hf_model.train())


def load_weights_into(hf_model: Any, folder: str) -> None:
    """Copy the ``*.safetensors`` tensors of ``folder`` into ``hf_model`` (every parameter must be given).

    Raises:
        ConfigError: a tensor has another shape, is unknown to the model, or a parameter has none.
    """
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in weight_files(folder):
        state.update(load_file(str(file)))
    try:
        result = hf_model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        reason = str(e).splitlines()[-1][:200]
        raise ConfigError(f"model.weights {folder} do not fit model.hf_config ({reason})") from None
    tied = {name for name, _ in hf_model.named_parameters(remove_duplicate=False)} - {
        name for name, _ in hf_model.named_parameters()
    }
    missing = [name for name in result.missing_keys if name not in tied]
    if missing or result.unexpected_keys:
        raise ConfigError(
            f"model.weights {folder} do not fit model.hf_config: {len(missing)} parameters missing {missing[:3]}, "
            f"{len(result.unexpected_keys)} unknown {result.unexpected_keys[:3]}; use the base's own files"
        )
    logger.info(f"loaded base weights from {folder} ({len(state)} tensors)")

"""Export of a ``family = "hf"`` run: the trained transformers model as it is, and the run's tokenizer.

With LoRA (``[run.lora] r > 0``) the folder holds the base with the adapters merged in (for
``AutoModelForCausalLM``) and, in ``adapter/``, the adapters alone (for ``peft.PeftModel``).

The swarm trained an ``HFCausalLM`` (node/model_hf.py), a thin wrapper: its ``hf_model`` is the very
``transformers`` model, so ``save_pretrained`` writes its config and safetensors weights and
``AutoModelForCausalLM.from_pretrained`` computes the swarm's logits. The tokenizer is the run's
``tokenizer.json`` behind ``PreTrainedTokenizerFast``, or, for a byte-level run, the byte tokenizer
of export/gpt2.py (token id = byte value).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn
from transformers import PreTrainedTokenizerFast

from node.config import ConfigError, ModelConfig
from node.export.gpt2 import byte_tokenizer
from node.model_hf import HFCausalLM
from node.model_lora import merged_model

ADAPTER_FOLDER = "adapter"  # LoRA runs: the adapters for ``peft.PeftModel.from_pretrained(base, DIR / "adapter")``


def write_hf_model(folder: Path, model: nn.Module, config: ModelConfig) -> None:
    """Write ``model``'s transformers model and the run's tokenizer into ``folder``.

    Raises:
        ConfigError: ``model`` is not an ``HFCausalLM``, or the run's tokenizer file is gone.
    """
    if not isinstance(model, HFCausalLM):
        raise ConfigError(f"an 'hf' run's model must be an HFCausalLM, got {type(model).__name__}")
    if hasattr(model.hf_model, "peft_config"):  # LoRA: the adapters alone for peft, the merged model for transformers
        for settings in model.hf_model.peft_config.values():  # a path on this node means nothing elsewhere
            settings.base_model_name_or_path = None
        model.hf_model.save_pretrained(folder / ADAPTER_FOLDER, save_embedding_layers=False)
        merged_model(model.hf_model, model.config).save_pretrained(folder)
    else:
        model.hf_model.save_pretrained(folder)
    if not config.tokenizer:
        byte_tokenizer(config.context).save_pretrained(folder)
        return
    path = Path(config.tokenizer).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.tokenizer {path} does not exist; pass the run's --config with its tokenizer path")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(path), model_max_length=config.context, clean_up_tokenization_spaces=False
    )
    tokenizer.save_pretrained(folder)

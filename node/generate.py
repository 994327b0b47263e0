"""``zen-node generate``: sample text from an exported model folder with ``transformers``.

    zen-node generate --model ./zen-model --prompt "Once upon a time" --max-new-tokens 48 --seed 1

The folder is what ``zen-node export`` writes (or any causal LM folder with a tokenizer). Text
is encoded with the folder's tokenizer; a folder without tokenizer files whose vocabulary is
256 is read as bytes (token id = byte value). The model sees at most its context: the prompt
keeps its last ``context - max_new_tokens`` tokens. Sampling is plain (temperature 1, no top-k
cut), seeded by ``--seed``, on the CPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from node.config import ConfigError

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass
class Generation:
    """A prompt and what the model wrote after it."""

    prompt: str  # the prompt as the model saw it (after truncation to its context)
    continuation: str
    tokens: list[int]  # the new token ids


def generate_text(model_dir: Path, prompt: str, max_new_tokens: int | None = None, seed: int = 0) -> Generation:
    """Sample up to ``max_new_tokens`` tokens (default: half the context) after ``prompt``.

    Raises:
        ConfigError: no model in ``model_dir``, an empty prompt, or ``max_new_tokens`` outside
            [1, context - 1] (the message says what to pass).
    """
    model, encode, decode = _load(model_dir)
    context = int(getattr(model.config, "n_positions", None) or model.config.max_position_embeddings)
    new = context // 2 if max_new_tokens is None else max_new_tokens
    if not 1 <= new < context:
        raise ConfigError(f"--max-new-tokens must be in [1, {context - 1}] (the model's context is {context})")
    ids = encode(prompt)
    if not ids:
        raise ConfigError('--prompt must not be empty, e.g. --prompt "Once upon a time"')
    ids = ids[-(context - new) :]
    torch.manual_seed(seed)
    with torch.no_grad():
        output = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=new,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            pad_token_id=0,
        )
    tokens = output[0, len(ids) :].tolist()
    return Generation(prompt=decode(ids), continuation=decode(tokens), tokens=tokens)


def _load(model_dir: Path) -> tuple[Any, Any, Any]:
    """The model (eval mode) and encode/decode functions for its folder."""
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"no model in {model_dir} (no config.json); pass --model a folder `zen-node export` wrote")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(
            f"cannot load the model in {model_dir} ({e}); pass --model a folder `zen-node export` wrote"
        ) from None
    if any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        return model, lambda text: tokenizer(text)["input_ids"], lambda ids: tokenizer.decode(ids)
    if model.config.vocab_size != 256:
        raise ConfigError(f"{model_dir} has no tokenizer files and is not byte-level; add its tokenizer.json")
    return model, lambda text: list(text.encode()), lambda ids: bytes(ids).decode("utf-8", errors="replace")

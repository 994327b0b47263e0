"""The local files of a Hugging Face model family run: checked, and reduced to content digests.

A run with ``[run.model] family = "hf"`` names three local files by path: the model's
``config.json``, a ``tokenizer.json`` (or none: bytes) and a folder of ``*.safetensors`` base
weights (or none: a seeded init). Peers keep these files at different paths, so what every peer
of a run must share is their *content*: ``ModelConfig`` carries a digest of each, computed here
when the config is loaded, and the run hash covers the digests, never the paths. A peer whose base
weights differ is then refused with ``model.weights_digest`` named (node/training/admission.py).

Digests (BLAKE2b, 16 bytes, hex):

- config: the canonical JSON (sorted keys) of ``config.json`` without the keys that say where or
  with what it was written (``transformers_version``, ``_name_or_path`` and other ``_`` keys);
- tokenizer: the canonical JSON of ``tokenizer.json``;
- weights: every ``*.safetensors`` file of the folder, in name order, its name, size and bytes.

Nothing here imports torch or transformers (``node.config`` stays cheap to import); only a tokenizer
file loads the ``tokenizers`` library, to count its vocabulary. Nothing is fetched from a hub.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DIGEST_BYTES = 16
MAX_JSON_BYTES = 64 * 1024**2  # a config.json or tokenizer.json larger than this is refused
MAX_INLINE_CONFIG_BYTES = 256 * 1024  # a model config (its shared keys, as JSON) larger than this is refused
MAX_HEADER_BYTES = 100 * 1024**2  # safetensors' own cap on a file's JSON header
_UNSHARED_KEYS = ("transformers_version",)  # config.json keys that differ between writers, not models


class ModelFileError(ValueError):
    """A model file is missing or malformed; the message names the file and the fix."""


@dataclass(frozen=True)
class HFConfigFacts:
    """What a run needs from a model's ``config.json`` before building the model."""

    digest: str
    model_type: str  # e.g. "llama", "qwen2", "gpt2", "mistral"
    vocab_size: int
    max_positions: int | None  # max_position_embeddings / n_positions, when the config says


def _read_json(path: Path, field: str, example: str) -> Any:
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise ModelFileError(f"model.{field} {path} {what}; set it to a local {example}")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ModelFileError(f"model.{field} {path} is over {MAX_JSON_BYTES >> 20} MiB; is it the right file?")
    try:
        return json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"model.{field} {path} is not readable JSON ({e}); set it to a local {example}") from None


def _canonical_digest(value: Any) -> str:
    encoded = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return hashlib.blake2b(encoded, digest_size=DIGEST_BYTES).hexdigest()


def read_hf_config(path: str | Path) -> HFConfigFacts:
    """Check a ``config.json`` (a JSON object with ``model_type`` and ``vocab_size``) and digest its content.

    Raises:
        ModelFileError: the file is missing, not JSON, or not a transformers model config.
    """
    path = Path(path).expanduser()
    value = _read_json(path, "hf_config", "transformers config.json, e.g. ./tiny-llama/config.json")
    return hf_config_facts(value, f"model.hf_config {path}")


def hf_config_facts(value: Any, where: str) -> HFConfigFacts:
    """Check a transformers model config (a ``config.json``'s content or ``[run.model.hf]``'s keys); digest it.

    A file and inline keys with the same content give the same digest, so peers may use either.

    Raises:
        ModelFileError: it is not a transformers model config, or its encoding is over the size bound.
    """
    if not isinstance(value, dict) or not isinstance(value.get("model_type"), str):
        raise ModelFileError(
            f'{where} is not a transformers model config (no "model_type"); point it at a causal LM\'s config.json'
        )
    vocab = value.get("vocab_size")
    if not isinstance(vocab, int) or not 1 <= vocab <= 10_000_000:
        raise ModelFileError(f'{where} has no valid "vocab_size" (got {vocab!r}); add it')
    positions = value.get("max_position_embeddings", value.get("n_positions"))
    shared = {k: v for k, v in value.items() if not k.startswith("_") and k not in _UNSHARED_KEYS}
    if len(json.dumps(shared)) > MAX_INLINE_CONFIG_BYTES:
        raise ModelFileError(f"{where} is over {MAX_INLINE_CONFIG_BYTES >> 10} KiB as JSON; is it a model config?")
    return HFConfigFacts(
        digest=_canonical_digest(shared),
        model_type=value["model_type"],
        vocab_size=vocab,
        max_positions=positions if isinstance(positions, int) else None,
    )


def read_tokenizer(path: str | Path) -> tuple[str, int]:
    """Check a Hugging Face ``tokenizer.json`` and return (content digest, vocabulary size with added tokens).

    Raises:
        ModelFileError: the file is missing, not JSON, or not a tokenizer the ``tokenizers`` library loads.
    """
    path = Path(path).expanduser()
    value = _read_json(path, "tokenizer", "Hugging Face tokenizer.json")
    if not isinstance(value, dict) or "model" not in value:
        raise ModelFileError(f'model.tokenizer {path} is not a tokenizer.json (no "model"); point it at one')
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_str(json.dumps(value))
    except Exception as e:  # the Rust library raises plain Exceptions
        reason = str(e)[:200]
        raise ModelFileError(f"model.tokenizer {path} does not load ({reason}); point it at a tokenizer.json") from None
    return _canonical_digest(value), tokenizer.get_vocab_size(with_added_tokens=True)


def weight_files(folder: str | Path) -> list[Path]:
    """The ``*.safetensors`` files of a weights folder, in name order, each with a well-formed header.

    Raises:
        ModelFileError: the folder is missing, holds no safetensors file, or a file's header is damaged.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        what = "is a file" if root.exists() else "does not exist"
        raise ModelFileError(
            f'model.weights {root} {what}; set it to a local folder of *.safetensors weights, or "" for a seeded init'
        )
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise ModelFileError(f"model.weights {root} holds no *.safetensors file; save the base model with safetensors")
    for file in files:
        _check_header(file)
    return files


def _check_header(file: Path) -> None:
    """A safetensors file opens with an 8-byte little-endian length and that many bytes of a JSON object."""
    try:
        with file.open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size)) if 2 <= size <= MAX_HEADER_BYTES else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict) or size + 8 > file.stat().st_size:
        raise ModelFileError(f"model.weights file {file} is not a safetensors file; re-save the base weights with it")


def weights_digest(folder: str | Path) -> str:
    """The digest of a weights folder's ``*.safetensors`` files: names, sizes and bytes, in name order."""
    digest = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for file in weight_files(folder):
        digest.update(f"{file.name}\0{file.stat().st_size}\0".encode())
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelDigests:
    """The content digests of a run's model files ("" where a file is not used)."""

    config: str
    tokenizer: str
    weights: str


def digest_hf_files(hf_config: str | dict[str, Any], tokenizer: str, weights: str, context: int) -> ModelDigests:
    """Check an "hf" run's files against each other and digest them.

    Args:
        hf_config: path of the model's ``config.json``, or its keys inline (``[run.model.hf]``).
        tokenizer: path of a ``tokenizer.json``; "" = bytes (token id = byte value).
        weights: folder of ``*.safetensors`` base weights; "" = a seeded init.
        context: tokens per training sequence (at most the config's position limit).

    Raises:
        ModelFileError: a file is missing or malformed, the tokenizer's ids do not fit the model's
            vocabulary, or ``context`` exceeds the model's positions.
    """
    if isinstance(hf_config, dict):
        where = "[run.model.hf]"
        facts = hf_config_facts(hf_config, where)
    else:
        where, facts = f"model.hf_config {hf_config}", read_hf_config(hf_config)
    token_digest, vocab = ("", 256) if not tokenizer else read_tokenizer(tokenizer)
    source = f"the tokenizer {tokenizer}" if tokenizer else "bytes (no model.tokenizer)"
    if vocab > facts.vocab_size:
        raise ModelFileError(
            f"{source} has {vocab} tokens but {where} has vocab_size {facts.vocab_size}; "
            "use the model's own tokenizer or set vocab_size in config.json to at least that"
        )
    if facts.max_positions is not None and context > facts.max_positions:
        raise ModelFileError(
            f"model.context {context} exceeds the {facts.max_positions} positions of {where}; lower model.context"
        )
    return ModelDigests(facts.digest, token_digest, weights_digest(weights) if weights else "")

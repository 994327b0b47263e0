"""The efficiency benchmark's model, either family: the built-in byte GPT or a small Llama-shaped "hf" model.

``benchmarks/efficiency.py --family hf`` writes, into its scratch folder, what a user of
``[run.model] family = "hf"`` brings: a Llama-shaped ``config.json`` (``--n-layer`` blocks, width
``--d-model``, ``--n-head`` heads and half as many key/value heads, an MLP twice the width) and a
byte-level BPE ``tokenizer.json`` of ``HF_VOCAB`` tokens trained on the benchmark's own training
bytes (never the held-out ones). With ``--lora`` the base is the seeded init saved as safetensors
(``model.weights``; not pretrained) and only LoRA adapters (rank ``LORA_RANK`` on ``LORA_TARGETS``)
train, as ``[run.lora]`` does.

``BenchmarkModel`` is what the central, alone and swarm runs share: the run's model section, its
``[run.model]`` / ``[run.lora]`` TOML, the model built exactly as a node builds it
(``build_run_model``), and the token batches a node would draw from the same bytes (the node's
``RunTokenizer``; bytes for the built-in GPT, where they equal ``ByteBatches``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from node.config import ModelConfig
from node.data import TokenBatches
from node.model import build_run_model
from node.model_config import LoraConfig
from node.tokens import RunTokenizer

HF_VOCAB = 512  # tokens of the benchmark's BPE tokenizer (256 byte symbols and 256 merges)
LORA_RANK, LORA_ALPHA, LORA_TARGETS = 8, 16, ("q_proj", "v_proj")  # the adapters of --lora
FLOAT32_BYTES = 4


@dataclass
class BenchmarkModel:
    """The model of one benchmark invocation, identical in the central, alone and swarm runs."""

    config: ModelConfig  # the run's [run.model]
    lora: LoraConfig | None  # the run's [run.lora]; None: every parameter trains
    tokenizer: RunTokenizer  # bytes, or the benchmark's tokenizer.json

    def build(self, seed: int) -> torch.nn.Module:
        """The model a node of this run builds from ``seed`` (base weights and adapters included)."""
        return build_run_model(self.config, seed, lora=self.lora)

    def batches(self, data: bytes, batch_size: int, seed: int) -> TokenBatches:
        """Windows of ``context + 1`` tokens of ``data``, tokenized as a node tokenizes its bytes."""
        return TokenBatches(self.tokenizer.encode(data), self.config.context, batch_size, seed)

    def facts(self) -> dict[str, Any]:
        """The JSON fields of the model: ``family``, ``lora`` (its settings, or None), ``parameters``
        (trainable), ``model_bytes`` (float32, base included), ``adapter_bytes`` (float32 adapters, or None)."""
        model = self.build(seed=0)
        trainable = sum(p.numel() for p in model.parameters())
        # what a checkpoint of the whole model holds: parameters and the frozen base, tied tensors once
        saved = {t.data_ptr(): t.numel() for t in model.state_dict().values() if t.is_floating_point()}
        return {
            "family": self.config.family,
            "lora": None if self.lora is None else dataclasses.asdict(self.lora),
            "parameters": trainable,
            "model_bytes": FLOAT32_BYTES * sum(saved.values()),
            "adapter_bytes": None if self.lora is None else FLOAT32_BYTES * trainable,
        }

    def toml(self) -> str:
        """The ``[run.model]`` section (and ``[run.lora]``) of the swarm's run.toml."""
        model = self.config
        if model.family != "hf":
            lines = [f"n_layer = {model.n_layer}", f"n_head = {model.n_head}", f"d_model = {model.d_model}"]
            return "[run.model]\n" + "\n".join([*lines, f"context = {model.context}"]) + "\n"
        paths = {"hf_config": model.hf_config, "tokenizer": model.tokenizer, "weights": model.weights}
        lines = ['family = "hf"', f"context = {model.context}"]
        lines += [f"{key} = {json.dumps(value)}" for key, value in paths.items() if value]
        text = "[run.model]\n" + "\n".join(lines) + "\n"
        if self.lora is not None:
            text += f"\n[run.lora]\nr = {self.lora.r}\nalpha = {self.lora.alpha}\n"
            text += f"target_modules = {json.dumps(self.lora.target_modules)}\n"
        return text


def gpt_model(n_layer: int, n_head: int, d_model: int, context: int) -> BenchmarkModel:
    """The built-in byte GPT (``--family zen-gpt``)."""
    config = ModelConfig(n_layer=n_layer, n_head=n_head, d_model=d_model, context=context)
    return BenchmarkModel(config, None, RunTokenizer())


def hf_model(folder: Path, train: bytes, shape: dict[str, int], lora: bool, seed: int) -> BenchmarkModel:
    """A Llama-shaped model and a BPE tokenizer trained on ``train``, written to ``folder`` (``--family hf``).

    Args:
        folder: where config.json, tokenizer.json and (``lora``) the base's safetensors go; created.
        train: the benchmark's training bytes (the tokenizer learns its merges from them).
        shape: ``n_layer``, ``n_head``, ``d_model`` and ``context`` (tokens per sequence).
        lora: train LoRA adapters on a frozen base (the seeded init, saved as ``model.weights``).
        seed: the run's seed (the base's init).
    """
    folder.mkdir(parents=True, exist_ok=True)
    hf_config = write_llama_config(folder, shape)
    tokenizer = write_tokenizer(folder / "tokenizer.json", train)
    config = ModelConfig(family="hf", context=shape["context"], hf_config=str(hf_config), tokenizer=str(tokenizer))
    if not lora:
        return BenchmarkModel(config, None, RunTokenizer(tokenizer))
    weights = write_base_weights(folder / "base", config, seed)
    config = ModelConfig(
        family="hf", context=config.context, hf_config=str(hf_config), tokenizer=str(tokenizer), weights=str(weights)
    )
    lora_config = LoraConfig(r=LORA_RANK, alpha=LORA_ALPHA, target_modules=list(LORA_TARGETS))
    return BenchmarkModel(config, lora_config, RunTokenizer(tokenizer))


def write_llama_config(folder: Path, shape: dict[str, int]) -> Path:
    """A Llama ``config.json`` of ``shape``: key/value heads half the heads (at least 1), MLP twice the width."""
    from transformers import LlamaConfig

    LlamaConfig(
        vocab_size=HF_VOCAB,
        hidden_size=shape["d_model"],
        intermediate_size=2 * shape["d_model"],
        num_hidden_layers=shape["n_layer"],
        num_attention_heads=shape["n_head"],
        num_key_value_heads=max(1, shape["n_head"] // 2),
        max_position_embeddings=max(128, shape["context"]),
    ).save_pretrained(folder)
    return folder / "config.json"


def write_tokenizer(path: Path, text: bytes) -> Path:
    """A byte-level BPE ``tokenizer.json`` of ``HF_VOCAB`` tokens trained on ``text`` (decoded as a node does)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=HF_VOCAB, initial_alphabet=alphabet, show_progress=False)
    tokenizer.train_from_iterator([text.decode("utf-8", errors="replace")], trainer)
    tokenizer.save(str(path))
    return path


def write_base_weights(folder: Path, config: ModelConfig, seed: int) -> Path:
    """The seeded init of ``config``'s model as ``model.safetensors`` in ``folder``: the frozen base of --lora."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model: Any = build_run_model(config, seed)
    tensors = {name: p.detach().contiguous() for name, p in model.hf_model.named_parameters()}
    save_file(tensors, str(folder / "model.safetensors"))
    return folder

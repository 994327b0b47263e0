"""Our byte-level GPT (node/model.py) as transformers' ``GPT2LMHeadModel``, and bytes as a tokenizer.

The two are the same network: pre-norm blocks, LayerNorm (eps 1e-5), learned positions, exact
(erf) GELU, a fused q/k/v projection split in that order, heads split the same way, attention
scaled by 1/sqrt(head width), and a head tied to the token embedding. Only the layout differs:
GPT-2's ``Conv1D`` keeps a weight as (in, out), the transpose of ``nn.Linear``'s (out, in).

The tokenizer is byte-level with token id = byte value: a BPE with the 256 byte symbols of
GPT-2's byte-to-unicode table as its vocabulary and no merges, behind a ByteLevel pre-tokenizer
(no prefix space, no regex split) and decoder, so ``AutoTokenizer`` encodes text to its UTF-8
bytes and decodes any byte sequence (invalid UTF-8 becomes U+FFFD).
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from node.config import ModelConfig
from node.model import GPT

# our Linear layers -> GPT-2's Conv1D layers (weights transposed), per block
_LINEARS = {"qkv": "attn.c_attn", "proj": "attn.c_proj", "mlp.0": "mlp.c_fc", "mlp.2": "mlp.c_proj"}
_NORMS = {"ln_1": "ln_1", "ln_2": "ln_2"}


def gpt2_config(model: ModelConfig) -> GPT2Config:
    """The GPT-2 config of the same shape as ``model``, with no dropout and no special tokens."""
    return GPT2Config(
        vocab_size=model.vocab_size,
        n_positions=model.context,
        n_embd=model.d_model,
        n_layer=model.n_layer,
        n_head=model.n_head,
        n_inner=4 * model.d_model,
        activation_function="gelu",  # exact erf GELU, as nn.GELU()
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def gpt2_state_dict(gpt: GPT) -> dict[str, torch.Tensor]:
    """``gpt``'s parameters under GPT2LMHeadModel's names and layout."""
    ours = {name: p.detach().cpu() for name, p in gpt.named_parameters()}
    theirs = {
        "transformer.wte.weight": ours["wte.weight"],
        "transformer.wpe.weight": ours["wpe.weight"],
        "transformer.ln_f.weight": ours["ln_f.weight"],
        "transformer.ln_f.bias": ours["ln_f.bias"],
        "lm_head.weight": ours["wte.weight"],  # tied
    }
    for i in range(len(gpt.blocks)):
        for mine, hf in _NORMS.items():
            for kind in ("weight", "bias"):
                theirs[f"transformer.h.{i}.{hf}.{kind}"] = ours[f"blocks.{i}.{mine}.{kind}"]
        for mine, hf in _LINEARS.items():
            theirs[f"transformer.h.{i}.{hf}.weight"] = ours[f"blocks.{i}.{mine}.weight"].T.contiguous()
            theirs[f"transformer.h.{i}.{hf}.bias"] = ours[f"blocks.{i}.{mine}.bias"]
    return theirs


def to_gpt2(gpt: GPT) -> GPT2LMHeadModel:
    """A GPT2LMHeadModel (eval mode) that computes the same logits as ``gpt``."""
    model = GPT2LMHeadModel(gpt2_config(gpt.config))
    mapped = gpt2_state_dict(gpt)
    expected = set(model.state_dict())
    if set(mapped) != expected:  # a transformers version with other names: fail loudly, not silently
        raise RuntimeError(f"GPT-2 layout mismatch: {sorted(set(mapped) ^ expected)[:6]}")
    model.load_state_dict(mapped, strict=True)
    if model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr():
        raise RuntimeError("GPT2LMHeadModel did not tie its head to the token embedding")
    return model.eval()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: each byte to a printable unicode character (printable ASCII and Latin-1 map to
    themselves, the rest to U+0100 onward)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_tokenizer(context: int) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with token id = byte value and no special tokens."""
    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, model_max_length=context, clean_up_tokenization_spaces=False
    )

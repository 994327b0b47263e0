"""Record-level DP (DP-SGD) with the "hf" family: exact per-example gradients of Llama-, Qwen2-, Mistral- and
GPT-2-shaped models and of LoRA adapters, Opacus' clipping in chunks, records as token windows with the sampling
rate they give, a run's config accepted, a model vmap cannot run refused in one line, and a short DP-SGD phase on
real text that lowers the loss.

Tiny models are built from inline config keys (nothing is fetched from a hub); the tokenizer is trained here.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import write_run_config

from node.config import ConfigError, load_node_config, run_config_from_dict
from node.model import build_run_model
from node.tokens import RunTokenizer
from node.training.dpsgd import DPSGDStep, RecordSampler
from node.training.inner import inner_phase
from node.training.privacy import TrainerPrivacy, setup_record_privacy

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SHAKESPEARE = Path("/work/shared/data/tinyshakespeare.txt")  # read in place, never copied into the repo
VOCAB = 320
CONTEXT = 16
LLAMA = {
    "model_type": "llama",
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
GPT2 = {"model_type": "gpt2", "vocab_size": VOCAB, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64}
GPT2 |= {"bos_token_id": 0, "eos_token_id": 0}  # GPT-2's default 50256 is outside a tiny vocabulary: warned
SHAPES: dict[str, tuple[dict[str, Any], dict[str, Any] | None]] = {  # (model.hf keys, [run.lora])
    "llama": (LLAMA, None),
    "llama-tied": ({**LLAMA, "tie_word_embeddings": True}, None),
    "qwen2": ({**LLAMA, "model_type": "qwen2"}, None),
    "mistral": ({**LLAMA, "model_type": "mistral"}, None),
    "gpt2": (GPT2, None),
    "llama-lora": (LLAMA, {"r": 4}),
    "gpt2-lora": (GPT2, {"r": 4}),  # GPT-2's Conv1D: peft's adapters transposed (fan_in_fan_out)
}


def hf_model(shape: str, seed: int = 0) -> torch.nn.Module:
    keys, lora = SHAPES[shape]
    run = run_config_from_dict({"model": {"family": "hf", "context": CONTEXT, "hf": keys}, "lora": lora or {}})
    return build_run_model(run.model, seed, lora=run.lora)


def sgd_step(model: torch.nn.Module, clip_norm: float, noise_multiplier: float = 0.0) -> DPSGDStep:
    """DP-SGD with plain SGD at lr 1 over random token records: the parameters move by -(clipped sum + noise) / B."""
    tokens = torch.randint(0, VOCAB, (40 * (CONTEXT + 1),), generator=torch.Generator().manual_seed(7))
    sampler = RecordSampler(tokens, CONTEXT, expected_batch=4, seed=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    return DPSGDStep(model, optimizer, sampler, noise_multiplier, clip_norm, torch.device("cpu"))


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def write_tokenizer(path: Path, text: str, vocab: int) -> Path:
    """A byte-level BPE ``tokenizer.json`` of ``vocab`` tokens, trained on ``text``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=alphabet, show_progress=False)
    tokenizer.train_from_iterator([text], trainer)
    tokenizer.save(str(path))
    return path


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_per_example_gradients_of_hf_models_are_exact_and_clipped_to_c(shape: str) -> None:
    """Each example's gradient through the DP-SGD path equals one backward of that example alone (tied head, RMSNorm,
    rotary positions, Conv1D, adapters); without noise a step applies their sum, each clipped to norm C."""
    # Prepare
    model = hf_model(shape)
    step = sgd_step(model, clip_norm=0.05)
    tokens, targets = step.sampler.records[:3, :-1], step.sampler.records[:3, 1:]

    # Execute
    grads, loss = step.per_example_gradients(tokens, targets)
    alone = []
    for i in range(3):
        model.zero_grad()
        model(tokens[i : i + 1], targets[i : i + 1]).backward()
        alone.append({name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None})
    mean_loss = model(tokens, targets).item()
    model.zero_grad(set_to_none=True)
    before = flat(model)
    step.step_on(tokens, targets)
    moved = (before - flat(model)) * step.optimizer.expected_batch_size

    # Assert
    clipped = []
    for i in range(3):
        assert alone[i].keys() == grads.keys() == dict(model.named_parameters()).keys()
        for name in grads:
            torch.testing.assert_close(grads[name][i], alone[i][name], rtol=1e-4, atol=1e-6, msg=name)
        example = torch.cat([grads[name][i].reshape(-1) for name, _ in model.named_parameters()])
        clipped.append(example * min(1.0, 0.05 / (float(example.norm()) + 1e-6)))
        assert float(clipped[-1].norm()) <= 0.05 * (1 + 1e-5)
    torch.testing.assert_close(moved, sum(clipped), rtol=1e-3, atol=1e-6)  # float32 rounding of weights ~1
    assert float(moved.norm()) <= 3 * 0.05 * (1 + 1e-5)
    assert loss == pytest.approx(mean_loss, rel=1e-5)
    if SHAPES[shape][1] is not None:  # LoRA: per-example gradients of the adapters alone, the base frozen
        assert grads and all("lora_" in name for name in grads)


def test_a_step_in_chunks_equals_the_step_on_the_whole_batch() -> None:
    """Opacus clips chunk by chunk into one clipped sum (its skipped steps): one example at a time moves the model
    exactly as the whole batch at once, and the noise is added once."""
    # Prepare
    moves = []

    # Execute
    for chunk in (1, 64):
        model = hf_model("llama")
        step = sgd_step(model, clip_norm=0.05)
        step.chunk = chunk
        before = flat(model)
        step.step_on(step.sampler.records[:5, :-1], step.sampler.records[:5, 1:])
        moves.append(flat(model) - before)

    # Assert
    torch.testing.assert_close(moves[0], moves[1], rtol=1e-4, atol=1e-8)
    assert float(moves[0].norm()) > 0


def test_lora_dropout_draws_a_mask_per_example() -> None:
    """LoRA's dropout is random inside vmap: DP-SGD runs it (randomness "different") and its steps stay clipped."""
    # Prepare
    run = run_config_from_dict({"model": {"family": "hf", "hf": LLAMA}, "lora": {"r": 4, "dropout": 0.5}})
    model = build_run_model(run.model, seed=0, lora=run.lora)
    step = sgd_step(model, clip_norm=0.05)
    tokens, targets = step.sampler.records[:4, :-1], step.sampler.records[:4, 1:]

    # Execute
    before = flat(model)
    step.step_on(tokens, targets)

    # Assert
    moved = (before - flat(model)) * step.optimizer.expected_batch_size
    assert 0 < float(moved.norm()) <= 4 * 0.05 * (1 + 1e-5)


def test_hf_runs_with_record_level_dp_are_accepted() -> None:
    """A run with model.family = "hf" and privacy at the default record level loads, with and without LoRA."""
    # Prepare
    privacy = {"enabled": True, "noise_multiplier": 1.0}

    # Execute
    full = run_config_from_dict({"model": {"family": "hf", "hf": LLAMA}, "privacy": privacy})
    lora = run_config_from_dict({"model": {"family": "hf", "hf": LLAMA}, "privacy": privacy, "lora": {"r": 4}})

    # Assert
    assert full.privacy.level == lora.privacy.level == "record" and lora.lora.active


def test_records_are_token_windows_and_the_sample_rate_counts_them(tmp_path: Path) -> None:
    """With a tokenizer, a record is a window of context + 1 of the text's token ids: the sampler holds exactly
    those windows, and q = expected batch / token windows (the text's byte windows would be several times more)."""
    # Prepare
    text = ("Now is the winter of our discontent made glorious summer by this sun of York. " * 60).encode()
    tokenizer = write_tokenizer(tmp_path / "tokenizer.json", text.decode(), VOCAB)
    model = {"family": "hf", "context": CONTEXT, "hf": LLAMA, "tokenizer": str(tokenizer)}
    config = write_run_config(tmp_path / "run.toml", model=model, privacy={"enabled": True, "noise_multiplier": 1.0})
    node = load_node_config(config)
    net = build_run_model(node.run.model, seed=0)

    # Execute
    privacy = TrainerPrivacy.create(node, net, torch.optim.AdamW(net.parameters()), text, batch_size=2)

    # Assert
    assert privacy.dpsgd is not None and privacy.steps is not None
    ids = RunTokenizer(tokenizer).encode(text)
    windows = len(ids) // (CONTEXT + 1)
    assert privacy.dpsgd.sampler.count == windows < len(text) // (CONTEXT + 1) / 2
    assert torch.equal(privacy.dpsgd.sampler.records.reshape(-1), ids[: windows * (CONTEXT + 1)])
    expected_batch = 2 * node.run.privacy.batch_scale
    assert privacy.dpsgd.sampler.sample_rate == privacy.steps.sample_rate == expected_batch / windows


def test_a_model_vmap_cannot_run_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """A forward with data-dependent control flow (no per-example gradients) is refused at set-up, naming the
    model type and the fix, before the node would join."""
    # Prepare
    run = run_config_from_dict(
        {"model": {"family": "hf", "hf": LLAMA}, "privacy": {"enabled": True, "noise_multiplier": 1}}
    )
    model = build_run_model(run.model, seed=0)
    norm = model.hf_model.model.norm
    monkeypatch.setattr(norm, "forward", lambda x: x if bool(x.sum() > 0) else -x)
    tokens = torch.randint(0, VOCAB, (400,), generator=torch.Generator().manual_seed(0))

    # Execute
    with pytest.raises(ConfigError) as refused:
        setup_record_privacy(run, model, torch.optim.AdamW(model.parameters()), tokens, 4, torch.device("cpu"), 0.0)

    # Assert
    message = str(refused.value)
    assert "\n" not in message and 'model_type "llama"' in message and 'privacy.level = "user"' in message


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"{SHAKESPEARE} (real text) is not on this machine")
def test_record_dp_inner_steps_lower_an_hf_models_loss_on_real_text(tmp_path: Path) -> None:
    """The trainer's inner phase with DP-SGD (sigma 0.7, C 1) on a Llama-shaped model and BPE token windows of
    tinyshakespeare: the mean loss over fixed training records falls (5.7 -> 4.5 in three runs)."""
    # Prepare
    text = SHAKESPEARE.read_bytes()[:60_000]
    tokenizer = write_tokenizer(tmp_path / "tokenizer.json", text.decode(), VOCAB)
    model_table = {"family": "hf", "context": 32, "hf": LLAMA, "tokenizer": str(tokenizer)}
    privacy_table = {"enabled": True, "noise_multiplier": 0.7, "clip_norm": 1.0}
    train_table = {"inner_steps": 20, "batch_size": 8}
    config = write_run_config(tmp_path / "run.toml", model=model_table, privacy=privacy_table, train=train_table)
    node = load_node_config(config)
    model = build_run_model(node.run.model, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    privacy = TrainerPrivacy.create(node, model, optimizer, text, batch_size=8)
    assert privacy.dpsgd is not None and privacy.inner_step is not None
    held = privacy.dpsgd.sampler.records[:64]

    def loss() -> float:
        with torch.no_grad():
            return float(model(held[:, :-1], held[:, 1:]))

    # Execute
    before = loss()
    losses = inner_phase(
        model,
        optimizer,
        None,  # type: ignore[arg-type]  # DP-SGD draws its own Poisson samples
        torch.device("cpu"),
        node.run.train,
        threading.Event(),
        step=privacy.inner_step,
        steps=privacy.phase_steps(node.run.train.inner_steps),
    )
    after = loss()

    # Assert
    assert len(losses) == 20 and privacy.spent == 20 and 0 < privacy.epsilon()
    assert after < before - 0.5, (before, after)

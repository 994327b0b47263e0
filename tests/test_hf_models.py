"""The "hf" model family: a transformers causal LM from local files, its tokenizer, hash, swarm and export.

A tiny Llama-shaped model (2 layers, width 64) and a BPE tokenizer trained here on the test's own
text stand in for a real base. Nothing is fetched from a hub (offline).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO_ROOT, ZEN_NODE, NodeProcess, write_run_config

from node.aggregation.hierarchy import ParameterPartition, partition_parameters
from node.config import (
    CohortConfig,
    ConfigError,
    RunConfig,
    describe_difference,
    load_node_config,
    run_config_from_dict,
)
from node.data import generate_corpus
from node.export.writer import export_run
from node.model import build_run_model
from node.model_hf import load_weights_into
from node.tokens import RunTokenizer
from node.training.admission import ConfigMismatchError, refuse_mismatched
from node.training.checkpoint import Checkpoint, load_round_params

os.environ["HF_HUB_OFFLINE"] = "1"  # a local folder loads offline; nothing may come from a hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

CORPUS = generate_corpus(3 * 20_000, seed=3)
VOCAB = 320  # the tokenizer's and the model's vocabulary


def write_tokenizer(path: Path, text: bytes, vocab: int = VOCAB) -> Path:
    """A byte-level BPE ``tokenizer.json`` of ``vocab`` tokens, trained on ``text``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=alphabet, show_progress=False)
    tokenizer.train_from_iterator([text.decode()], trainer)
    tokenizer.save(str(path))
    return path


LLAMA = {  # the keys of write_llama_config's config.json that say the shape (the rest are transformers' defaults)
    "model_type": "llama",
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}


def write_llama_config(folder: Path, vocab: int = VOCAB) -> Path:
    """A Llama-shaped ``config.json``: 2 layers, width 64, 4 heads (2 key/value heads)."""
    folder.mkdir(parents=True, exist_ok=True)
    transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    ).save_pretrained(folder)
    return folder / "config.json"


def write_weights(folder: Path, run: RunConfig, seed: int) -> Path:
    """A ``model.safetensors`` base of ``run``'s model, initialised by ``seed``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model = build_run_model(run.model, seed)
    tensors = {name: p.detach().contiguous() for name, p in model.hf_model.named_parameters()}
    save_file(tensors, folder / "w.safetensors")
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny Llama config and a tokenizer trained on the test corpus, in one folder."""
    folder = tmp_path_factory.mktemp("base")
    return {
        "hf_config": str(write_llama_config(folder)),
        "tokenizer": str(write_tokenizer(folder / "tokenizer.json", CORPUS)),
    }


def hf_run(**model: object) -> RunConfig:
    return run_config_from_dict({"model": {"family": "hf", "context": 32, **model}})


def test_the_run_hash_covers_the_files_content_not_their_paths(files: dict[str, str], tmp_path: Path) -> None:
    """Copies of the files elsewhere give the same hash; another tokenizer gives another, with the field named."""
    # Prepare
    copy = tmp_path / "copy"
    copy.mkdir()
    moved = {key: str(copy / Path(path).name) for key, path in files.items()}
    for key, path in files.items():
        Path(moved[key]).write_bytes(Path(path).read_bytes())
    other_tokenizer = write_tokenizer(tmp_path / "other.json", CORPUS, vocab=300)

    # Execute
    here, there = hf_run(**files), hf_run(**moved)
    other = hf_run(hf_config=files["hf_config"], tokenizer=str(other_tokenizer))
    theirs = json.loads(json.dumps(other.shared_dict()))

    # Assert
    assert here.digest() == there.digest()
    assert here.model.config_digest and here.model.tokenizer_digest and here.model.weights_digest == ""
    assert "hf_config" not in here.shared_dict()["model"] and files["tokenizer"].encode() not in here.to_bytes()
    assert other.digest() != here.digest()
    assert describe_difference(here, theirs).startswith("model.tokenizer_digest: ours")
    assert "family" not in RunConfig().shared_dict()["model"]  # the built-in GPT's hash is as before


def test_a_peer_with_other_base_weights_is_refused_with_the_field_named(
    files: dict[str, str], tmp_path: Path, identity_factory, record_factory
) -> None:
    """Two bases of one shape: a peer announcing the other one is refused, naming model.weights_digest."""
    # Prepare
    seeded = hf_run(**files)
    ours = hf_run(**files, weights=str(write_weights(tmp_path / "a", seeded, seed=1)))
    theirs = hf_run(**files, weights=str(write_weights(tmp_path / "b", seeded, seed=2)))
    peer = record_factory(identity_factory("peer"), run_hash=theirs.digest(), run_config=theirs.to_bytes())

    # Execute
    with pytest.raises(ConfigMismatchError) as refused:
        refuse_mismatched(ours, ours.digest(), [peer])

    # Assert
    assert "model.weights_digest: ours" in str(refused.value)
    assert "model.config_digest" not in str(refused.value) and "model.tokenizer_digest" not in str(refused.value)


def _write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


BROKEN = {
    "missing config": (lambda t, f: {"hf_config": str(t / "nope" / "config.json")}, "does not exist"),
    "config not JSON": (lambda t, f: {"hf_config": _write(t / "c.json", "{oops")}, "not readable JSON"),
    "config not a model": (lambda t, f: {"hf_config": _write(t / "c.json", "{}")}, 'no "model_type"'),
    "unknown model type": (
        lambda t, f: {"hf_config": _write(t / "c.json", '{"model_type": "nonesuch", "vocab_size": 300}')},
        "not a config transformers builds",
    ),
    "inline keys not a model": (lambda t, f: {"hf": {"vocab_size": 300}}, "[run.model.hf] is not a transformers"),
    "inline keys and a file": (lambda t, f: {"hf_config": f["hf_config"], "hf": LLAMA}, "not both"),
    "inline unknown model type": (
        lambda t, f: {"hf": {"model_type": "nonesuch", "vocab_size": 300}},
        "[run.model.hf] is not a config transformers builds",
    ),
    "missing tokenizer": (lambda t, f: {**f, "tokenizer": str(t / "tok.json")}, "model.tokenizer"),
    "tokenizer not JSON": (lambda t, f: {**f, "tokenizer": _write(t / "tok.json", "[1, 2")}, "not readable JSON"),
    "tokenizer too big": (
        lambda t, f: {"hf_config": str(write_llama_config(t / "small", vocab=300)), "tokenizer": f["tokenizer"]},
        "has 320 tokens but",
    ),
    "missing weights": (lambda t, f: {**f, "weights": str(t / "w")}, "does not exist"),
    "weights without safetensors": (lambda t, f: {**f, "weights": str((t / "c.json").parent)}, "no *.safetensors"),
    "damaged weights": (
        lambda t, f: {**f, "weights": str(Path(_write(t / "w" / "model.safetensors", "garbage!garbage")).parent)},
        "is not a safetensors file",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_model_file_gets_a_one_line_error_naming_it(case: str, files: dict[str, str], tmp_path: Path) -> None:
    """Each broken path or file stops the node at load (or model build) with one line naming the file."""
    # Prepare
    make, expected = BROKEN[case]
    (tmp_path / "c.json").write_text("{}")
    model = make(tmp_path, files)
    config = write_run_config(tmp_path / "run.toml", model={"family": "hf", **model})

    # Execute
    with pytest.raises(ConfigError) as error:
        build_run_model(load_node_config(str(config)).run.model, seed=0)

    # Assert
    message = str(error.value)
    assert expected in message and "\n" not in message
    paths = [str(Path(path).expanduser()) for path in model.values() if isinstance(path, str)]
    assert any(path in message for path in paths) or "[run.model.hf]" in message


def test_inline_config_keys_build_the_files_model_under_the_same_hash(files: dict[str, str], tmp_path: Path) -> None:
    """``[run.model.hf]`` keys and a config.json of the same keys: one config digest, run hash and initial model;
    the keys stay out of the record (their digest is in it); the built-in GPT refuses them."""
    # Prepare
    config_json = Path(_write(tmp_path / "same" / "config.json", json.dumps(LLAMA)))
    inline_toml = write_run_config(tmp_path / "inline.toml", model={"family": "hf", "hf": LLAMA, "context": 32})
    file_toml = write_run_config(tmp_path / "file.toml", model={"family": "hf", "hf_config": str(config_json)})

    # Execute
    inline, from_file = (load_node_config(str(path)).run for path in (inline_toml, file_toml))
    models = [build_run_model(run.model, seed=0) for run in (inline, from_file)]
    with pytest.raises(ConfigError) as refused:
        run_config_from_dict({"model": {"hf": LLAMA}})

    # Assert
    assert inline.model.config_digest == from_file.model.config_digest != ""
    assert inline.digest() == from_file.digest()
    assert "hf" not in inline.shared_dict()["model"] and b"intermediate_size" not in inline.to_bytes()
    assert models[0].hf_model.config.num_key_value_heads == 2
    pairs = zip(models[0].parameters(), models[1].parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert "need model.family = 'hf'" in str(refused.value)


def test_another_shape_of_base_and_unsupported_combinations_are_refused(files: dict[str, str], tmp_path: Path) -> None:
    """Weights of another shape fail at build; sharding with "hf" fails at load; each in one line (record-level DP
    with "hf" is accepted: tests/test_dpsgd_hf.py)."""
    # Prepare
    other = hf_run(hf_config=str(write_llama_config(tmp_path / "wide", vocab=400)))
    weights = write_weights(tmp_path / "wide-weights", other, seed=0)

    # Execute
    with pytest.raises(ConfigError) as shape:
        build_run_model(hf_run(**files, weights=str(weights)).model, seed=0)
    with pytest.raises(ConfigError) as sharded:
        run_config_from_dict({"model": {"family": "hf", **files}, "sharding": {"stages": 1}})

    # Assert
    assert "model.weights" in str(shape.value) and "\n" not in str(shape.value)
    assert "sharding.stages = 0" in str(sharded.value)


def test_the_adapter_computes_transformers_loss_and_loads_the_base(files: dict[str, str], tmp_path: Path) -> None:
    """``model(tokens, targets)`` is the wrapped model's own shifted loss; a base's weights are loaded exactly."""
    # Prepare
    seeded = hf_run(**files)
    weights = write_weights(tmp_path / "base", seeded, seed=5)
    run = hf_run(**files, weights=str(weights))
    ids = RunTokenizer.for_model(run.model).encode(CORPUS[:2000])[:66].view(2, 33)

    # Execute
    model = build_run_model(run.model, seed=0)
    ours = model(ids[:, :-1], ids[:, 1:])
    theirs = model.hf_model(input_ids=ids, labels=ids).loss
    logits = model(ids[:, :-1])
    from safetensors.torch import load_file

    saved = load_file(weights / "w.safetensors")

    # Assert
    assert torch.allclose(ours, theirs, atol=1e-5), (float(ours), float(theirs))
    assert logits.shape == (2, 32, VOCAB)
    assert all(torch.equal(p, saved[name]) for name, p in model.hf_model.named_parameters())
    assert not torch.equal(next(build_run_model(seeded.model, seed=0).parameters()), saved["model.embed_tokens.weight"])


def test_the_cli_refuses_a_missing_config_json_in_one_line(tmp_path: Path) -> None:
    """`zen-node join` with a missing config.json exits 2 with one line naming it, no traceback."""
    # Prepare
    config = write_run_config(tmp_path / "run.toml", model={"family": "hf", "hf_config": str(tmp_path / "none.json")})
    (tmp_path / "data.txt").write_bytes(CORPUS[:5000])

    # Execute
    result = subprocess.run(
        [*ZEN_NODE, "join", "--config", str(config), "--data", str(tmp_path / "data.txt"), "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )

    # Assert
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert str(tmp_path / "none.json") in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft on transformers 5
def test_lora_trains_only_the_adapters_and_exports_merged_and_alone(files: dict[str, str], tmp_path: Path) -> None:
    """With [run.lora] the parameters are the adapters (the base stays bit for bit); the export loads with
    transformers (adapters merged) and with peft (adapters on the base), both giving the trained logits."""
    # Prepare
    seeded = hf_run(**files)
    weights = write_weights(tmp_path / "base", seeded, seed=5)
    run = run_config_from_dict(
        {"model": {"family": "hf", "context": 32, "weights": str(weights), **files}, "lora": {"r": 4}}
    )
    model = build_run_model(run.model, seed=0, lora=run.lora)
    base = {name: b.clone() for name, b in model.named_buffers()}
    ids = RunTokenizer.for_model(run.model).encode(CORPUS[:4000])[:330].view(10, 33)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    workdir, out = tmp_path / "work", tmp_path / "export"
    workdir.mkdir()

    # Execute
    for _ in range(3):
        optimizer.zero_grad()
        model(ids[:, :-1], ids[:, 1:]).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        trained = model(ids[:, :-1])
    Checkpoint(
        run_hash=run.digest(),
        round=1,
        global_params=[p.detach().clone() for p in model.parameters()],
        outer_opt={},
        inner_opt={},
        data_rng=torch.Generator().get_state(),
    ).save(workdir, run=run, peer_id="12D3KooWLoraTest")
    export_run(workdir, out)
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    peft = pytest.importorskip("peft")
    base_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    load_weights_into(base_model, str(weights))
    adapted = peft.PeftModel.from_pretrained(base_model, out / "adapter").eval()

    # Assert
    names = [name for name, _ in model.named_parameters()]
    assert names and all(".lora_A." in name or ".lora_B." in name for name in names)
    assert sum(p.numel() for p in model.parameters()) == 2 * ((4 * 64 + 64 * 4) + (4 * 64 + 32 * 4))  # 2 x (q, v)
    assert all(torch.equal(b, base[name]) for name, b in model.named_buffers())
    assert any(name.endswith("embed_tokens.weight") for name in base)  # the base: buffers, not parameters
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids[:, :-1]).logits, trained, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(adapted(input_ids=ids[:, :-1]).logits, trained, atol=1e-5, rtol=1e-5)
    assert run.digest() != seeded.digest() and "lora" not in seeded.shared_dict()


def test_lora_needs_the_hf_family_and_valid_settings() -> None:
    """LoRA on the built-in GPT, a zero alpha or a bad target list are one-line config errors."""
    # Execute
    errors = []
    for lora in ({"r": 4}, {"r": 4, "alpha": 0}, {"r": 4, "target_modules": "q_proj"}):
        with pytest.raises(ConfigError) as error:
            run_config_from_dict({"lora": lora})
        errors.append(str(error.value))

    # Assert
    assert 'model.family = "hf"' in errors[0]
    assert "lora.alpha" in errors[1] and "lora.target_modules" in errors[2]


@pytest.mark.slow
def test_three_peers_train_a_tiny_llama_securely_and_export_it(
    files: dict[str, str], tmp_path: Path, bootstrap_maddr: str
) -> None:
    """3 secure peers train a Llama-shaped model 3 rounds: identical global params, falling loss; the export
    loads with transformers and computes the swarm's final logits."""
    # Prepare
    config = write_run_config(
        tmp_path / "run.toml", model={"family": "hf", "context": 32, **files}, train={"inner_steps": 6}
    )
    nodes = NodeProcess.on_slices(tmp_path, config, bootstrap_maddr, CORPUS, 3, "--rounds", "3", "--min-peers", "3")
    try:
        # Execute
        codes = [node.wait(240) for node in nodes]
        out = tmp_path / "export"
        exported = subprocess.run(
            [*ZEN_NODE, "export", "--workdir", str(nodes[0].folder / "work"), "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=120,
        )

        # Assert
        assert codes == [0, 0, 0], [node.tail() for node in nodes]
        for round_no in range(1, 4):
            params = [load_round_params(node.params(round_no)) for node in nodes]
            assert all(torch.equal(a, b) for other in params[1:] for a, b in zip(params[0], other, strict=True))
        for node in nodes:
            reports = node.reports()
            assert [r["round"] for r in reports] == [0, 1, 2, 3]
            assert all(r["mode"] == "group" and r["group_size"] == 3 for r in reports[1:])
            assert reports[-1]["eval_loss"] < reports[0]["eval_loss"]
        assert exported.returncode == 0, exported.stderr[-2000:]
        model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(out)
        ids = torch.tensor([tokenizer("the swarm trains a model together")["input_ids"]])
        swarm = build_run_model(load_node_config(str(config)).run.model, seed=0).eval()
        with torch.no_grad():
            for param, value in zip(swarm.parameters(), load_round_params(nodes[0].params(3)), strict=True):
                param.copy_(value)
            assert torch.equal(model(input_ids=ids).logits, swarm(ids))
        assert ids.tolist()[0] == RunTokenizer(files["tokenizer"]).encode(b"the swarm trains a model together").tolist()
    finally:
        for node in nodes:
            node.stop()


@pytest.mark.slow
def test_three_peers_train_lora_adapters_and_never_send_the_base(
    files: dict[str, str], tmp_path: Path, bootstrap_maddr: str
) -> None:
    """3 secure peers train LoRA adapters on a frozen base: identical adapters each round, the round
    parameters are the adapters alone, and a round sends far less than the base."""
    # Prepare
    base_run = hf_run(**files)
    weights = write_weights(tmp_path / "base", base_run, seed=5)
    base_bytes = 4 * sum(p.numel() for p in build_run_model(base_run.model, seed=0).parameters())
    config = write_run_config(
        tmp_path / "run.toml",
        model={"family": "hf", "context": 32, "weights": str(weights), **files},
        train={"inner_steps": 6},
        lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    )
    nodes = NodeProcess.on_slices(tmp_path, config, bootstrap_maddr, CORPUS, 3, "--rounds", "2", "--min-peers", "3")
    try:
        # Execute
        codes = [node.wait(240) for node in nodes]

        # Assert
        assert codes == [0, 0, 0], [node.tail() for node in nodes]
        for round_no in (1, 2):
            params = [load_round_params(node.params(round_no)) for node in nodes]
            assert sum(t.numel() for t in params[0]) == 1792  # the adapters: 2 layers x (q, v), rank 4
            assert all(torch.equal(a, b) for other in params[1:] for a, b in zip(params[0], other, strict=True))
        for node in nodes:
            reports = node.reports()
            assert all(r["mode"] == "group" and r["group_size"] == 3 for r in reports[1:])
            sent = [after["bytes_sent"] - before["bytes_sent"] for before, after in itertools.pairwise(reports)]
            assert all(0 < s < base_bytes / 2 for s in sent), (sent, base_bytes)
            assert reports[-1]["eval_loss"] < reports[0]["eval_loss"]
    finally:
        for node in nodes:
            node.stop()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft on transformers 5
def test_the_efficiency_benchmark_runs_lora_on_a_llama_shape(tmp_path: Path) -> None:
    """`efficiency.py --family hf --lora` runs a tiny swarm and reports the model's fields: the adapters are
    the parameters, and a round sends far less than the base."""
    # Prepare
    data = tmp_path / "corpus.txt"
    data.write_bytes(CORPUS)
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "efficiency.py"), "--data", str(data), "--peers", "3"]
    command += ["--family", "hf", "--lora", "--rounds", "1", "--inner-steps", "3", "--batch-size", "4"]
    command += ["--context", "16", "--eval-every", "3", "--timeout", "120", "--json"]

    # Execute
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=REPO_ROOT)

    # Assert
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["family"] == "hf"
    assert summary["lora"] == {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    assert summary["parameters"] == summary["params"] == 2 * ((8 * 64 + 64 * 8) + (8 * 64 + 32 * 8))  # 2 x (q, v)
    assert summary["adapter_bytes"] == 4 * summary["parameters"] < summary["model_bytes"]
    assert 0 < summary["bytes_per_round_per_peer"] <= summary["swarm_bytes_per_peer"]
    assert summary["bytes_per_round_per_peer"] < summary["model_bytes"] / 2  # the base never goes on the wire
    assert [s for s, _ in summary["swarm_curve"]] == [0, 3 * 3 * 4]
    assert all(math.isfinite(loss) for _, loss in summary["swarm_curve"] + summary["central_curve"])


HF_SHAPES = {  # tiny configs of the three families the cohort rule must read (built from these keys, no download)
    "llama": LLAMA,
    "qwen2": {**LLAMA, "model_type": "qwen2"},
    "gpt2": {"model_type": "gpt2", "vocab_size": VOCAB, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128},
}


@pytest.mark.parametrize("shape", sorted(HF_SHAPES))
def test_the_default_cohort_patterns_tag_hf_models_as_the_built_in_gpt(shape: str) -> None:
    """With the default patterns, an HF model's final norm is local, its decoder layers are cohort params, and its
    embeddings and head are global, as ln_f, blocks.* and wte/wpe are for zen-gpt."""
    # Prepare
    hf_names = [name for name, _ in build_run_model(hf_run(hf=HF_SHAPES[shape]).model, seed=0).named_parameters()]
    gpt_names = [name for name, _ in build_run_model(RunConfig().model, seed=0).named_parameters()]
    cohorts = CohortConfig(enabled=True)

    # Execute
    hf, gpt = partition_parameters(hf_names, cohorts), partition_parameters(gpt_names, cohorts)

    # Assert
    def tagged(partition: ParameterPartition, tag: str) -> set[str]:
        return {partition.names[i] for i in range(len(partition.names)) if partition.tag(i) == tag}

    assert {n.split(".")[0] for n in tagged(gpt, "local")} == {"ln_f"}
    assert {n.split(".")[0] for n in tagged(gpt, "global")} == {"wte", "wpe"}
    final_norm = {
        "llama": "hf_model.model.norm.",
        "qwen2": "hf_model.model.norm.",
        "gpt2": "hf_model.transformer.ln_f.",
    }
    layers = {"llama": "hf_model.model.layers.", "qwen2": "hf_model.model.layers.", "gpt2": "hf_model.transformer.h."}
    assert tagged(hf, "local") and all(n.startswith(final_norm[shape]) for n in tagged(hf, "local"))
    assert tagged(hf, "cohort") == {n for n in hf_names if n.startswith(layers[shape])}
    assert tagged(hf, "global") and all(
        ("embed" in n or "wte" in n or "wpe" in n or "lm_head" in n) for n in tagged(hf, "global")
    )


def test_lora_adapters_on_an_hf_model_are_cohort_params_by_default() -> None:
    """A LoRA run's parameters are the adapters inside the decoder layers: the default rule averages them in the
    cohort (nothing is local, so the rule does not refuse the model)."""
    # Prepare
    run = run_config_from_dict({"model": {"family": "hf", "context": 32, "hf": LLAMA}, "lora": {"r": 4}})
    names = [name for name, _ in build_run_model(run.model, seed=0, lora=run.lora).named_parameters()]

    # Execute
    partition = partition_parameters(names, CohortConfig(enabled=True))

    # Assert
    assert names and all("lora_" in n for n in names)
    assert len(partition.cohort) == len(names) and not partition.local and not partition.global_

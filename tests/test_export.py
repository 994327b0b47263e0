"""Checkpoints and round parameters in safetensors; ``zen-node export`` and ``zen-node generate``.

The export is loaded back with ``transformers.AutoModelForCausalLM`` and must compute our GPT's
logits; broken inputs (a missing or foreign workdir, a damaged or old-format checkpoint) get a
one-line error and leave the checkpoint as it was. Nothing is fetched from a hub (offline).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from helpers import REPO_ROOT, ZEN_NODE, NodeProcess, write_run_config

from node.cli import main
from node.config import ConfigError, ModelConfig, PrivacyConfig, RunConfig, run_config_from_dict
from node.data import generate_corpus
from node.model import GPT, build_model
from node.training.checkpoint import (
    CHECKPOINT_FILE,
    LEGACY_CHECKPOINT_FILE,
    Checkpoint,
    load_round_params,
    round_params_path,
    save_round_params,
)
from node.training.report import REPORT_FILE, RoundOutcome, RoundReport, append_report

os.environ["HF_HUB_OFFLINE"] = "1"  # a local folder loads offline; nothing may come from a hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"

transformers = pytest.importorskip("transformers")

PEER_ID = "12D3KooWExportTestPeer"
OTHER_PEER = "12D3KooWSomeoneElse"
RUN = RunConfig(
    run_id="export-test",
    privacy=PrivacyConfig(enabled=True, target_epsilon=8.0, delta=1e-5, planned_rounds=3),
)


def _trained_state(model: GPT) -> tuple[torch.optim.SGD, torch.optim.AdamW]:
    """An outer SGD and an inner AdamW with real state (one step each), as the trainer keeps them."""
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    outer = torch.optim.SGD(model.parameters(), lr=0.7, momentum=0.9, nesterov=True)
    tokens = torch.randint(0, 256, (2, model.config.context), generator=torch.Generator().manual_seed(1))
    model(tokens, tokens).backward()
    inner.step()
    outer.step()
    return outer, inner


def _checkpoint(model: GPT, run: RunConfig, round_no: int = 3) -> Checkpoint:
    outer, inner = _trained_state(model)
    return Checkpoint(
        run_hash=run.digest(),
        round=round_no,
        global_params=[p.detach().clone() for p in model.parameters()],
        outer_opt=outer.state_dict(),
        inner_opt=inner.state_dict(),
        data_rng=torch.Generator().manual_seed(5).get_state(),
        dp_rounds=2,
    )


def _write_reports(workdir: Path) -> None:
    """Four rounds of a DP run: initial, two group rounds (one naming its peers), one solo round."""
    rows = [
        (0, RoundOutcome.INITIAL, 5.60, 0, None, None),
        (1, RoundOutcome.GROUP, 4.10, 3, None, 0.9),
        (2, RoundOutcome.GROUP, 3.20, 3, [PEER_ID, OTHER_PEER], 1.4),
        (3, RoundOutcome.SOLO, 2.95, 0, None, 1.4),
    ]
    for round_no, mode, loss, group, peers, epsilon in rows:
        report = RoundReport(round_no, mode, loss, loss + 0.1, group, 128, 10.0, 1.0, "00", epsilon=epsilon)
        if peers is None:
            append_report(workdir, report)
        else:  # a later report version may name the group's peers: the card must count them
            with open(workdir / REPORT_FILE, "a") as f:
                f.write(json.dumps({**asdict(report), "peers": peers}) + "\n")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GPT]:
    """A workdir with a checkpoint (run config and PeerID included) and a report, and the model it holds."""
    workdir = tmp_path_factory.mktemp("work")
    model = build_model(RUN.model, seed=11)
    _checkpoint(model, RUN).save(workdir, run=RUN, peer_id=PEER_ID)
    _write_reports(workdir)
    return workdir, model.eval()


@pytest.fixture(scope="module")
def exported(trained: tuple[Path, GPT], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained workdir exported by ``zen-node export`` (in this process)."""
    workdir, _ = trained
    out = tmp_path_factory.mktemp("export") / "model"
    code = main(["export", "--workdir", str(workdir), "--out", str(out), "--display-name", "Ada Lovelace"])
    assert code == 0
    return out


def _one_line_error(stderr: str, *words: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zen-node: error: "), stderr
    for word in words:
        assert word in lines[0], lines[0]


# ---- checkpoints and round parameters at rest -------------------------------------------------------------


def test_checkpoint_round_trips_through_safetensors(tmp_path: Path) -> None:
    """Every field comes back equal, optimizers resume from the loaded state, and the file is no pickle."""
    # Prepare
    model = build_model(RUN.model, seed=3)
    saved = _checkpoint(model, RUN)

    # Execute
    saved.save(tmp_path, run=RUN, peer_id=PEER_ID)
    loaded = Checkpoint.load(tmp_path, RUN.digest())

    # Assert
    raw = (tmp_path / CHECKPOINT_FILE).read_bytes()
    assert raw[:1] != b"\x80" and b'"format":"zen-checkpoint/1"' in raw[:100_000]  # safetensors, not a pickle
    assert not (tmp_path / LEGACY_CHECKPOINT_FILE).exists()
    assert loaded is not None
    assert (loaded.run_hash, loaded.round, loaded.dp_rounds, loaded.peer_id) == (RUN.digest(), 3, 2, PEER_ID)
    assert loaded.run_config is not None and run_config_from_dict(loaded.run_config).digest() == RUN.digest()
    assert all(torch.equal(a, b) for a, b in zip(saved.global_params, loaded.global_params, strict=True))
    assert torch.equal(loaded.data_rng, saved.data_rng) and loaded.data_rng.dtype == torch.uint8
    for before, after in ((saved.outer_opt, loaded.outer_opt), (saved.inner_opt, loaded.inner_opt)):
        assert after["param_groups"] == before["param_groups"]  # tuples (betas) and int keys come back as such
        assert after["state"].keys() == before["state"].keys()
        for index, state in before["state"].items():
            for key, value in state.items():
                assert torch.equal(after["state"][index][key], value), (index, key)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    inner.load_state_dict(loaded.inner_opt)
    outer = torch.optim.SGD(model.parameters(), lr=0.7, momentum=0.9, nesterov=True)
    outer.load_state_dict(loaded.outer_opt)


def test_round_params_round_trip_in_safetensors(tmp_path: Path) -> None:
    """--save-round-params writes rounds/round-NNNNN.safetensors; load_round_params gives back the list."""
    # Prepare
    params = list(build_model(ModelConfig(n_layer=1), seed=2).parameters())

    # Execute
    save_round_params(tmp_path, 7, params)
    loaded = load_round_params(round_params_path(tmp_path, 7))

    # Assert
    assert round_params_path(tmp_path, 7) == tmp_path / "rounds" / "round-00007.safetensors"
    assert len(loaded) == len(params)
    assert all(torch.equal(a.detach(), b) for a, b in zip(params, loaded, strict=True))
    with pytest.raises(ConfigError, match="unreadable"):
        load_round_params(round_params_path(tmp_path, 8))


def test_a_checkpoint_of_another_run_is_refused(trained: tuple[Path, GPT]) -> None:
    """--resume with another run config stops, naming the fix."""
    # Prepare
    workdir, _ = trained

    # Execute / Assert
    with pytest.raises(ConfigError, match="another run config"):
        Checkpoint.load(workdir, RunConfig(run_id="other").digest())


def _flip_data_byte(raw: bytes) -> bytes:
    middle = len(raw) - 1000  # inside the tensor data, past the header
    return raw[:middle] + bytes([raw[middle] ^ 0x01]) + raw[middle + 1 :]


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(_flip_data_byte, id="one-bit-flipped"),
        pytest.param(lambda raw: raw[: len(raw) // 2], id="truncated"),
        pytest.param(lambda raw: b"\x00" * 64, id="zeroed"),
        pytest.param(lambda raw: raw.replace(b'"round":"3"', b'"round":"9"'), id="metadata-edited"),
    ],
)
def test_a_damaged_checkpoint_is_rejected_and_left_alone(tmp_path: Path, damage, capsys) -> None:
    """Export of a damaged checkpoint: a one-line error, exit 2, the file untouched, no output folder."""
    # Prepare
    workdir = tmp_path / "work"
    workdir.mkdir()
    _checkpoint(build_model(RUN.model, seed=4), RUN).save(workdir, run=RUN, peer_id=PEER_ID)
    path = workdir / CHECKPOINT_FILE
    damaged = damage(path.read_bytes())
    assert damaged != path.read_bytes()
    path.write_bytes(damaged)

    # Execute
    code = main(["export", "--workdir", str(workdir), "--out", str(tmp_path / "out")])

    # Assert
    assert code == 2
    _one_line_error(capsys.readouterr().err, str(path), "unreadable", "move it away")
    assert path.read_bytes() == damaged
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="unreadable"):
        Checkpoint.load(workdir, RUN.digest())


def test_an_old_pickle_checkpoint_gets_a_one_line_error(tmp_path: Path, capsys) -> None:
    """A checkpoint.pt of an earlier version is not unpickled: --resume and export say what to do."""
    # Prepare
    legacy = tmp_path / LEGACY_CHECKPOINT_FILE
    torch.save({"run_hash": RUN.digest(), "round": 1, "global": []}, legacy)  # the old format, written here only
    before = legacy.read_bytes()

    # Execute
    with pytest.raises(ConfigError, match="old-format") as raised:
        Checkpoint.load(tmp_path, RUN.digest())
    code = main(["export", "--workdir", str(tmp_path), "--out", str(tmp_path / "out")])

    # Assert
    assert "move it away" in str(raised.value)
    assert code == 2
    _one_line_error(capsys.readouterr().err, "old-format", "join again")
    assert legacy.read_bytes() == before


# ---- export -----------------------------------------------------------------------------------------------


def test_the_export_loads_in_transformers_with_our_logits(trained: tuple[Path, GPT], exported: Path) -> None:
    """AutoModelForCausalLM and AutoTokenizer load the folder; logits equal the checkpoint's GPT's."""
    # Prepare
    _, model = trained
    tokens = torch.randint(0, 256, (3, RUN.model.context), generator=torch.Generator().manual_seed(9))
    text = "Ünïcode bytes, spaces  and\nnewlines"

    # Execute
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    with torch.no_grad():
        theirs, ours = hf(tokens).logits, model(tokens)

    # Assert
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {p.name for p in exported.iterdir()}
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in exported.iterdir())
    assert hf.config.model_type == "gpt2" and hf.config.vocab_size == 256
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert tokenizer(text)["input_ids"] == list(text.encode())
    assert tokenizer.decode(list(text.encode())) == text


def test_the_model_card_credits_and_describes_the_run(exported: Path) -> None:
    """README.md: run id, rounds, samples, losses, privacy, and contributors counted from the reports."""
    # Execute
    card = (exported / "README.md").read_text()

    # Assert
    assert card.startswith("---\nlibrary_name: transformers")
    assert "# export-test" in card and f"`{RUN.digest()}`" in card
    assert "| outer rounds | 3 |" in card and "512 sequences" in card  # 4 reports x 128 samples
    assert "5.6000 at round 0" in card and "2.9500 at round 3" in card and "| 2 | 3.2000 |" in card
    assert "| epsilon spent (this node, last report) | 1.4000 |" in card and "| delta | 1e-05 |" in card
    # this node: 2 group rounds; the peer named in round 2: 1; unnamed: round 1's two, round 2's third
    assert f"| Ada Lovelace | `{PEER_ID}` | 2 | 512 |" in card
    assert f"| {OTHER_PEER} | `{OTHER_PEER}` | 1 | - |" in card
    assert "| other group members (not named in this node's reports) | - | 3 | - |" in card
    assert "not from a signed contribution ledger" in card
    assert f"| exported by | Ada Lovelace (`{PEER_ID}`) |" in card
    if (exported / "loss.png").exists():
        assert (exported / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "](loss.png)" in card


@pytest.mark.parametrize(
    ("shape", "tokens"),
    [
        pytest.param(ModelConfig(n_layer=1, n_head=1, d_model=32, context=16), 16, id="1-layer-1-head"),
        pytest.param(ModelConfig(n_layer=3, n_head=4, d_model=48, context=32), 20, id="3-layers-4-heads-short"),
    ],
)
def test_every_shape_maps_onto_gpt2(shape: ModelConfig, tokens: int) -> None:
    """The weight mapping (Conv1D transposes, fused q/k/v, heads, tied head) holds for other shapes."""
    # Prepare
    from node.export.gpt2 import to_gpt2

    model = build_model(shape, seed=21).eval()
    with torch.no_grad():
        for p in model.parameters():  # non-trivial norms and biases too
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    batch = torch.randint(0, 256, (2, tokens), generator=torch.Generator().manual_seed(2))

    # Execute
    with torch.no_grad():
        theirs, ours = to_gpt2(model)(batch).logits, model(batch)

    # Assert
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_a_wrong_config_and_a_taken_out_folder_are_refused(
    trained: tuple[Path, GPT], exported: Path, tmp_path: Path, capsys
) -> None:
    """--config of another run and an --out that holds files: one-line errors, nothing written."""
    # Prepare
    workdir, _ = trained
    other = write_run_config(tmp_path / "other.toml", run_id="other")
    before = {p.name: p.read_bytes() for p in exported.iterdir()}

    # Execute
    wrong = main(["export", "--workdir", str(workdir), "--out", str(tmp_path / "o"), "--config", str(other)])
    wrong_err = capsys.readouterr().err
    taken = main(["export", "--workdir", str(workdir), "--out", str(exported)])
    taken_err = capsys.readouterr().err

    # Assert
    assert (wrong, taken) == (2, 2)
    _one_line_error(wrong_err, "is not the run of", "--config")
    _one_line_error(taken_err, "already exists", "choose a new folder")
    assert not (tmp_path / "o").exists()
    assert {p.name: p.read_bytes() for p in exported.iterdir()} == before


def test_an_empty_out_folder_is_filled(trained: tuple[Path, GPT], tmp_path: Path) -> None:
    """--out may be an existing empty folder; no temporary folder is left beside it."""
    # Prepare
    workdir, _ = trained
    out = tmp_path / "model"
    out.mkdir()

    # Execute
    code = main(["export", "--workdir", str(workdir), "--out", str(out)])

    # Assert
    assert code == 0
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize("kind", ["missing", "empty", "a-file"])
def test_a_missing_or_empty_workdir_gets_a_one_line_error(tmp_path: Path, kind: str) -> None:
    """The real `zen-node export` process: exit 2 and one line naming the workdir and the fix."""
    # Prepare
    workdir = tmp_path / "work"
    if kind == "empty":
        workdir.mkdir()
    elif kind == "a-file":
        workdir.write_text("not a folder")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    # Execute
    result = subprocess.run(
        [*ZEN_NODE, "export", "--workdir", str(workdir), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )

    # Assert
    assert result.returncode == 2, result.stderr
    _one_line_error(result.stderr, str(workdir), "--workdir")
    assert not (tmp_path / "out").exists()


# ---- generate ---------------------------------------------------------------------------------------------


def test_generate_samples_text_reproducibly(exported: Path, capsys) -> None:
    """`zen-node generate` prints the prompt and N sampled bytes; the same seed gives the same text."""
    # Prepare
    from node.generate import generate_text

    argv = ["generate", "--model", str(exported), "--prompt", "Once upon", "--max-new-tokens", "12", "--seed", "3"]

    # Execute
    first = main(argv)
    printed = capsys.readouterr().out
    again = generate_text(exported, "Once upon", 12, seed=3)
    other = generate_text(exported, "Once upon", 12, seed=4)

    # Assert
    assert first == 0
    assert printed == again.prompt + again.continuation + "\n"
    assert printed.startswith("Once upon") and len(again.tokens) == 12
    assert again.tokens != other.tokens


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        pytest.param(["--max-new-tokens", "64"], ["--max-new-tokens", "[1, 63]"], id="beyond-the-context"),
        pytest.param(["--prompt", ""], ["--prompt"], id="empty-prompt"),
    ],
)
def test_generate_refuses_bad_flags(exported: Path, flags: list[str], words: list[str], capsys) -> None:
    """Flags the model cannot honour get a one-line error naming the flag."""
    # Execute
    code = main(["generate", "--model", str(exported), "--prompt", "hi", *flags])

    # Assert
    assert code == 2
    _one_line_error(capsys.readouterr().err, *words)


def test_generate_without_a_model_folder_gets_a_one_line_error(tmp_path: Path, capsys) -> None:
    """--model naming a folder without config.json: exit 2, one line."""
    # Execute
    code = main(["generate", "--model", str(tmp_path), "--prompt", "hi"])

    # Assert
    assert code == 2
    _one_line_error(capsys.readouterr().err, str(tmp_path), "config.json", "zen-node export")


def test_importing_the_cli_does_not_import_transformers() -> None:
    """`zen-node join` and friends start without loading transformers (only export and generate need it)."""
    # Execute
    result = subprocess.run(
        [sys.executable, "-c", "import sys, node.cli; print('transformers' in sys.modules)"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )

    # Assert
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False"]


@pytest.mark.slow
def test_a_real_trainers_workdir_exports_its_last_round(tmp_path: Path) -> None:
    """A lone `zen-node join` trains 2 rounds; the export (no --config) computes round 2's parameters."""
    # Prepare
    config = write_run_config(
        tmp_path / "run.toml", train={"inner_steps": 4}, aggregation={"matchmaking_time": 0.5, "timeout": 2.0}
    )
    node = NodeProcess(tmp_path, "solo", config, None, generate_corpus(20_000, seed=5), "--rounds", "2")
    code = node.wait(120)
    node.stop()
    assert code == 0, node.tail()
    workdir = node.folder / "work"
    out = tmp_path / "model"

    # Execute
    exported_code = main(["export", "--workdir", str(workdir), "--out", str(out)])

    # Assert
    assert exported_code == 0
    assert (workdir / CHECKPOINT_FILE).exists() and not (workdir / LEGACY_CHECKPOINT_FILE).exists()
    checkpoint = Checkpoint.load(workdir, None)
    assert checkpoint is not None and checkpoint.round == 2 and checkpoint.peer_id.startswith("12D3KooW")
    assert checkpoint.run_config is not None  # the trainer records its run config: export needs no --config
    shape = run_config_from_dict(checkpoint.run_config).model
    model = build_model(shape, seed=0).eval()
    with torch.no_grad():
        for param, value in zip(model.parameters(), load_round_params(round_params_path(workdir, 2)), strict=True):
            param.copy_(value)
    tokens = torch.randint(0, 256, (2, shape.context), generator=torch.Generator().manual_seed(3))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens), atol=1e-5, rtol=0)
    card = (out / "README.md").read_text()
    assert "| outer rounds | 2 |" in card and "Trained without differential privacy." in card
    assert f"`{checkpoint.peer_id}` | 0 |" in card  # solo rounds: no group round observed

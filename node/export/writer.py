"""``zen-node export``: a workdir's checkpoint as a folder ``transformers`` loads, with a model card.

    zen-node export --workdir ~/.zen/work --out ./zen-model --display-name "Ada's laptop"

The folder holds ``config.json`` and ``generation_config.json`` (GPT-2, or with ``family = "hf"``
the run's own architecture: export/hf.py), ``model.safetensors``, the tokenizer (``tokenizer.json``,
``tokenizer_config.json``: bytes, or the run's own), ``README.md`` (the model card), ``loss.png``
when matplotlib is installed and the report has a loss curve, and ``zen_run.json`` (run id, run
hash, round, exporting PeerID, run config: for tools, not for transformers). It is written next
to ``--out`` under a temporary name and renamed into place at the end, so an interrupted export
leaves no half folder, and nothing in ``--workdir`` is written. The run config comes from the
checkpoint (written by every trainer since checkpoints became safetensors) or from ``--config``;
either way its hash must be the checkpoint's.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.utils import logging as transformers_logging

from node.config import ConfigError, RunConfig, load_node_config, run_config_from_dict
from node.export.card import LOSS_PLOT_FILE, RunSummary, model_card, plot_losses, summarize_run
from node.export.gpt2 import byte_tokenizer, to_gpt2
from node.export.hf import write_hf_model
from node.model import GPT, build_model, build_run_model
from node.sharding.snapshot import load_stage_weights
from node.sharding.stages import LocalParts, stage_ranges
from node.training.checkpoint import CHECKPOINT_FILE, Checkpoint

logger = logging.getLogger(__name__)

RUN_INFO_FILE = "zen_run.json"
MAX_DISPLAY_NAME = 64


@dataclass
class ExportResult:
    """What ``export_run`` wrote."""

    out: Path
    summary: RunSummary
    files: list[str]  # names in ``out``


def export_run(
    workdir: Path, out: Path, config_path: str | None = None, display_name: str | None = None
) -> ExportResult:
    """Export the checkpoint in ``workdir`` to the new folder ``out``.

    Args:
        workdir: a trainer's ``--workdir`` (``checkpoint.safetensors``, ``report.jsonl``).
        out: the folder to create; it must not exist or be empty.
        config_path: the run's TOML config, for a checkpoint that does not carry its run config.
        display_name: how the card names this node instead of its PeerID.

    Raises:
        ConfigError: a missing or foreign workdir, a damaged checkpoint, a config of another run, a bad
            display name, or an ``out`` that already holds files (the message says what to do).
    """
    workdir, out = workdir.expanduser(), out.expanduser().resolve()
    checkpoint, run = _read_workdir(workdir, config_path)
    name = _check_display_name(display_name)
    _check_out(out)
    model = _sharded_model(workdir, checkpoint, run) if run.sharding.stages else _model_from(checkpoint, run)
    parameters = sum(p.numel() for p in model.parameters())
    summary = summarize_run(run, checkpoint.run_hash, checkpoint.round, parameters, checkpoint.peer_id, workdir, name)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        _write_folder(partial, model, summary)
        os.replace(partial, out)  # an empty ``out`` is replaced; POSIX renames a folder over an empty one
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    logger.info(f"exported round {checkpoint.round} of run {run.run_id!r} to {out}")
    return ExportResult(out=out, summary=summary, files=sorted(p.name for p in out.iterdir()))


def _read_workdir(workdir: Path, config_path: str | None) -> tuple[Checkpoint, RunConfig]:
    if not workdir.is_dir():
        what = "is not a folder" if workdir.exists() else "does not exist"
        raise ConfigError(f"workdir {workdir} {what}; pass the --workdir a `zen-node join` trained in")
    checkpoint = Checkpoint.load(workdir, run_hash=None)
    if checkpoint is None:
        raise ConfigError(
            f"no checkpoint in {workdir} (no {CHECKPOINT_FILE}); pass the --workdir of a node that has finished "
            "at least one round"
        )
    if config_path is not None:
        run = load_node_config(config_path).run
        source = f"--config {config_path}"
    elif checkpoint.run_config is not None:
        try:
            run = run_config_from_dict(checkpoint.run_config)
        except (TypeError, ValueError) as e:
            raise ConfigError(
                f"the run config in {workdir / CHECKPOINT_FILE} is invalid ({e}); pass --config"
            ) from None
        source = "the checkpoint's run config"
    else:
        raise ConfigError(f"{workdir / CHECKPOINT_FILE} does not record its run config; pass the run's --config")
    if run.digest() != checkpoint.run_hash:
        raise ConfigError(
            f"{source} is not the run of {workdir / CHECKPOINT_FILE} (run hash {run.digest()} != "
            f"{checkpoint.run_hash}); pass the --config the node trained with"
        )
    return checkpoint, run


def _check_display_name(name: str | None) -> str | None:
    if name is None:
        return None
    name = " ".join(name.split())
    if not 0 < len(name) <= MAX_DISPLAY_NAME or any(not c.isprintable() for c in name):
        raise ConfigError(f"--display-name must be 1-{MAX_DISPLAY_NAME} printable characters, got {name!r}")
    return name


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} already exists and is not an empty folder; choose a new folder")
    if not out.parent.is_dir():
        raise ConfigError(f"the parent folder of --out {out} does not exist; create it or choose another --out")


def _model_from(checkpoint: Checkpoint, run: RunConfig) -> torch.nn.Module:
    """The run's model (either family) with the checkpoint's global parameters."""
    # every parameter is overwritten; with LoRA the parameters are the adapters and the base is read
    model = build_run_model(run.model, run.train.seed, load_weights=run.lora.active, lora=run.lora)
    what, fix = "the checkpoint's parameters do not fit run.model", "pass the --config the node trained with"
    checkpoint.copy_params_into(list(model.parameters()), what, fix)
    return model.eval()


def _sharded_model(workdir: Path, checkpoint: Checkpoint, run: RunConfig) -> torch.nn.Module:
    """A sharded trainer's model: its own parts from the checkpoint, the stages' blocks from the file it saved
    when it stopped (node/sharding/snapshot.py)."""
    stages, model = load_stage_weights(workdir, run), build_model(run.model, run.train.seed)
    fix = "pass the --config the node trained with"
    own = LocalParts(model, run.sharding.local_blocks)  # the full model's own modules: filled in place
    checkpoint.copy_params_into(list(own.parameters()), "the checkpoint's parameters do not fit run.model", fix)
    with torch.no_grad():
        for blocks, params in zip(stage_ranges(run.model.n_layer, run.sharding), stages, strict=True):
            stage = [p for i in blocks for p in model.blocks[i].parameters()]
            for param, value in zip(stage, params, strict=True):
                param.copy_(value)
    return model.eval()


def _write_folder(folder: Path, model: torch.nn.Module, summary: RunSummary) -> None:
    transformers_logging.disable_progress_bar()
    context = summary.run.model.context
    if isinstance(model, GPT):
        to_gpt2(model).save_pretrained(folder)
        byte_tokenizer(context).save_pretrained(folder)
    else:
        write_hf_model(folder, model, summary.run.model)
    if plot_losses(summary.losses, folder / LOSS_PLOT_FILE, f"{summary.run.run_id}: held-out loss"):
        summary.loss_plot = LOSS_PLOT_FILE
    (folder / "README.md").write_text(model_card(summary))
    info = {
        "run_id": summary.run.run_id,
        "run_hash": summary.run_hash,
        "round": summary.round,
        "exported_by": summary.exported_by,
        "display_name": summary.display_name,
        "run_config": summary.run.to_dict(),
    }
    (folder / RUN_INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")

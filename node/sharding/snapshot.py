"""The stage servers' blocks, saved by a sharded trainer when it stops, so its workdir can be exported.

A sharded trainer's checkpoint holds only its own parts (embeddings, first blocks, head); the middle
blocks live on the stage servers. When the trainer stops (its rounds done, or SIGINT), it asks each
stage's best usable server for the stage's state (the ``state`` call spot-checks use: with 3 or more
replicas listed it first compares their weights digests and bans a minority, node/sharding/agreement.py),
and writes the parameters to ``<workdir>/stages.safetensors`` with the run hash, each stage's version
and the server it came from. ``zen-node export`` then puts the model together offline
(node/export/writer.py): the trainer's parts from its checkpoint, the blocks from this file.

Trust: the blocks are the ones the trainer trained with, from a server it did not ban; a server that
lies here could equally have lied in the forward passes, which spot-checks and the weights comparison
watch. A file of another run, or whose tensors do not fit the stages, is refused in one line.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from node.config import ConfigError, RunConfig
from node.sharding.client import RemoteStages
from node.sharding.stages import build_stage
from node.training.checkpoint import read_safetensors, write_safetensors

logger = logging.getLogger(__name__)

STAGES_FILE = "stages.safetensors"
STAGES_FORMAT = "zen-stages/v1"


def save_stage_weights(workdir: Path, run: RunConfig, remote: RemoteStages) -> Path:
    """Fetch every stage's parameters and write them to ``workdir / STAGES_FILE`` (module docstring).

    Raises:
        StageUnavailableError: no server of some stage served its weights.
    """
    tensors: dict[str, torch.Tensor] = {}
    versions, servers = [], []
    for stage in range(run.sharding.stages):
        params, version, server = remote.stage_weights(stage)
        tensors.update({f"stage{stage}.{i:05d}": p.contiguous() for i, p in enumerate(params)})
        versions.append(version)
        servers.append(server)
    metadata = {"format": STAGES_FORMAT, "run_hash": run.digest(), "versions": json.dumps(versions)}
    path = workdir / STAGES_FILE
    write_safetensors(path, tensors, {**metadata, "servers": json.dumps(servers)})  # atomic, with a digest
    logger.info(f"saved the stages' blocks (versions {versions}) to {path}")
    return path


def load_stage_weights(workdir: Path, run: RunConfig) -> list[list[torch.Tensor]]:
    """Each stage's parameters from ``workdir / STAGES_FILE``, checked against the run's stages.

    Raises:
        ConfigError: the file is missing, damaged, of another run, or does not fit the stages.
    """
    path = workdir / STAGES_FILE
    if not path.is_file():
        raise ConfigError(
            f"{path} is missing: a sharded trainer writes the stages' blocks there when it stops; "
            "run `zen-node join` in this workdir until it stops (--rounds N, or Ctrl-C) with its stage servers up"
        )
    try:
        tensors, metadata = read_safetensors(path, STAGES_FORMAT)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} cannot be read ({e}); run the trainer again to rewrite it") from None
    if metadata.get("run_hash") != run.digest():
        raise ConfigError(f"{path} holds another run's blocks (run hash {metadata.get('run_hash')!r}); use its workdir")
    stages = []
    for stage in range(run.sharding.stages):
        template = list(build_stage(run.model, run.sharding, run.train.seed, stage).parameters())
        params = [tensors.get(f"stage{stage}.{i:05d}") for i in range(len(template))]
        if any(
            p is None or p.shape != t.shape or not torch.isfinite(p).all()
            for p, t in zip(params, template, strict=True)
        ):
            raise ConfigError(f"{path} does not hold finite blocks of stage {stage} of this run; run the trainer again")
        stages.append([p for p in params if p is not None])
    if len(tensors) != sum(len(s) for s in stages):
        raise ConfigError(f"{path} holds tensors of no stage of this run; run the trainer again to rewrite it")
    return stages

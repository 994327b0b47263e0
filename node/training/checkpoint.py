"""A trainer's checkpoint: ``<workdir>/checkpoint.pt`` after every outer round, read back by ``--resume``.

The file is a ``torch.save`` dict (``run_hash``, ``round``, ``global``, ``outer_opt``,
``inner_opt``, ``data_rng``, ``dp_rounds``), loaded with ``weights_only=True``. Every write goes
through ``atomic_save`` (temporary file, fsync, rename), so a crash never leaves half a checkpoint.
With ``--save-round-params`` each round's global parameters also go to ``rounds/round-NNNNN.pt``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from node.config import ConfigError

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
ROUNDS_DIR = "rounds"


@dataclass
class Checkpoint:
    """What ``--resume`` needs to continue a run where it stopped."""

    run_hash: str  # the run config's digest: a checkpoint of another run is refused
    round: int  # the last outer round done
    global_params: list[torch.Tensor]  # on the CPU
    outer_opt: dict[str, Any]  # the outer optimizer's state_dict (Nesterov momentum)
    inner_opt: dict[str, Any]  # the inner AdamW's state_dict
    data_rng: torch.Tensor  # the batch generator's state
    dp_rounds: int = 0  # rounds the privacy accountant has counted

    def save(self, workdir: Path) -> None:
        atomic_save(
            {
                "run_hash": self.run_hash,
                "round": self.round,
                "global": self.global_params,
                "outer_opt": self.outer_opt,
                "inner_opt": self.inner_opt,
                "data_rng": self.data_rng,
                "dp_rounds": self.dp_rounds,
            },
            workdir / CHECKPOINT_FILE,
        )

    @classmethod
    def load(cls, workdir: Path, run_hash: str) -> Checkpoint | None:
        """The checkpoint in ``workdir``, or None when there is none.

        Raises:
            ValueError: the file is unreadable or belongs to another run config (the message says what to do).
        """
        path = workdir / CHECKPOINT_FILE
        if not path.exists():
            logger.info(f"--resume: no checkpoint at {path}; starting fresh")
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many kinds for a damaged or foreign file
            raise ConfigError(f"checkpoint {path} is unreadable ({e}); move it away to start fresh") from None
        if state.get("run_hash") != run_hash:
            raise ConfigError(f"checkpoint {path} belongs to another run config; use that config or another --workdir")
        return cls(
            run_hash=run_hash,
            round=int(state["round"]),
            global_params=list(state["global"]),
            outer_opt=state["outer_opt"],
            inner_opt=state["inner_opt"],
            data_rng=state["data_rng"],
            dp_rounds=int(state.get("dp_rounds", 0)),
        )


def save_round_params(workdir: Path, round_no: int, params: Sequence[torch.Tensor]) -> None:
    """Keep round ``round_no``'s global parameters in ``rounds/round-NNNNN.pt`` (``--save-round-params``)."""
    rounds_dir = workdir / ROUNDS_DIR
    rounds_dir.mkdir(exist_ok=True)
    atomic_save([p.detach().cpu() for p in params], rounds_dir / f"round-{round_no:05d}.pt")


def atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary file, fsync, rename: a crash never leaves a half-written checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

"""A trainer's checkpoint: ``<workdir>/checkpoint.safetensors`` after every outer round, read back by ``--resume``.

Nothing at rest is a pickle. A checkpoint is one safetensors file: the global parameters
(``global.00000``, ...) and every tensor of the optimizers' state and the batch generator's state
as tensors; everything else (``run_hash``, ``round``, ``dp_rounds``, the run config, the writing
node's PeerID, and the shape of the optimizer state dicts with their tensors named) as string
metadata. ``digest`` in the metadata is a BLAKE2b over the rest of the metadata and every tensor,
so a damaged file is refused rather than resumed. Every write goes through ``atomic_write``
(temporary file, fsync, rename), so a crash never leaves half a checkpoint.

With ``--save-round-params`` each round's global parameters also go to
``rounds/round-NNNNN.safetensors`` (``param.00000``, ...; read with ``load_round_params``).

A ``checkpoint.pt`` of an older version (a torch pickle) is not read: ``--resume`` stops with a
one-line error. Its run goes on without it: move it away and join again, and the node downloads
the swarm's current state from its peers (or starts fresh if it is alone).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from node.config import ConfigError, RunConfig

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.safetensors"
LEGACY_CHECKPOINT_FILE = "checkpoint.pt"  # the torch.save pickle of earlier versions: refused
ROUNDS_DIR = "rounds"
CHECKPOINT_FORMAT = "zen-checkpoint/1"
ROUND_PARAMS_FORMAT = "zen-round-params/1"


@dataclass
class Checkpoint:
    """What ``--resume`` needs to continue a run where it stopped (and ``zen-node export`` to publish it)."""

    run_hash: str  # the run config's digest: a checkpoint of another run is refused
    round: int  # the last outer round done
    global_params: list[torch.Tensor]  # on the CPU
    outer_opt: dict[str, Any]  # the outer optimizer's state_dict (Nesterov momentum)
    inner_opt: dict[str, Any]  # the inner AdamW's state_dict
    data_rng: torch.Tensor  # the batch generator's state
    dp_rounds: int = 0  # rounds the privacy accountant has counted
    run_config: dict[str, Any] | None = None  # RunConfig.to_dict() of the run, when the writer gave it
    peer_id: str = ""  # the node that wrote it, when the writer gave it

    def save(self, workdir: Path, run: RunConfig | None = None, peer_id: str | None = None) -> None:
        """Write ``workdir / CHECKPOINT_FILE`` atomically; ``run`` and ``peer_id`` (provenance for
        ``zen-node export``) replace the fields of the same meaning when given."""
        run_config = run.to_dict() if run is not None else self.run_config
        tensors = {f"global.{i:05d}": p for i, p in enumerate(self.global_params)}
        state = {"outer_opt": self.outer_opt, "inner_opt": self.inner_opt, "data_rng": self.data_rng}
        metadata = {
            "format": CHECKPOINT_FORMAT,
            "run_hash": self.run_hash,
            "round": str(self.round),
            "dp_rounds": str(self.dp_rounds),
            "peer_id": peer_id if peer_id is not None else self.peer_id,
            "run_config": json.dumps(run_config, sort_keys=True),
            "state": json.dumps(_flatten(state, "state", tensors)),
        }
        write_safetensors(workdir / CHECKPOINT_FILE, tensors, metadata)

    def copy_params_into(self, params: Sequence[torch.Tensor], what: str, fix: str) -> None:
        """Copy the checkpoint's parameters into ``params``.

        Raises:
            ConfigError: their count or shapes differ: "``what`` (the counts); ``fix``".
        """
        if [tuple(t.shape) for t in self.global_params] != [tuple(p.shape) for p in params]:
            counts = f"{len(self.global_params)} tensors for {len(params)}, or other shapes"
            raise ConfigError(f"{what} ({counts}); {fix}")
        with torch.no_grad():
            for param, value in zip(params, self.global_params, strict=True):
                param.copy_(value)

    @classmethod
    def load(cls, workdir: Path, run_hash: str | None) -> Checkpoint | None:
        """The checkpoint in ``workdir``, or None when there is none.

        Args:
            workdir: the node's ``--workdir``.
            run_hash: the run config's digest the checkpoint must carry; None accepts any run.

        Raises:
            ConfigError: the file is unreadable, damaged, of the old pickle format, or belongs to another
                run config (the message says what to do).
        """
        path = workdir / CHECKPOINT_FILE
        if not path.exists():
            legacy = workdir / LEGACY_CHECKPOINT_FILE
            if legacy.exists():
                raise ConfigError(
                    f"{legacy} is an old-format (pickle) checkpoint, which this version does not read; move it "
                    "away and join again (the node downloads the swarm's state), or finish the run with the "
                    "previous version"
                )
            logger.info(f"no checkpoint at {path}; starting fresh")
            return None
        try:
            tensors, metadata = read_safetensors(path, CHECKPOINT_FORMAT)
            checkpoint = cls._from_file(tensors, metadata)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"checkpoint {path} is unreadable ({e}); move it away to start fresh") from None
        if run_hash is not None and checkpoint.run_hash != run_hash:
            raise ConfigError(f"checkpoint {path} belongs to another run config; use that config or another --workdir")
        return checkpoint

    @classmethod
    def _from_file(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Checkpoint:
        state = _unflatten(json.loads(metadata["state"]), tensors)
        count = sum(1 for name in tensors if name.startswith("global."))
        return cls(
            run_hash=metadata["run_hash"],
            round=int(metadata["round"]),
            global_params=[tensors[f"global.{i:05d}"] for i in range(count)],
            outer_opt=state["outer_opt"],
            inner_opt=state["inner_opt"],
            data_rng=state["data_rng"],
            dp_rounds=int(metadata["dp_rounds"]),
            run_config=json.loads(metadata["run_config"]),
            peer_id=metadata["peer_id"],
        )


def round_params_path(workdir: Path, round_no: int) -> Path:
    """Where ``--save-round-params`` keeps round ``round_no``'s global parameters."""
    return workdir / ROUNDS_DIR / f"round-{round_no:05d}.safetensors"


def save_round_params(workdir: Path, round_no: int, params: Sequence[torch.Tensor]) -> None:
    """Keep round ``round_no``'s global parameters in ``rounds/round-NNNNN.safetensors`` (``--save-round-params``)."""
    path = round_params_path(workdir, round_no)
    path.parent.mkdir(exist_ok=True)
    tensors = {f"param.{i:05d}": p.detach().cpu() for i, p in enumerate(params)}
    write_safetensors(path, tensors, {"format": ROUND_PARAMS_FORMAT, "round": str(round_no)})


def load_round_params(path: Path) -> list[torch.Tensor]:
    """The parameter list ``save_round_params`` wrote to ``path``, in the model's parameter order.

    Raises:
        ConfigError: the file is missing, damaged or not a round-parameters file.
    """
    try:
        tensors, _ = read_safetensors(path, ROUND_PARAMS_FORMAT)
    except (OSError, ValueError) as e:
        raise ConfigError(f"round parameters {path} are unreadable ({e})") from None
    return [tensors[f"param.{i:05d}"] for i in range(len(tensors))]


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Save ``tensors`` with ``metadata`` and a ``digest`` over both, atomically (``atomic_write``)."""
    # safetensors wants contiguous tensors that share no memory (a parameter and its optimizer state may)
    owned = {name: t.detach().cpu().contiguous().clone() for name, t in tensors.items()}
    data = save_safetensors(owned, metadata={**metadata, "digest": _digest(owned, metadata)})
    atomic_write(data, path)


def read_safetensors(path: Path, expected_format: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a file ``write_safetensors`` wrote.

    Raises:
        OSError: the file cannot be read.
        ValueError: not a safetensors file, not of ``expected_format``, or its digest does not match.
    """
    data = path.read_bytes()
    metadata = _header_metadata(data)
    if metadata.get("format") != expected_format:
        raise ValueError(f"not a {expected_format} file (format {metadata.get('format')!r})")
    try:
        tensors = load_safetensors(data)
    except Exception as e:  # safetensors raises its own error type for a damaged body
        raise ValueError(f"damaged safetensors body: {e}") from None
    expected = metadata.pop("digest", None)
    if expected != _digest(tensors, metadata):
        raise ValueError("digest mismatch: the file is damaged")
    return tensors, metadata


def atomic_write(data: bytes, path: Path) -> None:
    """Write to a temporary file, fsync, rename: a crash never leaves a half-written checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _header_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file: an 8-byte little-endian length, then a JSON header."""
    if len(data) < 8:
        raise ValueError("too short for a safetensors file")
    (length,) = struct.unpack("<Q", data[:8])
    if length > len(data) - 8:
        raise ValueError("truncated safetensors header")
    try:
        header = json.loads(data[8 : 8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("not a safetensors header") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise ValueError("no metadata in the safetensors header")
    return dict(metadata)


def _digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    hasher = hashlib.blake2b(digest_size=16)
    hasher.update(json.dumps(metadata, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        hasher.update(f"{name}:{tensor.dtype}:{list(tensor.shape)}".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def _flatten(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON skeleton of ``obj`` (a state_dict: dicts, lists, tuples, scalars), its tensors moved to ``tensors``.

    Tensors become ``{"tensor": name}``; tuples ``{"tuple": [...]}``; dicts ``{"dict": [[key, value], ...]}``,
    so integer keys (an optimizer's parameter indices) come back as integers.
    """
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj
        return {"tensor": path}
    if isinstance(obj, dict):
        return {"dict": [[key, _flatten(value, f"{path}.{key}", tensors)] for key, value in obj.items()]}
    if isinstance(obj, tuple | list):
        items = [_flatten(value, f"{path}.{i}", tensors) for i, value in enumerate(obj)]
        return {"tuple": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint")


def _unflatten(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, list):
        return [_unflatten(value, tensors) for value in skeleton]
    if isinstance(skeleton, dict):
        if "tensor" in skeleton:
            return tensors[skeleton["tensor"]]
        if "tuple" in skeleton:
            return tuple(_unflatten(value, tensors) for value in skeleton["tuple"])
        return {key: _unflatten(value, tensors) for key, value in skeleton["dict"]}
    return skeleton

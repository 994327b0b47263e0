"""The wire format of stage calls: msgpack maps with an exact field set, tensors as [dtype, shape, bytes].

One call is one hivemind unary protobuf request (``ExpertRequest``, whose ``metadata`` bytes hold
the msgpack map; its protobuf tensor list stays empty) answered by one ``ExpertResponse`` built
the same way. Nothing is unpickled. Every decode is bounded (dht/wire.py's ``unpack_bounded``):
total size (the daemon's unary message limit), string lengths, list lengths, the exact field set
and types, and each tensor's dtype (float32 only), rank, element count and byte length. A server
then checks a request's tensors against the stage (``check_hidden_states``, ``check_gradients``).
A message that breaks a rule raises :class:`StageMessageError` with the reason; the server logs it
and answers ``ok = False``.

Methods:

| method | from | tensors in | tensors out |
|---|---|---|---|
| forward | trainer | hidden states | stage output |
| backward | trainer | hidden states, grad of output | grad of input (param grads stay pending) |
| backward_dp | trainer | hidden states, grad of output | grad of input, squared norms (clipped.py) |
| commit | trainer | - (a DP step: its clip factors, [noise std, scale]) | - (applies the step's pending grads once) |
| replicate | listed server of the same stage | the step's summed param grads, the trainer's step proof | - |

A commit and a replicate carry ``share``, the trainer's share of the stage's step (1 / the run's
trainers, as the trainer counts them): the stage's AdamW learning rate for the step is
``train.inner_lr * sharding.stage_lr_scale * share``, and the step proof signs it (proofs.py).
| state | anyone | - | params, Adam exp_avg, Adam exp_avg_sq, averaging anchor (reply.history set) |
| weights | anyone | - | - (reply: version, ``history`` and ``digest`` of the weights, agreement.py) |
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch

from dht.wire import WireError, unpack_bounded
from node.config import ModelConfig

MAX_MESSAGE_BYTES = 4 * 1024**2 - 64 * 1024  # p2pd's unary limit is 4 MiB; leave room for protobuf framing
MAX_TENSORS = 256
MAX_RANK = 4
METHODS = frozenset({"forward", "backward", "backward_dp", "commit", "replicate", "state", "weights"})
TRAINER_CALLS = frozenset({"forward", "backward", "backward_dp", "commit"})
DTYPES = {"float32": torch.float32}
STATE_BLOCKS = 4  # a state reply holds the stage's params, Adam exp_avg, Adam exp_avg_sq and averaging anchor


class StageMessageError(ValueError):
    """A stage request or reply broke a schema or size rule; the message says which."""


def encode_tensor(tensor: torch.Tensor) -> list[Any]:
    if tensor.dtype != torch.float32:
        raise StageMessageError(f"stage calls carry float32 tensors, got {tensor.dtype}")
    data = tensor.detach().cpu().contiguous()
    return ["float32", list(data.shape), data.numpy().tobytes()]


def decode_tensor(wire: Any) -> torch.Tensor:
    if not (isinstance(wire, list) and len(wire) == 3):
        raise StageMessageError("a tensor must be [dtype, shape, bytes]")
    dtype, shape, raw = wire
    if dtype not in DTYPES:
        raise StageMessageError(f"tensor dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if not isinstance(shape, list) or len(shape) > MAX_RANK:
        raise StageMessageError(f"tensor shape must be a list of at most {MAX_RANK} sizes")
    if not all(isinstance(size, int) and not isinstance(size, bool) and 0 <= size < 2**31 for size in shape):
        raise StageMessageError("tensor sizes must be non-negative integers")
    if not isinstance(raw, bytes) or len(raw) != 4 * math.prod(shape):
        raise StageMessageError(f"tensor of shape {shape} needs {4 * math.prod(shape)} bytes")
    return torch.frombuffer(bytearray(raw), dtype=DTYPES[dtype]).reshape(shape)


def _unpack(data: bytes) -> Any:
    if not isinstance(data, bytes) or len(data) > MAX_MESSAGE_BYTES:
        raise StageMessageError(f"message must be bytes of at most {MAX_MESSAGE_BYTES}")
    try:
        return unpack_bounded(data, max_str=256, max_bin=MAX_MESSAGE_BYTES, max_array=4 * MAX_TENSORS, max_map=16)
    except WireError as e:
        raise StageMessageError(str(e)) from None  # "malformed msgpack: ..."


def _check_fields(wire: Any, types: dict[str, type], what: str) -> None:
    if not isinstance(wire, dict) or set(wire) != set(types):
        got = sorted(wire) if isinstance(wire, dict) else type(wire).__name__
        raise StageMessageError(f"{what} fields must be exactly {sorted(types)}, got {got}")
    for name, expected in types.items():
        if isinstance(wire[name], bool) != (expected is bool) or not isinstance(wire[name], expected):
            raise StageMessageError(f"{what}.{name} has type {type(wire[name]).__name__}")
    tensors = wire.get("tensors", [])
    if len(tensors) > MAX_TENSORS:
        raise StageMessageError(f"{what} carries over {MAX_TENSORS} tensors")


def _pack(wire: dict[str, Any]) -> bytes:
    data = msgpack.packb(wire, use_bin_type=True)
    if len(data) > MAX_MESSAGE_BYTES:
        raise StageMessageError(
            f"a stage message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}; raise sharding.micro_batches"
        )
    return data


_REQUEST_TYPES: dict[str, type] = {
    "method": str,
    "stage": int,
    "trainer": str,
    "step": int,
    "micro_batch": int,
    "micro_batches": int,
    "tensors": list,
    "proof": bytes,
    "version": int,
    "share": float,
}
MIN_SHARE = 1 / 1024  # the smallest share of a stage's step a commit may claim (1024 trainers)
PROOF_BYTES = 32 + 64 + 8 + 64  # a step proof (proofs.py): signing key, binding, timestamp, signature


@dataclass(frozen=True)
class StageRequest:
    """One call to a stage server; (trainer, step, micro_batch) names the work, so a retry is recognized."""

    method: str  # one of METHODS
    stage: int
    trainer: str = ""  # the PeerID of the trainer whose step this is
    step: int = 0  # the trainer's step number
    micro_batch: int = 0  # which piece of the step's batch (backward)
    micro_batches: int = 1  # pieces in the step (commit applies once all are in)
    tensors: tuple[torch.Tensor, ...] = ()
    proof: bytes = b""  # commit, replicate: the trainer's signature over the step's gradients (proofs.py)
    version: int = 0  # replicate: the sender's version of the stage after it applied the step
    share: float = 1.0  # commit, replicate: the trainer's share of the stage's step (module docstring)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise StageMessageError(f"unknown method {self.method!r}")
        if not 0 <= self.stage < 64 or not 0 <= self.step < 2**63 or len(self.trainer) > 64:
            raise StageMessageError("stage, step or trainer is out of range")
        if len(self.proof) not in (0, PROOF_BYTES) or not 0 <= self.version < 2**63:
            raise StageMessageError(f"proof must be empty or {PROOF_BYTES} bytes, version in [0, 2^63)")
        if not 1 <= self.micro_batches <= 64 or not 0 <= self.micro_batch < self.micro_batches:
            raise StageMessageError("micro_batch must be in [0, micro_batches) with micro_batches in [1, 64]")
        if not MIN_SHARE <= self.share <= 1:  # NaN fails too
            raise StageMessageError(f"share must be in [1/1024, 1] (1 / the run's trainers), got {self.share}")

    def encode(self) -> bytes:
        wire = {name: getattr(self, name) for name in _REQUEST_TYPES if name != "tensors"}
        wire["share"] = float(self.share)
        return _pack({**wire, "tensors": [encode_tensor(t) for t in self.tensors]})

    @classmethod
    def decode(cls, data: bytes) -> StageRequest:
        wire = _unpack(data)
        _check_fields(wire, _REQUEST_TYPES, "request")
        return cls(**{**wire, "tensors": tuple(decode_tensor(t) for t in wire["tensors"])})


_REPLY_TYPES: dict[str, type] = {
    "ok": bool,
    "reason": str,
    "version": int,
    "load": int,
    "missing": list,
    "applied": list,
    "tensors": list,
    "digest": bytes,
    "history": bytes,
}
MAX_APPLIED = 256  # (trainer, step) pairs a state reply carries


@dataclass(frozen=True)
class StageReply:
    """A server's answer: ``ok`` or a reason; the stage's version (updates applied) and queue length."""

    ok: bool
    reason: str = ""  # why not ok; "busy" means the server's GPU is in use by another process
    version: int = 0  # optimizer steps this server has applied to the stage
    load: int = 0  # requests waiting at the server when it answered
    missing: tuple[int, ...] = ()  # commit: micro-batches whose backward this server lacks
    # state: the latest steps applied, each (trainer, step, gradients digest, the trainer's step proof: proofs.py)
    applied: tuple[tuple[str, int, bytes, bytes], ...] = ()
    tensors: tuple[torch.Tensor, ...] = field(default=())
    digest: bytes = b""  # commit: the step's summed gradients' digest, for the trainer to sign (proofs.py);
    # weights: the digest of the stage's parameters (agreement.py)
    history: bytes = b""  # state, weights: the hash chain of the updates behind this version (agreement.py)

    def encode(self) -> bytes:
        wire = {name: getattr(self, name) for name in _REPLY_TYPES if name != "tensors"}
        wire["reason"] = self.reason[:200]
        wire["missing"] = list(self.missing)
        wire["applied"] = [list(pair) for pair in self.applied[-MAX_APPLIED:]]
        return _pack({**wire, "tensors": [encode_tensor(t) for t in self.tensors]})

    @classmethod
    def decode(cls, data: bytes) -> StageReply:
        wire = _unpack(data)
        _check_fields(wire, _REPLY_TYPES, "reply")
        missing, applied = wire["missing"], wire["applied"]
        if len(missing) > 64 or not all(isinstance(m, int) and 0 <= m < 64 for m in missing):
            raise StageMessageError("reply.missing must list micro-batch numbers in [0, 64)")
        if len(applied) > MAX_APPLIED or not all(_applied_entry(p) for p in applied):
            raise StageMessageError(
                f"reply.applied must hold at most {MAX_APPLIED} [trainer, step, digest, proof] entries"
            )
        if len(wire["digest"]) not in (0, 32) or len(wire["history"]) not in (0, 32):
            raise StageMessageError("reply.digest and reply.history must be empty or 32 bytes")
        return cls(
            ok=wire["ok"],
            reason=wire["reason"],
            version=wire["version"],
            load=wire["load"],
            missing=tuple(missing),
            applied=tuple((p[0], p[1], p[2], p[3]) for p in applied),
            tensors=tuple(decode_tensor(t) for t in wire["tensors"]),
            digest=wire["digest"],
            history=wire["history"],
        )


def _applied_entry(entry: object) -> bool:
    """Whether ``entry`` is a wire [trainer, step, digest, proof] of a state reply (sizes bounded)."""
    return (
        isinstance(entry, list)
        and len(entry) == 4
        and isinstance(entry[0], str)
        and len(entry[0]) <= 128
        and isinstance(entry[1], int)
        and isinstance(entry[2], bytes)
        and len(entry[2]) <= 32
        and isinstance(entry[3], bytes)
        and len(entry[3]) <= PROOF_BYTES
    )


def check_hidden_states(
    request: StageRequest, count: int, max_batch: int, model: ModelConfig
) -> tuple[torch.Tensor, ...]:
    """The request's tensors, if they are ``count`` finite hidden states of one shape the model takes.

    Raises:
        StageMessageError: the count, the shape ``[1..max_batch, 1..context, d_model]`` or a value is wrong.
    """
    if len(request.tensors) != count:
        raise StageMessageError(f"{request.method} takes {count} tensor(s), got {len(request.tensors)}")
    shape = request.tensors[0].shape
    if not (
        len(shape) == 3 and 1 <= shape[0] <= max_batch and 1 <= shape[1] <= model.context and shape[2] == model.d_model
    ):
        raise StageMessageError(
            f"hidden states must be [1..{max_batch}, 1..{model.context}, {model.d_model}], got {list(shape)}"
        )
    if any(t.shape != shape or not torch.isfinite(t).all() for t in request.tensors):
        raise StageMessageError("tensors must share one shape and be finite")
    return request.tensors


def check_gradients(tensors: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> None:
    """Refuse replicated gradients that do not match the stage's parameters one to one, or are not finite."""
    if len(tensors) != len(params) or any(
        t.shape != p.shape or not torch.isfinite(t).all() for t, p in zip(tensors, params, strict=True)
    ):
        raise StageMessageError("replicated gradients must match the stage's parameters and be finite")

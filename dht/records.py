"""Typed, signed records: what a node publishes about itself in the swarm.

Wire form (msgpack, never pickle): ``[RECORD_TAG, body, signature]`` where ``body`` is the
msgpack encoding of a map with exactly the fields of :class:`PeerRecord` (less the signature)
and ``signature`` is the record-signing key's Ed25519 signature over ``RECORD_TAG || body``.
Signing the exact body bytes means a verifier never re-encodes, so there is no canonical-form
ambiguity to exploit. The body names the PeerID, carries the signing public key and the
PeerID owner's binding of that key (see ``identity.py``), so a record verifies from its own
bytes and its DHT subkey.

Every decode is bounded: total size, string and binary lengths, list lengths, and the exact
set and types of fields. A record that breaks any rule raises :class:`RecordError` with the
reason; the validator logs it and drops the record.
"""

from __future__ import annotations

import math
import struct
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import msgpack

from dht.envelope import check_signature, open_envelope, seal
from dht.identity import NodeIdentity
from dht.wire import WireError, unpack_bounded

RECORD_TAG = "zen/peer-record/v1"
MAX_RECORD_BYTES = 64 * 1024
MAX_RUN_CONFIG_BYTES = 8 * 1024
MAX_STR_BYTES = 4096  # longest UTF-8 string the decoder accepts; signing enforces the same bound
MAX_UINT64 = 2**64 - 1  # msgpack's largest integer
SKETCH_DIM = 256  # floats in a data sketch
ROLES = frozenset({"trainer", "server", "bootstrap"})
DEVICE_KINDS = frozenset({"cpu", "cuda", "mps", "xpu", "none"})
MAX_STAGES = 64  # most pipeline stages a run has, and a server may announce
MAX_RECENT_ROUNDS = 16  # (round, loss, bytes) entries a record carries, so a poller misses no short round
MAX_SERVED_PER_SECOND = 1e9  # the largest throughput a server may announce


class RecordError(ValueError):
    """A record failed a schema, size or signature check; the message says which."""


@dataclass(frozen=True)
class Capacity:
    """What a node measured about its hardware at enrollment."""

    device_kind: str = "cpu"  # one of DEVICE_KINDS
    device_name: str = ""  # e.g. "NVIDIA H100 80GB HBM3" or the CPU model
    memory_bytes: int = 0  # usable device memory (host RAM for a CPU node)
    samples_per_second: float = 0.0  # measured training throughput on the run's model
    upload_bytes_per_second: float = 0.0  # estimated upload bandwidth


@dataclass(frozen=True)
class PeerRecord:
    """A node's signed self-description, published under the run's peers key, one subkey per PeerID."""

    peer_id: str  # base58 libp2p PeerID (Ed25519)
    signing_key: bytes  # Ed25519 public key that signs this record
    binding: bytes  # PeerID owner's signature over the signing key (identity.BIND_CONTEXT)
    x25519_key: bytes  # long-term X25519 public key for pairwise channels
    version: str  # software version, e.g. "0.1.0"
    run_hash: str  # hex digest of the run's configuration; peers of one run agree on it
    capacity: Capacity
    sketch: bytes  # SKETCH_DIM little-endian float32: a coarse summary of the node's data
    roles: tuple[str, ...]  # subset of ROLES
    round: int  # the last outer round this node completed
    state_digest: bytes  # BLAKE2b-16 of the node's global parameters at ``round`` (b"" if none)
    timestamp: float  # DHT time at signing
    maddrs: tuple[str, ...] = field(default=())  # multiaddrs others may dial
    run_config: bytes = b""  # msgpack of the run's configuration, so a mismatch can be named
    ttl: float = 60.0  # seconds the signer wants this record to live; signed, so nobody can extend it
    epsilon: float = -1.0  # differential privacy spent so far (at the run's delta); -1 without DP
    stages: tuple[int, ...] = field(
        default=()
    )  # pipeline stages this server hosts (node/sharding/stages.py); () if none
    eval_loss: float = -1.0  # held-out loss after ``round`` (the dashboard's chart); -1 if none
    round_bytes: int = 0  # bytes this node sent during ``round`` (the dashboard's chart); 0 if none
    recent_rounds: tuple[tuple[int, float, int], ...] = field(
        default=()
    )  # the last rounds' (round, eval_loss, round_bytes), oldest first, at most MAX_RECENT_ROUNDS; () if none
    served_per_second: float = -1.0  # sequences a server's stages computed per second lately; -1 if not measured

    def sketch_vector(self) -> list[float]:
        return list(struct.unpack(f"<{SKETCH_DIM}f", self.sketch))

    def sign(self, identity: NodeIdentity) -> bytes:
        """Encode and sign this record with ``identity``; the record must name ``identity``'s keys."""
        if self.peer_id != identity.peer_id or self.signing_key != identity.signing_public_key:
            raise RecordError("a record must be signed by the identity it names")
        _check_fields(self)
        body = msgpack.packb(_to_wire(self), use_bin_type=True)
        envelope = seal(RECORD_TAG, body, identity.sign)
        if len(envelope) > MAX_RECORD_BYTES:
            raise RecordError(f"record is {len(envelope)} bytes, over the {MAX_RECORD_BYTES}-byte limit")
        return envelope

    @classmethod
    def verify(cls, envelope: bytes) -> PeerRecord:
        """Decode ``envelope`` and check its schema, signature and key binding.

        Raises:
            RecordError: with the first rule the envelope breaks.
        """
        if not isinstance(envelope, bytes):
            raise RecordError(f"record must be bytes, got {type(envelope).__name__}")
        if len(envelope) > MAX_RECORD_BYTES:
            raise RecordError(f"record is {len(envelope)} bytes, over the {MAX_RECORD_BYTES}-byte limit")
        body, signature = open_envelope(envelope, RECORD_TAG, _unpack, RecordError, "peer record")
        record = _from_wire(_unpack(body))
        signer = (record.peer_id, record.signing_key, record.binding)
        check_signature(RECORD_TAG, body, signature, signer, RecordError, "peer record")
        return record


def encode_sketch(values: list[float]) -> bytes:
    """Pack a data sketch of SKETCH_DIM floats for a record."""
    if len(values) != SKETCH_DIM:
        raise ValueError(f"a sketch has {SKETCH_DIM} values, got {len(values)}")
    return struct.pack(f"<{SKETCH_DIM}f", *values)


def _unpack(data: bytes) -> Any:
    try:
        return unpack_bounded(data, max_str=MAX_STR_BYTES, max_bin=MAX_RECORD_BYTES, max_array=64, max_map=32)
    except WireError as e:
        raise RecordError(str(e)) from None


def _to_wire(record: PeerRecord) -> dict[str, Any]:
    wire = asdict(record)
    wire["roles"] = list(record.roles)
    wire["maddrs"] = list(record.maddrs)
    # Optional fields leave the wire when they hold their default, so a record without them
    # is byte-for-byte what older nodes sign and accept.
    for name, default in _OPTIONAL_FIELDS.items():
        if wire[name] == default:
            del wire[name]
        elif isinstance(default, tuple):
            wire[name] = [list(item) if isinstance(item, tuple) else item for item in wire[name]]
    return wire


_CAPACITY_TYPES: dict[str, type | tuple[type, ...]] = {
    "device_kind": str,
    "device_name": str,
    "memory_bytes": int,
    "samples_per_second": (int, float),
    "upload_bytes_per_second": (int, float),
}
_RECORD_TYPES: dict[str, type | tuple[type, ...]] = {
    "peer_id": str,
    "signing_key": bytes,
    "binding": bytes,
    "x25519_key": bytes,
    "version": str,
    "run_hash": str,
    "capacity": dict,
    "sketch": bytes,
    "roles": list,
    "round": int,
    "state_digest": bytes,
    "timestamp": (int, float),
    "maddrs": list,
    "run_config": bytes,
    "ttl": (int, float),
    "epsilon": (int, float),
    "stages": list,
    "eval_loss": (int, float),
    "round_bytes": int,
    "recent_rounds": list,
    "served_per_second": (int, float),
}
# Fields that may be absent on the wire (then their default), and their defaults.
_OPTIONAL_FIELDS: dict[str, Any] = {
    "stages": (),
    "eval_loss": -1.0,
    "round_bytes": 0,
    "recent_rounds": (),
    "served_per_second": -1.0,
}


def _check_types(
    obj: Any, types: dict[str, type | tuple[type, ...]], what: str, optional: tuple[str, ...] = ()
) -> None:
    if not isinstance(obj, dict) or not set(types) - set(optional) <= set(obj) <= set(types):
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise RecordError(f"{what} fields must be exactly {sorted(types)}, got {got}")
    for name, expected in types.items():
        if name not in obj:
            continue
        value = obj[name]
        if isinstance(value, bool) or not isinstance(value, expected):
            raise RecordError(f"{what}.{name} has type {type(value).__name__}")


def _from_wire(wire: Any) -> PeerRecord:
    _check_types(wire, _RECORD_TYPES, "record", tuple(_OPTIONAL_FIELDS))
    _check_types(wire["capacity"], _CAPACITY_TYPES, "capacity")
    if not all(isinstance(item, str) for item in wire["roles"] + wire["maddrs"]):
        raise RecordError("roles and maddrs must be lists of strings")
    stages = wire.get("stages", [])
    if not all(isinstance(item, int) and not isinstance(item, bool) for item in stages):
        raise RecordError("record.stages must be a list of integers")
    values = dict(wire)
    values["stages"] = tuple(stages)
    values["recent_rounds"] = _recent_rounds_from_wire(wire.get("recent_rounds", []))
    values["capacity"] = Capacity(**wire["capacity"])
    values["roles"] = tuple(wire["roles"])
    values["maddrs"] = tuple(wire["maddrs"])
    record = PeerRecord(**values)
    _check_fields(record)
    return record


def _recent_rounds_from_wire(items: list[Any]) -> tuple[tuple[int, float, int], ...]:
    """``[[round, loss, bytes], ...]`` -> tuples, types checked (ranges are ``_check_recent_rounds``'s)."""
    if len(items) > MAX_RECENT_ROUNDS:
        raise RecordError(f"record.recent_rounds holds at most {MAX_RECENT_ROUNDS} entries")
    entries = []
    for item in items:
        if not isinstance(item, list) or len(item) != 3:
            raise RecordError("record.recent_rounds entries must be [round, eval_loss, round_bytes]")
        round_no, loss, sent = item
        if any(isinstance(v, bool) for v in item) or not isinstance(round_no, int) or not isinstance(sent, int):
            raise RecordError("record.recent_rounds: round and round_bytes must be integers")
        if not isinstance(loss, int | float):
            raise RecordError("record.recent_rounds: eval_loss must be a number")
        entries.append((round_no, float(loss), sent))
    return tuple(entries)


def _check_recent_rounds(record: PeerRecord) -> None:
    """At most MAX_RECENT_ROUNDS entries, rounds increasing up to ``record.round``, each figure in range."""
    entries = record.recent_rounds
    if len(entries) > MAX_RECENT_ROUNDS:
        raise RecordError(f"record.recent_rounds holds at most {MAX_RECENT_ROUNDS} entries")
    previous = -1
    for round_no, loss, sent in entries:
        if not previous < round_no <= record.round:
            raise RecordError("record.recent_rounds: rounds must increase and not pass record.round")
        if not (loss == -1 or (math.isfinite(loss) and 0 <= loss <= 1e6)):
            raise RecordError("record.recent_rounds: eval_loss must be -1 (none) or in [0, 1e6]")
        if not 0 <= sent <= MAX_UINT64:
            raise RecordError("record.recent_rounds: round_bytes must be a non-negative 64-bit integer")
        previous = round_no


def _check_fields(record: PeerRecord) -> None:
    """Range checks shared by signing and verification."""
    for name, size in (("signing_key", 32), ("binding", 64), ("x25519_key", 32)):
        if len(getattr(record, name)) != size:
            raise RecordError(f"record.{name} must be {size} bytes")
    if len(record.sketch) != 4 * SKETCH_DIM:
        raise RecordError(f"record.sketch must hold {SKETCH_DIM} float32 values")
    if not all(math.isfinite(v) for v in record.sketch_vector()):
        raise RecordError("record.sketch holds a non-finite value")
    if len(record.state_digest) not in (0, 16):
        raise RecordError("record.state_digest must be empty or 16 bytes")
    if not (record.epsilon == -1 or (math.isfinite(record.epsilon) and 0 <= record.epsilon <= 1e6)):
        raise RecordError("record.epsilon must be -1 (no differential privacy) or in [0, 1e6]")
    if not (record.eval_loss == -1 or (math.isfinite(record.eval_loss) and 0 <= record.eval_loss <= 1e6)):
        raise RecordError("record.eval_loss must be -1 (none yet) or in [0, 1e6]")
    if not 0 <= record.round_bytes <= MAX_UINT64:
        raise RecordError("record.round_bytes must be a non-negative 64-bit integer")
    if not record.roles or not set(record.roles) <= ROLES or len(set(record.roles)) != len(record.roles):
        raise RecordError(f"record.roles must be distinct names from {sorted(ROLES)}")
    if record.capacity.device_kind not in DEVICE_KINDS:
        raise RecordError(f"capacity.device_kind must be one of {sorted(DEVICE_KINDS)}")
    numbers = [record.capacity.memory_bytes, record.capacity.samples_per_second]
    numbers += [record.capacity.upload_bytes_per_second, record.round]
    if record.capacity.memory_bytes > MAX_UINT64 or record.round > MAX_UINT64:  # before isfinite: it overflows
        raise RecordError("capacity.memory_bytes and round must fit in 64 bits")
    if any(not math.isfinite(v) or v < 0 for v in numbers):
        raise RecordError("capacity figures and round must be finite and non-negative")
    if any(len(text.encode()) > MAX_STR_BYTES for text in (record.capacity.device_name, *record.maddrs)):
        raise RecordError(f"capacity.device_name and each of record.maddrs must be at most {MAX_STR_BYTES} bytes")
    if not (math.isfinite(record.ttl) and 0 < record.ttl <= 3600):
        raise RecordError("record.ttl must be in (0, 3600] seconds")
    if not math.isfinite(record.timestamp):
        raise RecordError("record.timestamp must be finite")
    if len(record.run_config) > MAX_RUN_CONFIG_BYTES:
        raise RecordError(f"record.run_config is over {MAX_RUN_CONFIG_BYTES} bytes")
    if len(record.stages) > MAX_STAGES or len(set(record.stages)) != len(record.stages):
        raise RecordError(f"record.stages must be at most {MAX_STAGES} distinct stage numbers")
    if any(not 0 <= stage < MAX_STAGES for stage in record.stages):
        raise RecordError(f"record.stages must be in [0, {MAX_STAGES})")
    if (record.stages or record.served_per_second != -1) and "server" not in record.roles:
        raise RecordError("only a record with the server role may announce stages or served_per_second")
    served = record.served_per_second
    if not (served == -1 or (math.isfinite(served) and 0 <= served <= MAX_SERVED_PER_SECOND)):
        raise RecordError(f"record.served_per_second must be -1 (not measured) or in [0, {MAX_SERVED_PER_SECOND:g}]")
    _check_recent_rounds(record)
    if len(record.maddrs) > 16 or len(record.run_hash) > 128 or len(record.version) > 64:
        raise RecordError("record.maddrs, run_hash or version is too long")


RECORD_FIELDS = tuple(f.name for f in fields(PeerRecord))

"""Signed ban records: a trainer's statement that a stage server returned wrong activations.

Wire form, like a PeerRecord: msgpack ``[BAN_TAG, body, signature]``, the body a map with exactly
the fields of :class:`BanRecord` (less the signature), signed with the reporter's record-signing
key, whose binding to the reporter's PeerID travels in the body. ``evidence`` is the BLAKE2b-32
digest of the evidence the reporter keeps (the inputs, the server's output, the weights'
version and the recomputed output): it pins what the claim is about without publishing
activations.

Bans live under ``zen.<run_id>.bans``, subkey ``ban:<banned>:<reporter>`` (not a PeerID string,
so the peer-record validator lets them through); they are checked when read (:func:`list_bans`),
and a value that fails a check is dropped with a logged reason.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import hivemind
import msgpack
import nacl.exceptions
import nacl.signing
from hivemind.utils import get_dht_time

from dht.identity import NodeIdentity, verify_binding
from dht.wire import WireError, unpack_bounded

logger = logging.getLogger(__name__)

BAN_TAG = "zen/ban-record/v1"
MAX_BAN_BYTES = 4096
BAN_TTL = 3600.0  # seconds a ban stays in the DHT


class BanError(ValueError):
    """A ban record failed a schema, size or signature check; the message says which."""


@dataclass(frozen=True)
class BanRecord:
    """A reporter's signed claim that ``banned`` cheated on ``stage`` (evidence digest attached)."""

    reporter: str  # PeerID of the trainer that caught it
    signing_key: bytes  # the reporter's Ed25519 record-signing key
    binding: bytes  # the reporter's PeerID key over the signing key (identity.BIND_CONTEXT)
    banned: str  # PeerID of the stage server
    stage: int  # the stage it served wrongly
    reason: str  # e.g. "forward output differs from recomputation by 0.31 (tolerance 0.001)"
    evidence: bytes  # BLAKE2b-32 of the evidence the reporter keeps
    timestamp: float  # DHT time at signing

    def sign(self, identity: NodeIdentity) -> bytes:
        if self.reporter != identity.peer_id or self.signing_key != identity.signing_public_key:
            raise BanError("a ban record must be signed by the identity it names")
        _check(self)
        body = msgpack.packb(asdict(self), use_bin_type=True)
        return msgpack.packb([BAN_TAG, body, identity.sign(BAN_TAG.encode() + body)], use_bin_type=True)

    @classmethod
    def verify(cls, envelope: Any) -> BanRecord:
        """Decode and check a signed ban record.

        Raises:
            BanError: with the first rule the envelope breaks.
        """
        if not isinstance(envelope, bytes) or len(envelope) > MAX_BAN_BYTES:
            raise BanError(f"a ban record must be bytes of at most {MAX_BAN_BYTES}")
        outer = _unpack(envelope)
        if not (isinstance(outer, list) and len(outer) == 3 and outer[0] == BAN_TAG):
            raise BanError("not a zen ban record envelope")
        _, body, signature = outer
        if not isinstance(body, bytes) or not isinstance(signature, bytes) or len(signature) != 64:
            raise BanError("ban body or signature has the wrong type")
        wire = _unpack(body)
        names = {f.name: f.type for f in fields(cls)}
        if not isinstance(wire, dict) or set(wire) != set(names):
            raise BanError(f"ban fields must be exactly {sorted(names)}")
        types: dict[str, type | tuple[type, ...]] = {"str": str, "bytes": bytes, "int": int, "float": (int, float)}
        for name, type_name in names.items():
            if isinstance(wire[name], bool) or not isinstance(wire[name], types[str(type_name)]):
                raise BanError(f"ban.{name} has type {type(wire[name]).__name__}")
        record = cls(**wire)
        _check(record)
        try:
            nacl.signing.VerifyKey(record.signing_key).verify(BAN_TAG.encode() + body, signature)
        except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError) as e:
            raise BanError("ban signature does not verify") from e
        if not verify_binding(record.reporter, record.signing_key, record.binding):
            raise BanError("ban signing key is not bound to the reporter's PeerID")
        return record


def _check(record: BanRecord) -> None:
    if len(record.signing_key) != 32 or len(record.binding) != 64 or len(record.evidence) != 32:
        raise BanError("ban.signing_key, binding and evidence must be 32, 64 and 32 bytes")
    if not (0 <= record.stage < 64 and math.isfinite(record.timestamp)):
        raise BanError("ban.stage must be in [0, 64) and ban.timestamp finite")
    if max(len(record.reporter), len(record.banned)) > 64 or len(record.reason) > 512:
        raise BanError("ban.reporter, banned or reason is too long")


def _unpack(data: bytes) -> Any:
    try:
        return unpack_bounded(data, max_str=1024, max_bin=MAX_BAN_BYTES, max_array=8, max_map=16)
    except WireError as e:
        raise BanError(str(e)) from None


def bans_key(run_id: str) -> str:
    """The DHT key under which ban records of ``run_id`` are stored."""
    return f"zen.{run_id}.bans"


def publish_ban(dht: hivemind.DHT, run_id: str, envelope: bytes, ttl: float = BAN_TTL) -> bool:
    """Store a signed ban record; return whether any replica accepted it."""
    record = BanRecord.verify(envelope)
    subkey = f"ban:{record.banned}:{record.reporter}"
    return bool(dht.store(bans_key(run_id), envelope, expiration_time=get_dht_time() + ttl, subkey=subkey))


def list_bans(dht: hivemind.DHT, run_id: str) -> list[BanRecord]:
    """The valid ban records of ``run_id`` (invalid ones are logged and skipped)."""
    found = dht.get(bans_key(run_id), latest=True)
    if found is None or not isinstance(found.value, dict):
        return []
    bans = []
    for subkey, item in found.value.items():
        try:
            record = BanRecord.verify(item.value)
            if subkey != f"ban:{record.banned}:{record.reporter}":
                raise BanError("subkey does not name the ban's server and reporter")
            bans.append(record)
        except (BanError, AttributeError) as e:
            logger.warning(f"ignoring a ban record from the DHT: {e}")
    return sorted(bans, key=lambda b: (b.banned, b.reporter))

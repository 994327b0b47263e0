"""Signed ban records: a trainer's statement that a stage server returned wrong activations.

Wire form, like a PeerRecord: msgpack ``[BAN_TAG, body, signature]``, the body a map with exactly
the fields of :class:`BanRecord` (less the signature), signed with the reporter's record-signing
key, whose binding to the reporter's PeerID travels in the body.

Evidence. A ban names the run (its hash), the stage, the weights' version the server reported,
the BLAKE2b-32 digests of the inputs the reporter sent and of the output the server claimed;
``evidence`` is the digest of exactly those fields and the banned PeerID (:func:`evidence_digest`),
and every reader recomputes it, so a ban cannot be moved to another server, stage, version or run.
The tensors themselves stay with the reporter (``<workdir>/evidence/<evidence hex>.msgpack``):
a DHT value is too small for a stage's activations, so a reader cannot recompute the forward
from a ban alone.

Who may ban (:func:`honoured_bans`, read by every trainer). Identities are cheap, so one record
proves little. A ban counts only if it is unexpired, names the reader's run hash and a stage the
banned server's live record lists, and comes from a live trainer record of the same run hash that
announces at least ``min_rounds`` completed rounds (steps, for a sharded trainer). A server banned
by ``quorum`` or more distinct such reporters is excluded; by fewer, only tried after the others.
``round`` is self-declared: the quorum, not the round, is what a lone Sybil cannot fake.

Expiry. A ban signs its own ``ttl`` (at most ``MAX_BAN_TTL``); the DHT validator (dht/validator.py)
refuses a stored ban whose expiration lies past ``timestamp + ttl``, and readers drop expired ones,
so the set of banned servers shrinks when their bans run out.

Bans live under ``zen.<run_id>.bans``, subkey ``ban:<banned>:<reporter>`` (not a PeerID string,
so the peer-record rules do not apply to them); they are checked when read (:func:`list_bans`),
and a value that fails a check is dropped with a logged reason.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any

import hivemind
import msgpack
from hivemind.utils import get_dht_time

from dht.envelope import check_signature, open_envelope, seal
from dht.identity import NodeIdentity
from dht.records import PeerRecord
from dht.wire import WireError, unpack_bounded

logger = logging.getLogger(__name__)

BAN_TAG = "zen/ban-record/v1"
MAX_BAN_BYTES = 4096
MAX_BAN_TTL = 3600.0  # longest life a ban may sign for itself; validators and readers enforce it
BAN_TTL = MAX_BAN_TTL  # seconds a ban stays in the DHT unless its reporter asks for less
EVIDENCE_CONTEXT = b"zen-federation/ban-evidence/v1"
MAX_BAN_SKEW = 30.0  # seconds a reporter's clock may run ahead of ours


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
    evidence: bytes  # evidence_digest() of the fields below and ``banned``; readers recompute it
    timestamp: float  # DHT time at signing
    run_hash: str  # the run's configuration hash (RunConfig.digest())
    version: int  # the stage's version the server reported for the wrong output
    inputs_digest: bytes  # BLAKE2b-32 of the inputs the reporter sent (shape and float32 bytes)
    output_digest: bytes  # BLAKE2b-32 of the output the server claimed
    ttl: float = BAN_TTL  # seconds the ban lives after ``timestamp``, in (0, MAX_BAN_TTL]

    @property
    def expires(self) -> float:
        """DHT time after which the ban no longer counts."""
        return self.timestamp + self.ttl

    def sign(self, identity: NodeIdentity) -> bytes:
        if self.reporter != identity.peer_id or self.signing_key != identity.signing_public_key:
            raise BanError("a ban record must be signed by the identity it names")
        _check(self)
        body = msgpack.packb(asdict(self), use_bin_type=True)
        return seal(BAN_TAG, body, identity.sign)

    @classmethod
    def verify(cls, envelope: Any) -> BanRecord:
        """Decode and check a signed ban record.

        Raises:
            BanError: with the first rule the envelope breaks.
        """
        if not isinstance(envelope, bytes) or len(envelope) > MAX_BAN_BYTES:
            raise BanError(f"a ban record must be bytes of at most {MAX_BAN_BYTES}")
        body, signature = open_envelope(envelope, BAN_TAG, _unpack, BanError, "ban record")
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
        signer = (record.reporter, record.signing_key, record.binding)
        check_signature(BAN_TAG, body, signature, signer, BanError, "ban record")
        return record


def evidence_digest(
    run_hash: str, banned: str, stage: int, version: int, inputs_digest: bytes, output_digest: bytes
) -> bytes:
    """BLAKE2b-32 of what a ban claims: the server, the run, the stage, the version, inputs and output."""
    fields_ = [run_hash, banned, stage, version, inputs_digest, output_digest]
    return hashlib.blake2b(EVIDENCE_CONTEXT + msgpack.packb(fields_, use_bin_type=True), digest_size=32).digest()


def _check(record: BanRecord) -> None:
    if len(record.signing_key) != 32 or len(record.binding) != 64 or len(record.evidence) != 32:
        raise BanError("ban.signing_key, binding and evidence must be 32, 64 and 32 bytes")
    if len(record.inputs_digest) != 32 or len(record.output_digest) != 32 or len(record.run_hash) > 64:
        raise BanError("ban.inputs_digest and output_digest must be 32 bytes, run_hash at most 64 characters")
    if not (0 <= record.stage < 64 and 0 <= record.version < 2**63 and math.isfinite(record.timestamp)):
        raise BanError("ban.stage must be in [0, 64), ban.version in [0, 2^63) and ban.timestamp finite")
    if not (math.isfinite(record.ttl) and 0 < record.ttl <= MAX_BAN_TTL):
        raise BanError(f"ban.ttl must be in (0, {MAX_BAN_TTL:.0f}] seconds, got {record.ttl}")
    if max(len(record.reporter), len(record.banned)) > 64 or len(record.reason) > 512:
        raise BanError("ban.reporter, banned or reason is too long")
    expected = evidence_digest(
        record.run_hash, record.banned, record.stage, record.version, record.inputs_digest, record.output_digest
    )
    if record.evidence != expected:
        raise BanError("ban.evidence is not the digest of the ban's server, run, stage, version, inputs and output")


def _unpack(data: bytes) -> Any:
    try:
        return unpack_bounded(data, max_str=1024, max_bin=MAX_BAN_BYTES, max_array=8, max_map=16)
    except WireError as e:
        raise BanError(str(e)) from None


def bans_key(run_id: str) -> str:
    """The DHT key under which ban records of ``run_id`` are stored."""
    return f"zen.{run_id}.bans"


def ban_subkey(record: BanRecord) -> str:
    """The DHT subkey a ban is stored under: one per (banned server, reporter)."""
    return f"ban:{record.banned}:{record.reporter}"


def check_stored_ban(subkey: Any, envelope: Any, expiration_time: float, now: float | None = None) -> BanRecord:
    """The ban inside a DHT entry, if its subkey, signature and expiry are right (what a validator checks).

    Raises:
        BanError: with the first rule the entry breaks; an expired or too long-lived ban among them.
    """
    record = BanRecord.verify(envelope)
    now = get_dht_time() if now is None else now
    if subkey != ban_subkey(record):
        raise BanError("subkey does not name the ban's server and reporter")
    if record.timestamp > now + MAX_BAN_SKEW:
        raise BanError(f"ban signed {record.timestamp - now:.0f}s in the future")
    if expiration_time > record.expires + 1e-3:
        raise BanError(f"ban stored to expire {expiration_time - record.timestamp:.0f}s after signing, past its ttl")
    if min(expiration_time, record.expires) <= now:
        raise BanError(f"ban of {record.banned[:16]} expired")
    return record


def publish_ban(dht: hivemind.DHT, run_id: str, envelope: bytes, ttl: float = BAN_TTL) -> bool:
    """Store a signed ban record (for at most its signed ttl); return whether any replica accepted it."""
    record = BanRecord.verify(envelope)
    expiration = min(get_dht_time() + ttl, record.expires)
    return bool(dht.store(bans_key(run_id), envelope, expiration_time=expiration, subkey=ban_subkey(record)))


def list_bans(dht: hivemind.DHT, run_id: str) -> list[BanRecord]:
    """The valid, unexpired ban records of ``run_id`` (invalid ones are logged and skipped)."""
    found = dht.get(bans_key(run_id), latest=True)
    if found is None or not isinstance(found.value, dict):
        return []
    bans, now = [], get_dht_time()
    for subkey, item in found.value.items():
        try:
            bans.append(check_stored_ban(subkey, item.value, item.expiration_time, now))
        except (BanError, AttributeError) as e:
            logger.warning(f"ignoring a ban record from the DHT: {e}")
    return sorted(bans, key=lambda b: (b.banned, b.reporter))


def honoured_bans(
    bans: Iterable[BanRecord],
    records: Iterable[PeerRecord],
    run_hash: str,
    min_rounds: int,
    quorum: int,
    now: float | None = None,
) -> tuple[set[str], set[str]]:
    """Which servers the bans exclude, and which they only deprioritize (module docstring: who may ban).

    Args:
        bans: verified ban records (:func:`list_bans`).
        records: the run's live peer records (``dht.list_peers``).
        run_hash: the reader's run hash; bans and records of other runs do not count.
        min_rounds: rounds a reporter's record must announce for its bans to count.
        quorum: distinct counted reporters that exclude a server; fewer only deprioritize it.
        now: DHT time (default: now).

    Returns:
        (excluded, deprioritized): PeerIDs of servers banned by at least ``quorum`` reporters,
        and of those banned by at least one but fewer.
    """
    now = get_dht_time() if now is None else now
    live = [r for r in records if r.run_hash == run_hash]
    reporters = {r.peer_id for r in live if "trainer" in r.roles and r.round >= min_rounds}
    stages = {r.peer_id: set(r.stages) for r in live if "server" in r.roles}
    counted: dict[str, set[str]] = collections.defaultdict(set)
    for ban in bans:
        if ban.run_hash != run_hash or ban.expires <= now or ban.stage not in stages.get(ban.banned, ()):
            logger.debug(f"ban of {ban.banned[:16]} by {ban.reporter[:16]} names another run, stage or expired")
        elif ban.reporter not in reporters or ban.reporter == ban.banned:
            logger.debug(f"ban of {ban.banned[:16]} by {ban.reporter[:16]}: not a trainer of {min_rounds}+ rounds")
        else:
            counted[ban.banned].add(ban.reporter)
    excluded = {server for server, who in counted.items() if len(who) >= quorum}
    return excluded, set(counted) - excluded

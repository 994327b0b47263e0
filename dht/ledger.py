"""Signed ledger summaries: each node's running total of what it gave a run, one DHT entry per node.

A node keeps a signed receipt of every round it contributed to (node/ledger/receipts.py, in its
workdir); what it publishes is the running summary of those receipts: rounds in U (rounds whose
agreed contributor set named it), samples, compute seconds, the last round counted, and a digest
chaining its receipts' signatures, so the summary commits to the receipts a node can show later.

Wire form, like a PeerRecord: msgpack ``[LEDGER_TAG, body, signature]``, ``body`` the msgpack map of
exactly the fields of :class:`LedgerSummary`, signed with the node's record-signing key over
``LEDGER_TAG || body``; the body carries that key and the PeerID owner's binding of it
(dht/identity.py), so a summary verifies from its own bytes. It lives under
``zen.<run_id>.ledger`` with the signer's PeerID as subkey: a node can publish only its own entry.

The validator (dht/validator.py) checks every entry on the way in and out: the schema and size
bounds, the signature and binding, the subkey against the signed PeerID, the DHT key against the
signed run id (so an entry is not replayed under another run), and the expiry against the signed
``timestamp + ttl`` (at most ``MAX_SUMMARY_TTL``): hivemind keeps whichever value expires later, so
an old summary can never shadow a newer one of the same node. Readers (:func:`list_summaries`)
verify again and keep what fails, with the reason, so a caller can mark a claim unverified
instead of dropping it silently.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import hivemind
import msgpack
from hivemind.dht.routing import DHTID
from hivemind.utils import get_dht_time

from dht.envelope import check_signature, open_envelope, seal
from dht.identity import NodeIdentity
from dht.wire import WireError, unpack_bounded

logger = logging.getLogger(__name__)

LEDGER_TAG = "zen/ledger-summary/v1"
MAX_SUMMARY_BYTES = 2048  # a signed summary is about 400 bytes; anything longer is refused
MAX_SUMMARY_TTL = 3600.0  # longest life a summary may sign for itself
SUMMARY_TTL = MAX_SUMMARY_TTL  # what nodes sign by default (refreshed each round and every few minutes)
MAX_SUMMARY_SKEW = 30.0  # seconds a signer's clock may run ahead of ours
MAX_DISPLAY_NAME = 64  # characters of an opted-in display name
MAX_COUNT = 2**63 - 1
MAX_COMPUTE_SECONDS = 1e12


class LedgerError(ValueError):
    """A ledger summary failed a schema, size or signature check; the message says which."""


@dataclass(frozen=True)
class LedgerSummary:
    """A node's signed running total of its contribution to one run."""

    peer_id: str  # the contributor's PeerID (the entry's subkey)
    signing_key: bytes  # its Ed25519 record-signing key
    binding: bytes  # the PeerID key's signature over the signing key (identity.BIND_CONTEXT)
    run_id: str  # the run; the DHT key must be this run's ledger key
    run_hash: str  # the run's configuration hash (RunConfig.digest())
    rounds: int  # rounds whose agreed contributor set (U) named this node
    samples: int  # training samples behind the updates of those rounds
    compute_seconds: float  # seconds of inner steps behind them
    last_round: int  # the latest round counted (>= rounds)
    receipts_digest: bytes  # BLAKE2b-32 chain over the receipts' signatures (node/ledger/receipts.py)
    timestamp: float  # DHT time at signing
    ttl: float = SUMMARY_TTL  # seconds the entry may live after ``timestamp``, in (0, MAX_SUMMARY_TTL]
    display_name: str = ""  # a name the node opted into; "" shows the PeerID

    @property
    def expires(self) -> float:
        return self.timestamp + self.ttl

    def sign(self, identity: NodeIdentity) -> bytes:
        """Encode and sign this summary with ``identity``, which it must name."""
        if self.peer_id != identity.peer_id or self.signing_key != identity.signing_public_key:
            raise LedgerError("a ledger summary must be signed by the identity it names")
        _check(self)
        body = msgpack.packb(asdict(self), use_bin_type=True)
        envelope = seal(LEDGER_TAG, body, identity.sign)
        if len(envelope) > MAX_SUMMARY_BYTES:
            raise LedgerError(f"ledger summary is {len(envelope)} bytes, over the {MAX_SUMMARY_BYTES}-byte limit")
        return envelope

    @classmethod
    def verify(cls, envelope: Any) -> LedgerSummary:
        """Decode ``envelope`` and check its size, schema, signature and key binding.

        Raises:
            LedgerError: with the first rule the envelope breaks.
        """
        body, signature = _open(envelope)
        summary = cls.decode_claim(body)
        _check(summary)
        signer = (summary.peer_id, summary.signing_key, summary.binding)
        check_signature(LEDGER_TAG, body, signature, signer, LedgerError, "ledger summary")
        return summary

    @classmethod
    def decode_claim(cls, body: Any) -> LedgerSummary:
        """The summary a body claims, schema-checked but NOT verified (to show what a bad entry claimed)."""
        wire = _unpack(body) if isinstance(body, bytes) else None
        types = {f.name: _TYPES[str(f.type)] for f in fields(cls)}
        if not isinstance(wire, dict) or set(wire) != set(types):
            raise LedgerError(f"ledger summary fields must be exactly {sorted(types)}")
        for name, expected in types.items():
            if isinstance(wire[name], bool) or not isinstance(wire[name], expected):
                raise LedgerError(f"ledger summary.{name} has type {type(wire[name]).__name__}")
        return cls(**wire)


def claimed_summary(envelope: Any) -> LedgerSummary | None:
    """What an envelope claims, whether or not it verifies (None when it does not even decode)."""
    try:
        return LedgerSummary.decode_claim(_open(envelope)[0])
    except LedgerError:
        return None


_TYPES: dict[str, type | tuple[type, ...]] = {"str": str, "bytes": bytes, "int": int, "float": (int, float)}


def _open(envelope: Any) -> tuple[bytes, bytes]:
    if not isinstance(envelope, bytes) or len(envelope) > MAX_SUMMARY_BYTES:
        raise LedgerError(f"a ledger summary must be bytes of at most {MAX_SUMMARY_BYTES}")
    return open_envelope(envelope, LEDGER_TAG, _unpack, LedgerError, "ledger summary")


def _check(summary: LedgerSummary) -> None:
    """Range checks shared by signing and verification."""
    if len(summary.signing_key) != 32 or len(summary.binding) != 64 or len(summary.receipts_digest) != 32:
        raise LedgerError("ledger summary signing_key, binding and receipts_digest must be 32, 64 and 32 bytes")
    if len(summary.peer_id) > 64 or len(summary.run_id) > 128 or len(summary.run_hash) > 128:
        raise LedgerError("ledger summary peer_id, run_id or run_hash is too long")
    if len(summary.display_name) > MAX_DISPLAY_NAME or not summary.display_name.isprintable():
        raise LedgerError(f"ledger summary display_name must be at most {MAX_DISPLAY_NAME} printable characters")
    counts = (summary.rounds, summary.samples, summary.last_round)
    if any(not 0 <= count <= MAX_COUNT for count in counts) or summary.rounds > summary.last_round:
        raise LedgerError("ledger summary rounds, samples and last_round must be in [0, 2^63), rounds <= last_round")
    if not (math.isfinite(summary.compute_seconds) and 0 <= summary.compute_seconds <= MAX_COMPUTE_SECONDS):
        raise LedgerError(f"ledger summary compute_seconds must be in [0, {MAX_COMPUTE_SECONDS:g}]")
    if not (math.isfinite(summary.ttl) and 0 < summary.ttl <= MAX_SUMMARY_TTL and math.isfinite(summary.timestamp)):
        raise LedgerError(f"ledger summary ttl must be in (0, {MAX_SUMMARY_TTL:.0f}] s and its timestamp finite")


def _unpack(data: bytes) -> Any:
    try:
        return unpack_bounded(
            data, max_bytes=MAX_SUMMARY_BYTES, max_str=256, max_bin=MAX_SUMMARY_BYTES, max_array=4, max_map=16
        )
    except WireError as e:
        raise LedgerError(str(e)) from None


def ledger_key(run_id: str) -> str:
    """The DHT key under which the contributors of ``run_id`` publish their summaries."""
    return f"zen.{run_id}.ledger"


def check_stored_summary(
    key_id: bytes | None, subkey: Any, envelope: Any, expiration_time: float, now: float | None = None
) -> LedgerSummary:
    """The summary inside a DHT entry, if its key, subkey, signature and expiry are right (what a validator checks).

    Args:
        key_id: the DHTID bytes of the entry's key (None: not checked, for a reader that asked for the key).
        subkey: the entry's subkey, decoded; it must be the signer's PeerID.
        envelope: the entry's value, decoded (the signed envelope bytes).
        expiration_time: when the DHT says the entry expires.
        now: DHT time (default: now).

    Raises:
        LedgerError: with the first rule the entry breaks.
    """
    summary = LedgerSummary.verify(envelope)
    now = get_dht_time() if now is None else now
    if subkey != summary.peer_id:
        raise LedgerError(f"subkey does not match the summary's PeerID {summary.peer_id[:16]}")
    if key_id is not None and key_id != DHTID.generate(source=ledger_key(summary.run_id)).to_bytes():
        raise LedgerError(f"summary of run {summary.run_id!r} stored under another key")
    if summary.timestamp > now + MAX_SUMMARY_SKEW:
        raise LedgerError(f"summary signed {summary.timestamp - now:.0f}s in the future")
    if expiration_time > summary.expires + 1e-3:
        raise LedgerError(f"summary stored to expire {expiration_time - summary.timestamp:.0f}s after signing")
    if min(expiration_time, summary.expires) <= now:
        raise LedgerError(f"summary of {summary.peer_id[:16]} expired")
    return summary


def receipts_chain(previous: bytes, signature: bytes) -> bytes:
    """The next link of a summary's ``receipts_digest`` (start from 32 zero bytes)."""
    return hashlib.blake2b(previous + signature, digest_size=32, person=b"zen-receipts").digest()


def publish_summary(dht: hivemind.DHT, envelope: bytes) -> bool:
    """Store a signed summary under its run's ledger key (for its signed ttl); whether any replica accepted it."""
    summary = LedgerSummary.verify(envelope)
    key = ledger_key(summary.run_id)
    return bool(dht.store(key, envelope, expiration_time=summary.expires, subkey=summary.peer_id))


@dataclass(frozen=True)
class SummaryEntry:
    """One entry read from a run's ledger key: the verified summary, or why it failed."""

    subkey: str  # the PeerID the entry is stored under (as found; "?" if not a string)
    envelope: bytes  # the entry's bytes (b"" if not bytes)
    summary: LedgerSummary | None  # None when the entry did not verify
    error: str = ""  # why it did not


def list_summaries(dht: hivemind.DHT, run_id: str) -> list[SummaryEntry]:
    """Every entry under ``run_id``'s ledger key, verified again here; failures are kept with their reason."""
    found = dht.get(ledger_key(run_id), latest=True)
    if found is None or not isinstance(found.value, dict):
        return []
    entries, now = [], get_dht_time()
    for subkey, item in found.value.items():
        value = getattr(item, "value", None)
        envelope = value if isinstance(value, bytes) else b""
        name = "".join(c if c.isprintable() else "?" for c in subkey[:64]) if isinstance(subkey, str) else "?"
        try:
            summary = check_stored_summary(None, subkey, value, float(getattr(item, "expiration_time", 0.0)), now)
            if summary.run_id != run_id:
                raise LedgerError(f"summary names run {summary.run_id!r}")
            entries.append(SummaryEntry(name, envelope, summary))
        except LedgerError as e:
            logger.warning(f"unverified ledger entry {name[:16]}: {e}")
            entries.append(SummaryEntry(name, envelope, None, str(e)))
    return sorted(entries, key=lambda e: e.subkey)

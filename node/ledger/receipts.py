"""Contribution receipts: one signed line in ``<workdir>/ledger.jsonl`` per round a node gave to a group.

A receipt names the run (id and hash), the round, the group's id, the group's agreed contributor
set (U, the PeerIDs whose updates are in the round's sum) and its digest, and this node's samples
and compute seconds for the round. ``contributors_digest`` is the BLAKE2b-32 of the group id, the
round, U and the contributors' round-key fingerprints as the aggregation agreed on them
(:func:`contributors_digest`). Under secure aggregation the receipt also carries the group's
consistency certificate (node/ledger/certificate.py: at least t members' signatures on U, with what
a third party needs to check them against the members' PeerIDs); :func:`certificate_verdict` checks
it against the receipt's run (the certificate names the run's scope), group, round and contributors.
Plain aggregation has no certificate (the digest stands alone), nor has a cohort round that combined
two groups; receipts written before certificates have none either and still verify, their
certificate marked unverified, as do those whose certificate predates the run's scope in it.

A sharded trainer (node/sharding/trainer.py) commits its steps to the stage servers one by one; its
receipt covers ``train.inner_steps`` steps. When its own parts averaged in a group at their end, the
receipt names that group like any group receipt. Otherwise it is of outcome ``sharded``: no group
id, U = the trainer alone, its samples and the seconds of those steps, numbered on from the last
round of its ledger (a restarted trainer keeps counting, its rounds are its own).

Form at rest: a JSON line ``{"receipt": {...}, "body": <base64>, "signature": <hex>}``. ``body`` is
the msgpack map of the receipt's fields (``certificate`` only when there is one), and ``signature``
the node's record-signing key's Ed25519 signature over ``RECEIPT_TAG || body``; the readable
``receipt`` copy must decode to the same values (the certificate there as its BLAKE2b-32), so
editing either is caught. The body carries the signing key and its binding to the PeerID
(dht/identity.py), so anyone holding the file verifies it without the node's keys. Decoding is
bounded msgpack (dht/wire.py); nothing is unpickled.

The node's DHT summary (dht/ledger.py) is the running total of its receipts (:func:`totals`), and
its ``receipts_digest`` chains the receipts' signatures in order, so the published figures commit
to the lines in this file.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import msgpack
import nacl.exceptions
import nacl.signing

from dht.identity import NodeIdentity, verify_binding
from dht.ledger import receipts_chain
from dht.wire import WireError, unpack_bounded
from node.ledger.certificate import (
    MAX_CERTIFICATE_BYTES,
    CertificateError,
    Certified,
    GroupCertificate,
    UnboundCertificateError,
)

logger = logging.getLogger(__name__)

RECEIPTS_FILE = "ledger.jsonl"
RECEIPT_TAG = "zen/ledger-receipt/v1"
MAX_RECEIPT_BYTES = MAX_CERTIFICATE_BYTES + 16 * 1024
MAX_CONTRIBUTORS = 1024
CHAIN_START = bytes(32)  # the receipts digest of an empty ledger
SHARDED = "sharded"  # the outcome of a sharded trainer's receipt (module docstring)


class ReceiptError(ValueError):
    """A receipt failed a schema or signature check; the message says which."""


@dataclass(frozen=True)
class Receipt:
    """One round this node contributed to, as it signed it."""

    peer_id: str  # this node's PeerID
    signing_key: bytes  # its record-signing key (verifies ``signature``)
    binding: bytes  # the PeerID key's signature over the signing key
    run_id: str
    run_hash: str  # RunConfig.digest()
    round: int  # the outer round
    group_id: str  # the group's id (hex; "" for an aggregation without one)
    contributors: tuple[str, ...]  # the agreed contributor set U, sorted PeerIDs, this node among them
    contributors_digest: bytes  # contributors_digest(): what the group agreed on
    samples: int  # this node's samples behind its update of the round
    compute_seconds: float  # seconds of inner steps behind it
    outcome: str  # how the round landed ("group"; "rejected" by the loss gate: still contributed; "sharded")
    timestamp: float  # wall-clock time at signing
    certificate: bytes = b""  # the group's consistency certificate, encoded (b"": none; see the module docstring)


@dataclass(frozen=True)
class SignedReceipt:
    """A verified receipt and its signature (the chain link of the ledger summary)."""

    receipt: Receipt
    signature: bytes


def contributors_digest(group_id: str, round_no: int, peers: Sequence[str], fingerprints: Sequence[str]) -> bytes:
    """BLAKE2b-32 of a round's agreed contributor set: group id, round, sorted PeerIDs, key fingerprints."""
    if len(fingerprints) != len(peers):
        fingerprints = [""] * len(peers)  # an aggregation without round keys (plain) agrees on the PeerIDs only
    ordered = sorted(zip(peers, fingerprints, strict=True))
    body = msgpack.packb([group_id, round_no, [p for p, _ in ordered], [f for _, f in ordered]], use_bin_type=True)
    return hashlib.blake2b(body, digest_size=32, person=b"zen-contrib").digest()


def sign_receipt(identity: NodeIdentity, receipt: Receipt) -> str:
    """The JSON line of ``receipt`` signed by ``identity`` (which it must name)."""
    if receipt.peer_id != identity.peer_id or receipt.signing_key != identity.signing_public_key:
        raise ReceiptError("a receipt must be signed by the identity it names")
    _check(receipt)
    body = msgpack.packb(_to_wire(receipt), use_bin_type=True)
    signature = identity.sign(RECEIPT_TAG.encode() + body)
    line = {"receipt": _readable(receipt), "body": base64.b64encode(body).decode(), "signature": signature.hex()}
    return json.dumps(line, sort_keys=True)


def verify_receipt(line: str) -> SignedReceipt:
    """Decode one line of ``ledger.jsonl`` and check its schema, signature, binding and readable copy.

    Raises:
        ReceiptError: with the first rule the line breaks.
    """
    if len(line) > 2 * MAX_RECEIPT_BYTES:
        raise ReceiptError(f"receipt line is over {2 * MAX_RECEIPT_BYTES} characters")
    try:
        row = json.loads(line)
        body = base64.b64decode(row["body"], validate=True)
        signature = bytes.fromhex(row["signature"])
    except (ValueError, KeyError, TypeError, binascii.Error) as e:
        raise ReceiptError(f"not a receipt line ({e})") from None
    receipt = _from_wire(_unpack(body))
    try:
        nacl.signing.VerifyKey(receipt.signing_key).verify(RECEIPT_TAG.encode() + body, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError) as e:
        raise ReceiptError("receipt signature does not verify") from e
    if not verify_binding(receipt.peer_id, receipt.signing_key, receipt.binding):
        raise ReceiptError("receipt signing key is not bound to its PeerID")
    if row.get("receipt") != _readable(receipt):
        raise ReceiptError("the receipt's readable copy differs from its signed body")
    return SignedReceipt(receipt, signature)


def append_receipt(workdir: Path, line: str) -> None:
    """Append one signed receipt line to ``workdir / RECEIPTS_FILE``."""
    with open(workdir / RECEIPTS_FILE, "a") as f:
        f.write(line + "\n")


def read_receipts(workdir: Path, run_hash: str | None = None) -> tuple[list[SignedReceipt], int]:
    """The verified receipts of ``workdir`` (of ``run_hash`` only, if given), and how many lines failed.

    A line that fails is logged and counted, never used: the caller says so rather than credit it.
    """
    return read_receipts_file(workdir / RECEIPTS_FILE, run_hash)


def read_receipts_file(path: Path, run_hash: str | None = None) -> tuple[list[SignedReceipt], int]:
    """``read_receipts`` of one ledger file (a workdir's ``ledger.jsonl``, or a copy of it someone presents)."""
    if not path.exists():
        return [], 0
    good, bad = [], 0
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            signed = verify_receipt(line)
        except ReceiptError as e:
            logger.warning(f"{path}:{number}: {e}; not counted")
            bad += 1
            continue
        if run_hash is None or signed.receipt.run_hash == run_hash:
            good.append(signed)
    return good, bad


@dataclass(frozen=True)
class Totals:
    """The running summary of a node's receipts (what its DHT summary publishes)."""

    rounds: int = 0  # distinct rounds
    samples: int = 0
    compute_seconds: float = 0.0
    last_round: int = 0
    receipts_digest: bytes = CHAIN_START

    def add(self, signed: SignedReceipt) -> Totals:
        """These totals with one more receipt (a round already counted adds nothing but the chain link)."""
        receipt, chain = signed.receipt, receipts_chain(self.receipts_digest, signed.signature)
        if receipt.round <= self.last_round and self.rounds:
            return Totals(self.rounds, self.samples, self.compute_seconds, self.last_round, chain)
        return Totals(
            rounds=self.rounds + 1,
            samples=self.samples + receipt.samples,
            compute_seconds=round(self.compute_seconds + receipt.compute_seconds, 3),
            last_round=receipt.round,
            receipts_digest=chain,
        )


def totals(receipts: Iterable[SignedReceipt]) -> Totals:
    """The running summary of ``receipts`` in file order (rounds counted once each, in increasing order)."""
    result = Totals()
    for signed in receipts:
        result = result.add(signed)
    return result


@dataclass(frozen=True)
class CertificateVerdict:
    """Whether a receipt's certificate proves its contributor set, and what it proves."""

    certified: Certified | None  # None: not verified (see ``note``)
    note: str = ""  # why not: no certificate (plain, or written before certificates), or the check that failed


def certificate_verdict(receipt: Receipt) -> CertificateVerdict:
    """Check a receipt's certificate against its run, group, round and contributors (never raises)."""
    if not receipt.certificate:
        if receipt.outcome == SHARDED:
            return CertificateVerdict(None, "no certificate (a sharded trainer's steps, averaged in no group)")
        if not receipt.group_id:
            return CertificateVerdict(None, "no certificate (plain aggregation, or a round over several groups)")
        return CertificateVerdict(None, "unverified certificate (the receipt carries none)")
    try:
        certificate = GroupCertificate.decode(receipt.certificate)
    except UnboundCertificateError:
        return CertificateVerdict(None, "unverified certificate (signed before certificates named the run)")
    except CertificateError as e:
        return CertificateVerdict(None, f"certificate does not verify: {e}")
    try:
        certified = certificate.verify(bytes.fromhex(receipt.group_id), receipt.round, receipt.run_id)
    except (CertificateError, ValueError) as e:
        return CertificateVerdict(None, f"certificate does not verify: {e}")
    if set(certified.contributors) != set(receipt.contributors):
        return CertificateVerdict(None, "certificate does not verify: it certifies other contributors")
    return CertificateVerdict(certified)


_TYPES: dict[str, type | tuple[type, ...]] = {
    "str": str,
    "bytes": bytes,
    "int": int,
    "float": (int, float),
    "tuple[str, ...]": list,
}


def _to_wire(receipt: Receipt) -> dict[str, Any]:
    wire = asdict(receipt)
    wire["contributors"] = list(receipt.contributors)
    if not receipt.certificate:
        del wire["certificate"]  # a receipt without one reads as before certificates existed
    return wire


def _from_wire(wire: Any) -> Receipt:
    types = {f.name: _TYPES[str(f.type)] for f in fields(Receipt)}
    if not isinstance(wire, dict) or not set(types) - {"certificate"} <= set(wire) <= set(types):
        raise ReceiptError(f"receipt fields must be exactly {sorted(types)} (certificate optional)")
    for name, expected in types.items():
        if name in wire and (isinstance(wire[name], bool) or not isinstance(wire[name], expected)):
            raise ReceiptError(f"receipt.{name} has type {type(wire[name]).__name__}")
    if not all(isinstance(p, str) for p in wire["contributors"]):
        raise ReceiptError("receipt.contributors must be PeerID strings")
    receipt = Receipt(**{**wire, "contributors": tuple(wire["contributors"])})
    _check(receipt)
    return receipt


def _check(receipt: Receipt) -> None:
    if len(receipt.signing_key) != 32 or len(receipt.binding) != 64 or len(receipt.contributors_digest) != 32:
        raise ReceiptError("receipt signing_key, binding and contributors_digest must be 32, 64 and 32 bytes")
    if not 0 < len(receipt.contributors) <= MAX_CONTRIBUTORS or receipt.peer_id not in receipt.contributors:
        raise ReceiptError(f"receipt.contributors must name this node among at most {MAX_CONTRIBUTORS} PeerIDs")
    if not (0 <= receipt.round < 2**63 and 0 <= receipt.samples < 2**63):
        raise ReceiptError("receipt round and samples must be in [0, 2^63)")
    if not (math.isfinite(receipt.compute_seconds) and receipt.compute_seconds >= 0):
        raise ReceiptError("receipt.compute_seconds must be finite and non-negative")
    if not math.isfinite(receipt.timestamp):
        raise ReceiptError("receipt.timestamp must be finite")
    if len(receipt.certificate) > MAX_CERTIFICATE_BYTES:
        raise ReceiptError(f"receipt.certificate is over {MAX_CERTIFICATE_BYTES} bytes")


def _readable(receipt: Receipt) -> dict[str, Any]:
    """The receipt as JSON values (bytes as hex), for people and ``jq``."""
    values = asdict(receipt)
    for name in ("signing_key", "binding", "contributors_digest"):
        values[name] = values[name].hex()
    values["contributors"] = list(receipt.contributors)
    del values["certificate"]
    if receipt.certificate:
        values["certificate"] = hashlib.blake2b(receipt.certificate, digest_size=32).hexdigest()
    return values


def _unpack(body: bytes) -> Any:
    try:
        return unpack_bounded(
            body,
            max_bytes=MAX_RECEIPT_BYTES,
            max_str=256,
            max_bin=MAX_CERTIFICATE_BYTES,
            max_array=MAX_CONTRIBUTORS,
            max_map=16,
        )
    except WireError as e:
        raise ReceiptError(str(e)) from None

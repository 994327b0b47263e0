"""A secure-aggregation round's consistency certificate, in the form a ledger receipt carries and anyone checks.

Before any secret is revealed, the survivors of a masked all-reduce sign one statement
(node/secagg/consistency.py): ``STATEMENT_CONTEXT || msgpack([scope, group id, round, U, digest])``,
where ``scope`` names the run (below), U lists the contributors as indices in the group's agreed
peer order and ``digest`` is the BLAKE2b of everything the decode depends on (:func:`decode_digest`).
A round goes ahead only with at least t = n // 2 + 1 such signatures, each by a member's
record-signing key, the long-lived Ed25519 key its PeerID's key signed (the keys advert carries the
key and that binding; the endpoint checks it against the stream's PeerID). Those keys are not
per-round: the per-round keys are the X25519 ones (c_pk, s_pk), which only enter the digest. So a
third party can tie each signature to a PeerID with :func:`dht.identity.verify_binding`.

The statement names U by index, and a signature does not say at which index its signer sits, so
the signatures alone would let whoever holds a certificate re-label the order. The order is in the
digest; :class:`GroupCertificate` therefore carries the digest's inputs (the peer order, the
designation of parts to holders in a compact form, the dropouts, the round-key adverts of U and
the dropouts, the code bound and word width), and :meth:`GroupCertificate.verify` recomputes the
digest from them: the PeerIDs at U's indices are then the ones t members signed for. What a
verified certificate proves: at least t members of the group, named by PeerID, signed that the
round's sum holds exactly the updates of these PeerIDs. It does not prove the sizes of their
updates (samples, compute seconds are each node's own signed claim), and t colluding members could
sign a U of their choosing, as they could abort the round.

The run. A group id is random per group, so without more a certificate of one run's round could be
presented as a receipt of another run's. The statement therefore names the run's secure-aggregation
scope: the protocol name every member's endpoint serves, ``zen_<run_id>_secagg.secagg`` for a
node's run (:func:`secagg_scope`; ``zen_<run_id>-cohort-<16 hex>_secagg.secagg`` for a cohort's
ring under ``[run.cohorts]``), which every member already holds: a message under another name never
reaches the group. The certificate carries the scope, and :meth:`GroupCertificate.verify` refuses
one whose scope is not of the run it is checked for, before any signature. Certificates of version 1
(signed before the scope was in the statement) decode to :class:`UnboundCertificateError`: a receipt
holding one still reads, its certificate marked unverified (node/ledger/receipts.py).

``statement`` and ``decode_digest`` are defined here, below the protocol in the layer order, so the
protocol and the ledger's checker sign and check the same bytes. Decoding is bounded msgpack
(dht/wire.py); nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any

import base58
import msgpack
import nacl.exceptions
import nacl.signing

from dht.identity import verify_binding
from dht.wire import WireError, unpack_bounded

STATEMENT_CONTEXT = b"zen-federation/secagg-consistency/v2"  # v1 named no run (module docstring)
KEY_FIELDS = ("c_pk", "s_pk", "b_commit", "signing_pk", "bound_exp")  # what of a keys advert the digest covers
MAX_GROUP = 64  # node/secagg/messages.py MAX_GROUP: the largest group the protocol accepts
MAX_CERTIFICATE_BYTES = 48 * 1024  # a group of 64 encodes to about 30 KiB; a group of 4 to about 1.3 KiB
MAX_PEER_ID_BYTES = 64  # a libp2p PeerID's multihash (an Ed25519 identity PeerID is 38 bytes)
CERTIFICATE_VERSION = 2
UNBOUND_VERSION = 1  # a certificate whose statement names no run: read, never verified
MAX_SCOPE_CHARS = 128  # a scope's length: "zen_" + a run id of at most 64 characters + a cohort's 24 + 14


class CertificateError(ValueError):
    """A certificate failed a schema, digest or signature check; the message says which."""


class UnboundCertificateError(CertificateError):
    """A version-1 certificate: its signatures name no run, so no receipt's run can be checked against it."""


def secagg_scope(run_id: str) -> str:
    """The scope a run's secure rounds sign: the protocol name of its averager's endpoint (node/aggregation/secure.py
    prefix ``zen_<run_id>_secagg``, node/secagg/averager.py ``<prefix>.secagg``)."""
    return f"zen_{run_id}_secagg.secagg"


def scope_of_run(scope: str, run_id: str) -> bool:
    """Whether ``scope`` is the run's own or one of its cohorts' (node/aggregation/hierarchy.py:
    ``<run_id>-cohort-<id>``)."""
    cohort = re.fullmatch(r"zen_(.+)-cohort-[0-9a-f]{16}_secagg\.secagg", scope)
    return scope == secagg_scope(run_id) or (cohort is not None and cohort.group(1) == run_id)


def decode_digest(
    *,
    group_id: bytes,
    round_no: int,
    peer_ids: list[bytes],
    contributors: list[int],
    designation: list[list[int]],
    dropped: list[int],
    keys: dict[int, dict[str, Any]],
    bound: float,
    bits: int,
) -> bytes:
    """BLAKE2b over every parameter the decode depends on, as a peer holds it (node/secagg/consistency.py)."""
    adverts = [[j, *(keys[j][name] for name in KEY_FIELDS)] for j in sorted(set(contributors) | set(dropped))]
    body = [group_id, round_no, peer_ids, contributors, designation, dropped, adverts, float(bound), bits]
    return hashlib.blake2b(msgpack.packb(body, use_bin_type=True), digest_size=32, person=b"zen-decode").digest()


def statement(scope: str, group_id: bytes, round_no: int, contributors: list[int], digest: bytes) -> bytes:
    """The bytes each survivor signs: the run's scope, this round's U and the digest of its decode."""
    return STATEMENT_CONTEXT + msgpack.packb([scope, group_id, round_no, contributors, digest], use_bin_type=True)


@dataclass(frozen=True)
class Certified:
    """What a verified certificate establishes."""

    contributors: tuple[str, ...]  # U, as base58 PeerIDs, sorted
    signers: tuple[str, ...]  # the members whose signatures verified, sorted PeerIDs
    group_size: int  # n, the group's members (contributors or not)
    threshold: int  # t = n // 2 + 1, the signatures the round needed


@dataclass(frozen=True)
class GroupCertificate:
    """The t+ signatures on (scope, U, digest) of one round, with the digest's inputs (module docstring)."""

    scope: str  # the run's scope the statement names (secagg_scope)
    peer_ids: tuple[bytes, ...]  # the group in its agreed order (libp2p PeerID bytes)
    contributors: tuple[int, ...]  # U: indices into peer_ids, sorted
    digest: bytes  # the decode digest the statement names (32 bytes)
    reducers: tuple[int, ...]  # the peers that summed a part, in part order
    holders: tuple[tuple[int, ...], ...]  # for each member of U (in order), the holder of each reducer's part
    dropped: tuple[int, ...]  # peers a contributor masked with that are not in U
    adverts: tuple[tuple[Any, ...], ...]  # (index, *KEY_FIELDS) of U and the dropouts, by index
    bound: float  # the code's agreed bound
    bits: int  # the ring's word width
    signers: tuple[int, ...]  # who signed the statement (indices), at least t
    signatures: tuple[bytes, ...]  # their Ed25519 signatures over ``statement(...)``, 64 bytes each
    signing_keys: tuple[bytes, ...]  # their record-signing keys, 32 bytes each
    bindings: tuple[bytes, ...]  # each key's binding to the signer's PeerID (dht/identity.py), 64 bytes each

    @property
    def designation(self) -> list[list[int]]:
        """[part, sender, holder] for each part of U, as ``derive_contributors`` lists it (node/secagg/state.py)."""
        return [
            [k, j, self.holders[m][r]] for r, k in enumerate(self.reducers) for m, j in enumerate(self.contributors)
        ]

    @classmethod
    def from_round(
        cls,
        *,
        scope: str,
        peer_ids: list[bytes],
        contributors: list[int],
        digest: bytes,
        designation: list[list[int]],
        dropped: list[int],
        keys: dict[int, dict[str, Any]],
        bound: float,
        bits: int,
        signers: list[int],
        signatures: list[bytes],
    ) -> GroupCertificate:
        """The certificate of a confirmed round, from what the consistency step held (``keys``: verified adverts)."""
        reducers = list(dict.fromkeys(k for k, _, _ in designation))
        holder = {(k, j): h for k, j, h in designation}
        certificate = cls(
            scope=scope,
            peer_ids=tuple(peer_ids),
            contributors=tuple(contributors),
            digest=digest,
            reducers=tuple(reducers),
            holders=tuple(tuple(holder[k, j] for k in reducers) for j in contributors),
            dropped=tuple(dropped),
            adverts=tuple((j, *(keys[j][name] for name in KEY_FIELDS)) for j in sorted({*contributors, *dropped})),
            bound=float(bound),
            bits=bits,
            signers=tuple(signers),
            signatures=tuple(signatures),
            signing_keys=tuple(keys[j]["signing_pk"] for j in signers),
            bindings=tuple(keys[j]["binding"] for j in signers),
        )
        if certificate.designation != designation:
            raise CertificateError("the round's designation is not one part per reducer and contributor")
        return certificate

    def encode(self) -> bytes:
        """The certificate as bounded msgpack (what a receipt carries)."""
        wire = {
            "v": CERTIFICATE_VERSION,
            "run": self.scope,
            "peers": list(self.peer_ids),
            "u": list(self.contributors),
            "digest": self.digest,
            "reducers": list(self.reducers),
            "holders": [list(h) for h in self.holders],
            "dropped": list(self.dropped),
            "adverts": [list(a) for a in self.adverts],
            "bound": self.bound,
            "bits": self.bits,
            "signers": list(self.signers),
            "sigs": list(self.signatures),
            "keys": list(self.signing_keys),
            "bindings": list(self.bindings),
        }
        data = msgpack.packb(wire, use_bin_type=True)
        if len(data) > MAX_CERTIFICATE_BYTES:
            raise CertificateError(f"certificate is {len(data)} bytes, over {MAX_CERTIFICATE_BYTES}")
        return data

    @classmethod
    def decode(cls, data: bytes) -> GroupCertificate:
        """Decode and schema-check a certificate (not its signatures: :meth:`verify`).

        Raises:
            UnboundCertificateError: a well-formed version-1 certificate (its statement names no run).
            CertificateError: with the first rule the bytes break.
        """
        try:
            wire = unpack_bounded(
                data,
                max_bytes=MAX_CERTIFICATE_BYTES,
                max_str=MAX_SCOPE_CHARS,
                max_bin=64,
                max_array=MAX_GROUP,
                max_map=16,
            )
        except WireError as e:
            raise CertificateError(f"certificate: {e}") from None
        if isinstance(wire, dict) and set(wire) == _WIRE_FIELDS - {"run"} and wire["v"] == UNBOUND_VERSION:
            _check_wire({**wire, "run": "unbound"})
            raise UnboundCertificateError("a version-1 certificate: signed before certificates named the run")
        if not isinstance(wire, dict) or set(wire) != _WIRE_FIELDS or wire["v"] != CERTIFICATE_VERSION:
            raise CertificateError(
                f"certificate fields must be exactly {sorted(_WIRE_FIELDS)} (version {CERTIFICATE_VERSION})"
            )
        _check_wire(wire)
        return cls(
            scope=wire["run"],
            peer_ids=tuple(wire["peers"]),
            contributors=tuple(wire["u"]),
            digest=wire["digest"],
            reducers=tuple(wire["reducers"]),
            holders=tuple(map(tuple, wire["holders"])),
            dropped=tuple(wire["dropped"]),
            adverts=tuple(map(tuple, wire["adverts"])),
            bound=float(wire["bound"]),
            bits=wire["bits"],
            signers=tuple(wire["signers"]),
            signatures=tuple(wire["sigs"]),
            signing_keys=tuple(wire["keys"]),
            bindings=tuple(wire["bindings"]),
        )

    def verify(self, group_id: bytes, round_no: int, run_id: str) -> Certified:
        """Check the scope against ``run_id``, the digest against its inputs, and every signature against the
        statement and its signer's PeerID.

        Raises:
            CertificateError: the certificate is of another run's rounds, the digest's inputs do not hash to it,
                a signature or key binding fails, or fewer than t = n // 2 + 1 members signed.
        """
        if not scope_of_run(self.scope, run_id):
            raise CertificateError(
                f"it was signed for another run ({self.scope!r}; run {run_id!r} signs {secagg_scope(run_id)!r})"
            )
        keys = {a[0]: dict(zip(KEY_FIELDS, a[1:], strict=True)) for a in self.adverts}
        digest = decode_digest(
            group_id=group_id,
            round_no=round_no,
            peer_ids=list(self.peer_ids),
            contributors=list(self.contributors),
            designation=self.designation,
            dropped=list(self.dropped),
            keys=keys,
            bound=self.bound,
            bits=self.bits,
        )
        if digest != self.digest:
            raise CertificateError("its decode inputs do not hash to its digest (another group, round or order)")
        peers = [base58.b58encode(p).decode() for p in self.peer_ids]
        signed = statement(self.scope, group_id, round_no, list(self.contributors), self.digest)
        for j, signature, key, binding in zip(
            self.signers, self.signatures, self.signing_keys, self.bindings, strict=True
        ):
            if j in keys and keys[j]["signing_pk"] != key:
                raise CertificateError(f"signer {peers[j][:16]}'s key differs from its advert's")
            if not verify_binding(peers[j], key, binding):
                raise CertificateError(f"signer {peers[j][:16]}'s key is not bound to its PeerID")
            try:
                nacl.signing.VerifyKey(key).verify(signed, signature)
            except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError) as e:
                raise CertificateError(f"signer {peers[j][:16]}'s signature does not verify") from e
        n = len(self.peer_ids)
        if len(self.signers) < n // 2 + 1:
            raise CertificateError(f"only {len(self.signers)} of {n} members signed (need {n // 2 + 1})")
        return Certified(
            contributors=tuple(sorted(peers[j] for j in self.contributors)),
            signers=tuple(sorted(peers[j] for j in self.signers)),
            group_size=n,
            threshold=n // 2 + 1,
        )


_WIRE_FIELDS = {
    "v",
    "run",
    "peers",
    "u",
    "digest",
    "reducers",
    "holders",
    "dropped",
    "adverts",
    "bound",
    "bits",
    "signers",
    "sigs",
    "keys",
    "bindings",
}


def _check_wire(wire: dict[str, Any]) -> None:
    """Shapes, sizes and index ranges of a decoded certificate (CertificateError naming the first that fails)."""
    scope = wire["run"]
    _require(isinstance(scope, str) and 0 < len(scope) <= MAX_SCOPE_CHARS, "certificate.run must name a scope")
    peers = wire["peers"]
    _require(
        isinstance(peers, list)
        and 3 <= len(peers) <= MAX_GROUP
        and all(_is_bytes(p, 1, MAX_PEER_ID_BYTES) for p in peers),
        f"certificate.peers must list 3 to {MAX_GROUP} PeerIDs",
    )
    n = len(peers)
    for name in ("u", "dropped", "reducers", "signers"):
        _require(_is_indices(wire[name], n), f"certificate.{name} must be distinct indices below {n}")
    u, dropped = wire["u"], wire["dropped"]
    _require(bool(u) and u == sorted(u) and dropped == sorted(dropped), "certificate.u and .dropped must be sorted")
    _require(not set(u) & set(dropped) and bool(wire["reducers"]), "certificate.dropped overlaps u, or no reducers")
    holders = wire["holders"]
    _require(
        isinstance(holders, list)
        and len(holders) == len(u)
        and all(isinstance(h, list) and len(h) == len(wire["reducers"]) and _all_index(h, n) for h in holders),
        "certificate.holders must give a holder of each reducer's part for each member of u",
    )
    adverts = wire["adverts"]
    _require(
        isinstance(adverts, list) and all(_is_advert(a) for a in adverts),
        "certificate.adverts must be [index, c_pk, s_pk, b_commit, signing_pk, bound_exp] entries",
    )
    _require([a[0] for a in adverts] == sorted({*u, *dropped}), "certificate.adverts must cover exactly u and dropped")
    _require(_is_bytes(wire["digest"], 32, 32), "certificate.digest must be 32 bytes")
    bound, bits = wire["bound"], wire["bits"]
    _require(isinstance(bound, float) and math.isfinite(bound) and bound > 0, "certificate.bound must be positive")
    _require(_is_int(bits) and 1 <= bits <= 32, "certificate.bits must be in [1, 32]")
    count = len(wire["signers"])
    for name, size in (("sigs", 64), ("keys", 32), ("bindings", 64)):
        items = wire[name]
        _require(
            isinstance(items, list) and len(items) == count and all(_is_bytes(b, size, size) for b in items),
            f"certificate.{name} must hold one {size}-byte value per signer",
        )


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise CertificateError(message)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_bytes(v: Any, shortest: int, longest: int) -> bool:
    return isinstance(v, bytes) and shortest <= len(v) <= longest


def _all_index(values: list[Any], n: int) -> bool:
    return all(_is_int(v) and 0 <= v < n for v in values)


def _is_indices(values: Any, n: int) -> bool:
    return isinstance(values, list) and _all_index(values, n) and len(set(values)) == len(values)


def _is_advert(advert: Any) -> bool:
    return (
        isinstance(advert, list)
        and len(advert) == 1 + len(KEY_FIELDS)
        and _is_int(advert[0])
        and all(_is_bytes(k, 32, 32) for k in advert[1:5])
        and _is_int(advert[5])
        and -128 <= advert[5] <= 30
    )

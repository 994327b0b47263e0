"""Wire format of the masked all-reduce: signed, size-limited, schema-checked msgpack; never pickle.

One message is one libp2p stream: a 4-byte big-endian length, a header, then ``size`` raw payload
bytes (masked vectors only), answered by one short frame: a 4-byte length, then ``[ok, reason]``.

    header = msgpack [TAG, body, signature]      (at most MAX_HEADER_BYTES)
    body   = msgpack {kind, group, round, sender, recipient, data, size, digest}

``signature`` is the sender's Ed25519 identity signature over SIGN_CONTEXT + body, and ``digest``
the SHA-256 of the payload, so the signature covers the payload too. ``group`` (random per group,
from matchmaking) and ``round`` bind a message to one all-reduce: a message replayed from another
round or group is refused. ``sender`` and ``recipient`` are indices in the group's peer order; the
receiver checks that ``sender`` is the libp2p-authenticated peer on the stream. A received keys
message whose X25519 key is a low-order point (the agreement would be all-zero, which libsodium
refuses) is refused at parsing, like any malformed field: its sender is then as good as one that
sent no keys. Our own keys (``PrivateKey.generate``) never are.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
from nacl.bindings import crypto_scalarmult
from nacl.exceptions import CryptoError
from nacl.signing import VerifyKey

from dht.wire import WireError, unpack_bounded

TAG = b"zsa1"
SIGN_CONTEXT = b"zen-federation/secagg-message/v1"
MAX_HEADER_BYTES = 64 * 1024
MAX_PAYLOAD_BYTES = 1 << 32
MAX_REPLY_BYTES = 1024  # the receiver's [ok, reason] answer
MAX_GROUP = 64  # the largest group the protocol accepts (the 32, with room)
MAX_REASON = 200  # characters of a refusal's reason sent back
FINISHED = "this all-reduce has finished here"  # the refusal of a message that reaches a round after its end
_PROBE_SCALAR = bytes([9]) + bytes(31)  # any scalar: X25519 clamps it to a multiple of the cofactor 8


class MessageError(ValueError):
    """A message that is malformed, oversized, unsigned or of the wrong shape."""


def _is_bytes(size: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, bytes) and len(v) == size


def _is_bytes_max(size: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, bytes) and len(v) <= size


def _is_index(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < MAX_GROUP


def _is_index_list(v: Any) -> bool:
    return isinstance(v, list) and len(v) <= MAX_GROUP and all(map(_is_index, v)) and len(set(v)) == len(v)


def _is_holders(v: Any) -> bool:  # part -> holder index, -1 where no reducer took the part
    return isinstance(v, list) and len(v) <= MAX_GROUP and all(h == -1 or _is_index(h) for h in v)


NO_BOUND = -128  # a keys message's "bound_exp" when its sender proposes no code bound
CLAIM_ATTEMPTS = 2  # claim rounds of protocol.py's claims phase; a claim's "attempt" is below it, the last decides U


def _is_bound_exp(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and (v == NO_BOUND or -100 <= v <= 30)


def _is_share_map(v: Any) -> bool:
    return (
        isinstance(v, dict)
        and len(v) <= MAX_GROUP
        and all(_is_index(k) and isinstance(s, bytes) and len(s) == 66 for k, s in v.items())
    )


def _is_signatures(v: Any) -> bool:  # Ed25519 signatures, one per signer of a certificate
    return isinstance(v, list) and len(v) <= MAX_GROUP and all(isinstance(s, bytes) and len(s) == 64 for s in v)


MAX_EVIDENCE_BODY = 1024  # bytes of one forwarded keys, claim or sum body (a claim of MAX_GROUP peers is ~400)
MAX_EVIDENCE = 2 * MAX_GROUP  # bodies one message forwards (a keys and a claim, or up to two sums, per peer)


def _is_evidence(v: Any) -> bool:  # [body, signature] of signed messages received from others, forwarded
    return (
        isinstance(v, list)
        and len(v) <= MAX_EVIDENCE
        and all(
            isinstance(e, list)
            and len(e) == 2
            and isinstance(e[0], bytes)
            and len(e[0]) <= MAX_EVIDENCE_BODY
            and isinstance(e[1], bytes)
            and len(e[1]) == 64
            for e in v
        )
    )


# kind -> field -> check; every field is required and no other field is allowed
SCHEMAS: dict[str, dict[str, Callable[[Any], bool]]] = {
    # ephemeral X25519 keys for this round, a commitment to the self-mask seed, and the proof
    # that the signing key belongs to the sender's PeerID
    "keys": {
        "c_pk": _is_bytes(32),
        "s_pk": _is_bytes(32),
        "b_commit": _is_bytes(32),
        "signing_pk": _is_bytes(32),
        "binding": _is_bytes(64),
        # the sender's proposed code bound 2**bound_exp (low-bit compression; NO_BOUND: none)
        "bound_exp": _is_bound_exp,
    },
    # the sender's view of who advertised keys, and its shares for the recipient, boxed
    "shares": {"view": _is_index_list, "box": _is_bytes_max(1024)},
    # one masked part (payload: uint32 words); "maskset" = the peers the sender masked with
    "part": {"part": _is_index, "maskset": _is_index_list},
    # where the sender's parts landed (holders[k] holds part k; acknowledged), and its maskset
    "claim": {
        "attempt": lambda v: _is_index(v) and v < CLAIM_ATTEMPTS,
        "holders": _is_holders,
        "maskset": _is_index_list,
    },
    # the contributor set U, a digest of everything the decode depends on, and the sender's
    # signature over both (consistency.py), which others forward with their reveals; "evidence":
    # the signed keys and final claim messages the sender received, so an equivocator is proven
    "agree": {"u": _is_index_list, "digest": _is_bytes(32), "sig": _is_bytes(64), "evidence": _is_evidence},
    # a partial masked sum of one part over the listed contributors (payload: uint32 words)
    "sum": {"part": _is_index, "senders": _is_index_list},
    # shares of self-mask seeds of contributors and of mask keys of dropouts, never both for a peer
    # with the t or more signatures the sender holds on (U, digest) (consistency.py)
    "reveal": {"b": _is_share_map, "s": _is_share_map, "signers": _is_index_list, "sigs": _is_signatures},
    # the signed bodies of the sum messages the sender received, before anyone decodes (consistency.py):
    # a holder that sent its recipients different partial sums is proven to have (evidence.py)
    "total": {"evidence": _is_evidence},
    # the sender has left this round (its own failure; transport.py): no phase waits for it any longer;
    # "evidence" as in agree, so a peer that fails before agreeing still shows what it was told
    "abort": {"reason": lambda v: isinstance(v, str) and len(v) <= MAX_REASON, "evidence": _is_evidence},
}

_BODY_FIELDS = {"kind", "group", "round", "sender", "recipient", "data", "size", "digest"}


@dataclass
class Message:
    """One protocol message (its payload, if any, is raw bytes)."""

    kind: str
    group: bytes
    round: int
    sender: int
    recipient: int
    data: dict[str, Any]
    payload: Any = b""  # bytes-like: bytes, or a uint32 array once received
    body: bytes = field(default=b"", repr=False)
    signature: bytes = field(default=b"", repr=False)

    def seal(self, sign: Callable[[bytes], bytes]) -> bytes:
        """Sign and serialize the header; ``sign`` is the identity's Ed25519 signer."""
        check_data(self.kind, self.data)
        digest = hashlib.sha256(self.payload).digest() if self.payload else b""
        body = {
            "kind": self.kind,
            "group": self.group,
            "round": self.round,
            "sender": self.sender,
            "recipient": self.recipient,
            "data": self.data,
            "size": len(self.payload),
            "digest": digest,
        }
        self.body = msgpack.packb(body, use_bin_type=True)
        self.signature = sign(SIGN_CONTEXT + self.body)
        header = msgpack.packb([TAG, self.body, self.signature], use_bin_type=True)
        if len(header) > MAX_HEADER_BYTES:
            raise MessageError(f"a {self.kind!r} header of {len(header)} bytes exceeds {MAX_HEADER_BYTES}")
        return header

    def verify(self, signing_public_key: bytes) -> None:
        """Raise MessageError unless the header's signature is the given key's."""
        try:
            VerifyKey(signing_public_key).verify(SIGN_CONTEXT + self.body, self.signature)
        except (CryptoError, ValueError, TypeError) as e:  # BadSignatureError is a CryptoError
            raise MessageError(f"bad signature on a {self.kind!r} message from peer {self.sender}") from e


def check_data(kind: str, data: Any) -> None:
    schema = SCHEMAS.get(kind)
    if schema is None:
        raise MessageError(f"unknown message kind {kind!r}")
    if not isinstance(data, dict) or set(data) != set(schema):
        got = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise MessageError(f"a {kind!r} message needs fields {sorted(schema)}, got {got}")
    bad = [name for name, check in schema.items() if not check(data[name])]
    if bad:
        raise MessageError(f"a {kind!r} message has malformed fields {bad}")


def check_round_keys(data: dict[str, Any]) -> None:
    """Refuse a keys advert whose c or s key is a low-order X25519 point (every agreement with it is zero).

    A clamped X25519 scalar is a multiple of the cofactor, so the product is zero for a low-order
    point whatever the scalar: one probe decides for every receiver alike.
    """
    for name in ("c_pk", "s_pk"):
        try:
            crypto_scalarmult(_PROBE_SCALAR, data[name])
        except (CryptoError, ValueError, TypeError):
            raise MessageError(f"a 'keys' message's {name} is a low-order X25519 point") from None


def parse_header(header: bytes) -> tuple[Message, int, bytes]:
    """Decode and schema-check a header; returns (message without payload, payload size, digest)."""
    if len(header) > MAX_HEADER_BYTES:
        raise MessageError(f"header of {len(header)} bytes exceeds {MAX_HEADER_BYTES}")
    outer = _unpack_header(header)
    if not (isinstance(outer, list) and len(outer) == 3 and outer[0] == TAG):
        raise MessageError("not a secure-aggregation message (bad tag or shape)")
    _, body_bytes, signature = outer
    return parse_body(body_bytes, signature)


def parse_forwarded(body: bytes, signature: bytes) -> Message:
    """A message another peer forwarded as evidence (its signed body, no payload): schema-checked only."""
    return parse_body(body, signature)[0]


def signed_content(message: Message) -> bytes:
    """What a message's signature commits its sender to, less the recipient: equal for the copies an honest
    sender sends everyone (data, payload size and SHA-256 included)."""
    body = _unpack_header(message.body)
    return msgpack.packb({key: value for key, value in body.items() if key != "recipient"}, use_bin_type=True)


def parse_body(body_bytes: Any, signature: Any) -> tuple[Message, int, bytes]:
    """Decode and schema-check a signed body; returns (message without payload, payload size, digest)."""
    if not (isinstance(body_bytes, bytes) and isinstance(signature, bytes) and len(signature) == 64):
        raise MessageError("malformed envelope")
    body = _unpack_header(body_bytes)
    if not isinstance(body, dict) or set(body) != _BODY_FIELDS:
        raise MessageError("malformed message body")
    kind, group, round_no = body["kind"], body["group"], body["round"]
    sender, recipient, size, digest = body["sender"], body["recipient"], body["size"], body["digest"]
    if not (isinstance(kind, str) and isinstance(group, bytes) and 0 < len(group) <= 64):
        raise MessageError("malformed kind or group id")
    if not (isinstance(round_no, int) and 0 <= round_no < 1 << 63 and _is_index(sender) and _is_index(recipient)):
        raise MessageError("malformed round or peer index")
    if not (isinstance(size, int) and 0 <= size <= MAX_PAYLOAD_BYTES and isinstance(digest, bytes)):
        raise MessageError("malformed payload size or digest")
    if (size == 0) != (digest == b"") or (size and len(digest) != 32):
        raise MessageError("payload digest does not match its size")
    check_data(kind, body["data"])
    if kind == "keys":
        check_round_keys(body["data"])
    message = Message(kind, group, round_no, sender, recipient, body["data"], body=body_bytes, signature=signature)
    return message, size, digest


def _unpack_header(data: bytes) -> Any:
    """msgpack within a header's limits (no length beyond the header itself; int map keys allowed)."""
    try:
        return unpack_bounded(
            data,
            max_bytes=MAX_HEADER_BYTES,
            max_str=MAX_HEADER_BYTES,
            max_bin=MAX_HEADER_BYTES,
            max_array=MAX_HEADER_BYTES,
            max_map=MAX_HEADER_BYTES // 2,
            strict_map_key=False,  # reveal maps are keyed by peer index
        )
    except WireError as e:
        raise MessageError(f"undecodable header: {e}") from e


def named_indices(data: dict[str, Any]) -> list[int]:
    """Every peer index a message's data names (its schema has checked their types)."""
    found: list[int] = []
    for key in ("view", "maskset", "u", "senders", "holders", "signers"):
        found += data.get(key, [])
    for key in ("b", "s"):
        found += list(data.get(key, {}))
    if "part" in data:
        found.append(data["part"])
    return found


def encode_reply(ok: bool, reason: str) -> bytes:
    """The receiver's answer to one message, framed: a 4-byte big-endian length, then msgpack [ok, reason]."""
    reply = msgpack.packb([ok, reason])
    return len(reply).to_bytes(4, "big") + reply


def parse_reply(reply: bytes) -> tuple[bool, str]:
    """Decode the [ok, reason] frame a receiver answered with (at most MAX_REPLY_BYTES)."""
    try:
        decoded = unpack_bounded(reply, max_bytes=MAX_REPLY_BYTES, max_str=MAX_REPLY_BYTES, max_array=2)
    except WireError as e:
        raise MessageError(f"undecodable reply: {e}") from e
    if not (isinstance(decoded, list) and len(decoded) == 2):
        raise MessageError("malformed reply")
    ok, reason = decoded
    return bool(ok), str(reason)

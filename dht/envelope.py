"""Signed envelopes: the one wire form of every record a peer signs (peer records, bans, ledger summaries).

An envelope is the msgpack array ``[tag, body, signature]``: ``body`` is the record's msgpack encoding and
``signature`` the Ed25519 signature, by the record's signing key, over ``tag + body``, so a signature made
for one kind of record never verifies as another. The signing key must be bound to the PeerID the record
names (dht/identity.py). Each record module bounds the envelope's size and checks its own fields; the
messages here name the record (``what``) and keep the words the validator's rejection reasons look for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack
import nacl.exceptions
import nacl.signing

from dht.identity import verify_binding

SIGNATURE_BYTES = 64


def seal(tag: str, body: bytes, sign: Callable[[bytes], bytes]) -> bytes:
    """The envelope of ``body``, signed under ``tag`` by ``sign`` (an identity's Ed25519 signer)."""
    return msgpack.packb([tag, body, sign(tag.encode() + body)], use_bin_type=True)


def open_envelope(
    envelope: bytes, tag: str, unpack: Callable[[bytes], Any], error: type[Exception], what: str
) -> tuple[bytes, bytes]:
    """(body, signature) of an envelope of ``tag``, not yet verified; ``unpack`` is the record's bounded decoder.

    Raises:
        error: it is not such an envelope, or its body or signature has the wrong type.
    """
    outer = unpack(envelope)
    if not (isinstance(outer, list) and len(outer) == 3 and outer[0] == tag):
        raise error(f"not a zen {what} envelope")
    _, body, signature = outer
    if not isinstance(body, bytes) or not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        raise error(f"{what} body or signature has the wrong type")
    return body, signature


def check_signature(
    tag: str,
    body: bytes,
    signature: bytes,
    signer: tuple[str, bytes, bytes],
    error: type[Exception],
    what: str,
) -> None:
    """Check ``signature`` over ``tag + body`` by ``signer`` = (PeerID, signing key, binding), and the binding.

    Raises:
        error: the signature does not verify, or the signing key is not bound to the PeerID.
    """
    peer_id, signing_key, binding = signer
    verify_signature(tag, body, signature, signing_key, error, what)
    if not verify_binding(peer_id, signing_key, binding):
        raise error(f"{what} signing key is not bound to the PeerID it names")


def verify_signature(
    tag: str, body: bytes, signature: bytes, signing_key: bytes, error: type[Exception], what: str
) -> None:
    """Check ``signature`` over ``tag + body`` by ``signing_key`` alone (its binding checked elsewhere).

    Raises:
        error: the signature does not verify.
    """
    try:
        nacl.signing.VerifyKey(signing_key).verify(tag.encode() + body, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError) as e:
        raise error(f"{what} signature does not verify") from e

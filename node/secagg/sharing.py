"""Secret sharing of a round's keys: each peer's s_sk and self-mask seed b, boxed per recipient.

A peer splits both secrets t-of-n (shamir.py) and sends each peer its two shares in a box
(X25519 + XSalsa20-Poly1305, nacl's ``Box``) under the round's c keys, bound to the group, the
round and the (sender, recipient) pair, so a box cannot be replayed elsewhere. The keys message
carries a commitment to b and the public s key, so a secret rebuilt from revealed shares is
checked against what its owner committed to before any mask is removed with it.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgpack
from nacl.bindings import crypto_scalarmult_base
from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey

from dht.wire import unpack_bounded
from node.secagg.shamir import ShareError, combine_secret

SHARE_BYTES = 66  # one Shamir share of a 32-byte secret (shamir.py)
BOX_BYTES = 1024  # the most a box may hold (the "shares" message's schema)
_GROUP_ID_BYTES = 64  # the longest group id a header may name (messages.py)


class SharingError(ValueError):
    """A box of shares that does not open to our two shares, or a secret that cannot be rebuilt."""


def commit(seed: bytes) -> bytes:
    """The commitment to a self-mask seed that the keys message carries."""
    return hashlib.blake2b(seed, digest_size=32, person=b"zen-b-commit").digest()


def gather_shares(
    me: int,
    held: dict[int, tuple[bytes, bytes]],
    revealed: dict[int, dict[str, Any]],
    contributors: list[int],
    dropped: list[int],
) -> tuple[dict[int, dict[int, bytes]], dict[int, dict[int, bytes]]]:
    """Shares of b_j (j in U) and of s_sk_d (dropouts d) we hold or were revealed, as {owner: {x: share}}.

    Args:
        me: our index (we hold share x = me + 1 of every peer in our U2).
        held: the (s_sk, b) shares we hold, by owner.
        revealed: each revealing peer's reveal message data ({"b": ..., "s": ...}), by sender.
        contributors: U; every j in U is in our U2, so we hold a share of its b.
        dropped: peers a contributor masked with that are not in U.
    """
    shares_b = {j: {me + 1: held[j][1]} for j in contributors}
    shares_s = {d: ({me + 1: held[d][0]} if d in held else {}) for d in dropped}
    for sender, data in revealed.items():
        for j, share in data["b"].items():
            if j in shares_b:
                shares_b[j][sender + 1] = share
        for d, share in data["s"].items():
            if d in shares_s:
                shares_s[d][sender + 1] = share
    return shares_b, shares_s


def rebuild_secret(shares: dict[int, bytes], threshold: int, kind: str, keys: dict[str, Any]) -> bytes:
    """A peer's secret (``kind`` "b": its self-mask seed, "s": its s_sk) from ``threshold`` of ``shares``.

    Raises:
        SharingError: too few shares, shares that do not combine, or a secret other than the one the
            owner's keys message (``keys``) committed to.
    """
    if len(shares) < threshold:
        raise SharingError(f"{kind}: {len(shares)} shares, need {threshold}")
    try:
        secret = combine_secret(dict(sorted(shares.items())[:threshold]))
    except ShareError as e:
        raise SharingError(f"{kind} cannot be rebuilt: {e}") from e
    if kind == "b":
        ok = commit(secret) == keys["b_commit"]
    else:
        ok = crypto_scalarmult_base(secret) == keys["s_pk"]
    if not ok:
        raise SharingError(f"rebuilt {kind} does not match what it committed to")
    return secret


def box_shares(
    c_sk: PrivateKey, peer_c_pk: bytes, binding: tuple[bytes, int, int, int], s_share: bytes, b_share: bytes
) -> bytes:
    """Our shares for one peer, boxed; ``binding`` is (group id, round, sender, recipient)."""
    plain = msgpack.packb([*binding, s_share, b_share])
    return bytes(Box(c_sk, PublicKey(peer_c_pk)).encrypt(plain))


def open_shares(
    c_sk: PrivateKey, peer_c_pk: bytes, box: bytes, binding: tuple[bytes, int, int, int]
) -> tuple[bytes, bytes]:
    """The (s_sk, b) shares a peer boxed for us; raises SharingError unless bound to ``binding``."""
    try:
        plain = Box(c_sk, PublicKey(peer_c_pk)).decrypt(box)
        opened = unpack_bounded(
            plain, max_bytes=BOX_BYTES, max_str=0, max_bin=max(SHARE_BYTES, _GROUP_ID_BYTES), max_array=6
        )
        group, round_no, sender, recipient, s_share, b_share = opened
    except (CryptoError, ValueError, TypeError) as e:
        raise SharingError(f"do not open: {e}") from e
    if (group, round_no, sender, recipient) != binding:
        raise SharingError("are bound to another group, round or pair")
    if not (isinstance(s_share, bytes) and isinstance(b_share, bytes) and len(s_share) == len(b_share) == SHARE_BYTES):
        raise SharingError(f"are not two shares of {SHARE_BYTES} bytes")
    return s_share, b_share

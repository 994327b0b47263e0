"""Secret sharing of a round's keys: each peer's s_sk and self-mask seed b, boxed per recipient.

A peer splits both secrets t-of-n (shamir.py) and sends each peer its two shares in a box
(X25519 + XSalsa20-Poly1305, nacl's ``Box``) under the round's c keys, bound to the group, the
round and the (sender, recipient) pair, so a box cannot be replayed elsewhere. The keys message
carries a commitment to b and the public s key, so a secret rebuilt from revealed shares is
checked against what its owner committed to before any mask is removed with it.

One bad share (a revealer that lies, or an owner that dealt a wrong share) must not fail the
round for some peers and not others, so a secret whose lowest t shares rebuild something other
than what its owner committed to (the honest case costs one try and names nobody) is rebuilt
from other t-subsets: first those that leave out one
share, then two, and so on, at most ``MAX_SUBSETS`` of them (a group has at most 64 peers; with
one bad share among n = 32 that is 18 tries, two about 190). A subset that rebuilds the committed
secret gives the secret (the commitment binds it), but colluders can craft bad shares that cancel
in one subset, so its polynomial names the bad shares (those off it, ``bad``) only when it misses
at most ``(m - t) // 2`` of the ``m`` shares: two polynomials of degree ``t - 1`` that each miss
that few agree on ``t`` shares and are the same (Reed-Solomon's unique decoding radius). Until one
does, the secret comes back ``sure=False`` and nobody is named. Shares are reconstructed only once
U is signed, so trying more subsets reveals nothing new.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack
from nacl.bindings import crypto_scalarmult_base
from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey

from dht.wire import unpack_bounded
from node.secagg.shamir import ShareError, combine_secret, misfit_shares
from node.secagg.state import SecAggError

SHARE_BYTES = 66  # one Shamir share of a 32-byte secret (shamir.py)
BOX_BYTES = 1024  # the most a box may hold (the "shares" message's schema)
_GROUP_ID_BYTES = 64  # the longest group id a header may name (messages.py)
MAX_SUBSETS = 600  # t-subsets of one secret's shares tried before giving up on it


class SharingError(SecAggError, ValueError):
    """A box of shares that does not open to our two shares, or a secret that cannot be rebuilt."""


@dataclass(frozen=True)
class Rebuilt:
    """A secret rebuilt from revealed shares, and the shares that do not lie on its polynomial."""

    secret: bytes
    bad: list[int] = field(default_factory=list)  # share indices x (holder index + 1) of shares that do not fit
    sure: bool = True  # False: the secret is right, but too few shares fit to name the bad ones yet


@dataclass
class RebuiltSecrets:
    """What the reveal phase rebuilds: contributors' self-mask seeds, dropouts' s keys, and what went wrong."""

    seeds: dict[int, bytes] = field(default_factory=dict)  # b_j by owner j in U
    s_keys: dict[int, bytes] = field(default_factory=dict)  # s_sk_d by dropout d
    bad: list[tuple[str, int, int]] = field(default_factory=list)  # (kind, owner, holder) of each share off the secret
    failed: dict[str, str] = field(default_factory=dict)  # "b of 3" -> why it could not be rebuilt (yet)
    unsure: list[str] = field(default_factory=list)  # "b of 3": rebuilt, but its bad shares cannot be named yet


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


def rebuild_secret(
    shares: dict[int, bytes], threshold: int, kind: str, keys: dict[str, Any], max_subsets: int = MAX_SUBSETS
) -> Rebuilt:
    """A peer's secret (``kind`` "b": its self-mask seed, "s": its s_sk) from ``threshold`` of ``shares``.

    The lowest ``threshold`` shares are tried first, then other subsets (module docstring).

    Raises:
        SharingError: too few shares, or no subset tried rebuilds the secret the owner's keys
            message (``keys``) committed to.
    """
    if len(shares) < threshold:
        raise SharingError(f"{kind}: {len(shares)} shares, need {threshold}")
    tried, radius, found = 0, (len(shares) - threshold) // 2, None
    for subset in itertools.islice(_subsets(sorted(shares), threshold), max_subsets):
        tried += 1
        chosen = {x: shares[x] for x in subset}
        try:
            secret = combine_secret(chosen)
        except ShareError:
            continue
        if _matches(secret, kind, keys):
            if tried == 1:
                return Rebuilt(secret)  # the lowest t shares fit: nothing to name (others are not checked)
            bad = misfit_shares(chosen, {x: share for x, share in shares.items() if x not in chosen})
            if len(bad) <= radius:  # the only polynomial that fits this well: its misfits are the bad shares
                return Rebuilt(secret, bad)
            found = secret
    if found is not None:
        return Rebuilt(found, sure=False)
    raise SharingError(f"{kind} does not rebuild to what it committed to from any of {tried} subsets of its shares")


def rebuild_secrets(
    shares_b: dict[int, dict[int, bytes]],
    shares_s: dict[int, dict[int, bytes]],
    threshold: int,
    keys: dict[int, dict[str, Any]],
) -> RebuiltSecrets:
    """Every secret ``gather_shares`` collected, checked against its owner's keys; failures are listed, not raised."""
    rebuilt = RebuiltSecrets()
    for kind, by_owner, into in (("b", shares_b, rebuilt.seeds), ("s", shares_s, rebuilt.s_keys)):
        for owner, shares in by_owner.items():
            try:
                found = rebuild_secret(shares, threshold, kind, keys[owner])
            except SharingError as e:
                rebuilt.failed[f"{kind} of {owner}"] = str(e)
                continue
            into[owner] = found.secret
            rebuilt.bad += [(kind, owner, x - 1) for x in found.bad]
            if not found.sure:
                rebuilt.unsure.append(f"{kind} of {owner}")
    return rebuilt


def _subsets(xs: list[int], threshold: int) -> Iterator[tuple[int, ...]]:
    """t-subsets of ``xs``: the lowest t, then the lowest t of those leaving out 1, 2, ... shares (each once)."""
    seen: set[tuple[int, ...]] = set()
    for left_out in range(len(xs) - threshold + 1):
        window = xs[: threshold + left_out]  # leaving out a share beyond it does not change the lowest t
        for excluded in itertools.combinations(window, left_out):
            subset = tuple(x for x in window if x not in excluded)
            if subset not in seen:
                seen.add(subset)
                yield subset


def _matches(secret: bytes, kind: str, keys: dict[str, Any]) -> bool:
    """Whether a rebuilt secret is the one its owner committed to (b: its commitment; s: its public s key)."""
    if kind == "b":
        return commit(secret) == keys["b_commit"]
    try:
        return crypto_scalarmult_base(secret) == keys["s_pk"]
    except CryptoError:  # a degenerate scalar: not the committed key
        return False


def box_shares(
    c_sk: PrivateKey, peer_c_pk: bytes, binding: tuple[bytes, int, int, int], s_share: bytes, b_share: bytes
) -> bytes:
    """Our shares for one peer, boxed; ``binding`` is (group id, round, sender, recipient).

    Raises:
        SharingError: the peer's c key is unusable (a low-order point: nacl refuses the agreement).
    """
    plain = msgpack.packb([*binding, s_share, b_share])
    try:
        return bytes(Box(c_sk, PublicKey(peer_c_pk)).encrypt(plain))
    except (CryptoError, ValueError, TypeError) as e:
        raise SharingError(f"cannot box shares for peer {binding[3]}: {e!r}") from e


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

"""Masks for secure aggregation: ChaCha20 keystreams added in the ring Z_2^32.

A mask is the ChaCha20 keystream under a 32-byte key, read as little-endian uint32 words and
added to (or subtracted from) the encoded vector mod 2**32. Keys are never reused: each is
derived with keyed BLAKE2b from a secret (a pairwise X25519 agreement or a self-mask seed) and
the context (group id, outer round, part index, the ordered pair), so every (pair, round, part)
has its own stream and the nonce can stay zero. The ``cryptography`` package writes the keystream
straight into a numpy buffer (it encrypts a zero buffer in place) at several GB/s per core;
numpy's non-cryptographic generators are never used for masks.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from nacl.bindings import crypto_scalarmult
from nacl.exceptions import CryptoError

from node.secagg.state import SecAggError

KEY_BYTES = 32
_PERSON_PAIR = b"zen-mask-pair"
_PERSON_SELF = b"zen-mask-self"
_SCRATCH = 1 << 20  # uint32 words of keystream made per step


class MaskError(SecAggError, ValueError):
    """A key agreement failed or produced a degenerate secret (the round fails, never the node)."""


def keystream_into(out: np.ndarray, key: bytes, counter_block: int = 0) -> None:
    """Overwrite ``out`` (a contiguous uint32 array) with ChaCha20(key) starting at block ``counter_block``."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"a mask key is {KEY_BYTES} bytes, got {len(key)}")
    nonce = struct.pack("<I", counter_block & 0xFFFFFFFF) + bytes(12)
    out.fill(0)
    view = out.data.cast("B")
    Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor().update_into(view, view)


def apply_mask(target: np.ndarray, key: bytes, sign: int, scratch: np.ndarray | None = None) -> None:
    """``target += sign * ChaCha20(key)`` mod 2**32, in place, with bounded scratch memory."""
    if target.dtype != np.uint32:
        raise TypeError("masks apply to uint32 arrays")
    if sign not in (1, -1):
        raise ValueError("sign must be +1 or -1")
    if scratch is None or scratch.size < min(_SCRATCH, target.size):
        scratch = np.empty(min(_SCRATCH, max(target.size, 1)), dtype=np.uint32)
    encryptor = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    op = np.add if sign > 0 else np.subtract
    for start in range(0, target.size, _SCRATCH):
        stop = min(start + _SCRATCH, target.size)
        words = scratch[: stop - start]
        words.fill(0)
        view = words.data.cast("B")
        encryptor.update_into(view, view)  # the stream continues across steps
        op(target[start:stop], words, out=target[start:stop])


def pair_secret(own_secret_key: bytes, peer_public_key: bytes) -> bytes:
    """The X25519 agreement of two ephemeral keys; refuses the all-zero (low-order point) result.

    libsodium itself refuses a low-order key (nacl raises its RuntimeError); both become MaskError.
    """
    try:
        shared = crypto_scalarmult(own_secret_key, peer_public_key)
    except (CryptoError, ValueError, TypeError) as e:
        raise MaskError(f"X25519 agreement failed (a low-order or malformed public key): {e!r}") from e
    if shared == bytes(32):
        raise MaskError("X25519 agreement gave the all-zero secret (a low-order public key)")
    return shared


def _context(group_id: bytes, round_no: int, part: int, *extra: int) -> bytes:
    return struct.pack(f"<QI{len(extra)}I", round_no, part, *extra) + group_id


def pair_mask_key(secret: bytes, group_id: bytes, round_no: int, part: int, low: int, high: int) -> bytes:
    """Key of the pairwise mask of peers ``low < high`` on one part; both peers derive the same key."""
    data = _context(group_id, round_no, part, low, high)
    return hashlib.blake2b(data, key=secret, digest_size=KEY_BYTES, person=_PERSON_PAIR).digest()


def self_mask_key(seed: bytes, group_id: bytes, round_no: int, part: int) -> bytes:
    """Key of a peer's self mask on one part."""
    data = _context(group_id, round_no, part)
    return hashlib.blake2b(data, key=seed, digest_size=KEY_BYTES, person=_PERSON_SELF).digest()


def pair_sign(own_index: int, peer_index: int) -> int:
    """The sign with which peer ``own_index`` adds the mask it shares with ``peer_index``."""
    if own_index == peer_index:
        raise ValueError("a peer shares no pairwise mask with itself")
    return 1 if own_index < peer_index else -1


def add_masks(
    words: np.ndarray,
    seed: bytes,
    pair_secrets: dict[int, bytes],
    own_index: int,
    group_id: bytes,
    round_no: int,
    part: int,
) -> None:
    """``words += PRG(b) + sum_j sign * PRG(s_ij)``: a peer's self mask and one pairwise mask per peer, on one part."""
    apply_mask(words, self_mask_key(seed, group_id, round_no, part), 1)
    for j, shared in pair_secrets.items():
        low, high = min(j, own_index), max(j, own_index)
        apply_mask(words, pair_mask_key(shared, group_id, round_no, part, low, high), pair_sign(own_index, j))


def remove_masks(
    partial: np.ndarray,
    senders: list[int],
    seeds: dict[int, bytes],
    dropout_pairs: dict[tuple[int, int], bytes],
    group_id: bytes,
    round_no: int,
    part: int,
) -> None:
    """Remove from a partial sum of one part its senders' self masks and their masks with dropouts.

    Pairwise masks between contributors are left: they cancel only in the total over U.
    """
    for j in senders:
        apply_mask(partial, self_mask_key(seeds[j], group_id, round_no, part), -1)
    for (j, d), shared in dropout_pairs.items():
        if j in senders:
            key = pair_mask_key(shared, group_id, round_no, part, min(j, d), max(j, d))
            apply_mask(partial, key, -pair_sign(j, d))

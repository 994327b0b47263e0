"""Compression inside the secure ring: low-bit words, bit-packed, on a random-k coordinate set.

Three pieces, all applied to the masked all-reduce (node/secagg/protocol.py) so that masking
and compression compose:

How a group compresses is the run's ``CompressionConfig`` (node/config.py, ``[run.compression]``).

- **Quantization.** ``FixedPointCodec(bits=q)`` encodes each value with ``q`` bits (stochastic
  rounding, unbiased) and the group sum needs ``h = ceil(log2 n)`` headroom bits, so the ring is
  Z_2^W with ``W = q + h``. Masks are added in Z_2^32 as before; only the low ``W`` bits of a word
  travel (reduction mod 2^W commutes with sums), bit-packed by ``pack_bits``. The weight word
  stays 32 bits wide.
- **Random-k.** The group keeps ``count(size)`` coordinates chosen by ``select_coordinates``
  from a seed every member derives from the group id and the round: the index set depends on no
  one's data (a data-dependent top-k tells the group which coordinates matter to whom).
- **Error feedback.** The all-reduce reports what a peer's delta lost (unselected coordinates,
  the clipped excess and the rounding error of what it did send); the trainer keeps that in its
  local model, so its next pseudo-gradient carries it: no mass is lost, only delayed.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np


def select_coordinates(size: int, count: int, group_id: bytes, round_no: int) -> np.ndarray | None:
    """The sorted indices a group sends this round; the same on every member (None: all of them).

    The seed is public to the group and independent of anyone's data; numpy's generator is
    fine here because the choice is not a secret, only shared.
    """
    if count >= size:
        return None
    seed = hashlib.blake2b(round_no.to_bytes(8, "little"), key=group_id[:64], digest_size=16, person=b"zen-randk")
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(seed.digest(), "little")))
    chosen = rng.choice(size, size=count, replace=False, shuffle=False)
    chosen.sort()
    return chosen.astype(np.int64, copy=False)


def _layout(width: int) -> tuple[int, int]:
    """Values per period and bytes per period: a period of values ends on a byte boundary."""
    period = 8 // math.gcd(width, 8)
    return period, period * width // 8


def packed_size(count: int, width: int) -> int:
    """Bytes that ``count`` words of ``width`` bits take on the wire."""
    return (count * width + 7) // 8


def pack_bits(words: np.ndarray, width: int) -> bytes:
    """The low ``width`` bits of each uint32 word, concatenated little-endian, bit after bit."""
    if not 1 <= width <= 32:
        raise ValueError(f"width must be in [1, 32], got {width}")
    if width == 32:
        return words.astype("<u4", copy=False).tobytes()
    period, period_bytes = _layout(width)
    rows = -(-words.size // period)
    flat = np.zeros(rows * period, np.uint64)
    flat[: words.size] = words
    flat &= np.uint64((1 << width) - 1)
    values = flat.reshape(rows, period)
    out = np.zeros((rows, period_bytes), np.uint8)
    for lane in range(period):
        first, shift = divmod(lane * width, 8)
        shifted = values[:, lane] << np.uint64(shift)
        for j in range((shift + width + 7) // 8):
            out[:, first + j] |= (shifted >> np.uint64(8 * j)).astype(np.uint8)  # the cast keeps the low byte
    return out.reshape(-1)[: packed_size(words.size, width)].tobytes()


def unpack_bits(data: bytes | memoryview | np.ndarray, width: int, out: np.ndarray) -> None:
    """Inverse of ``pack_bits``: fill ``out`` (uint32) with ``out.size`` words of ``width`` bits."""
    raw = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data.view(np.uint8)
    if raw.size != packed_size(out.size, width):
        raise ValueError(f"{out.size} words of {width} bits take {packed_size(out.size, width)} bytes, got {raw.size}")
    if width == 32:
        out[:] = raw.view("<u4")
        return
    period, period_bytes = _layout(width)
    rows = -(-out.size // period)
    padded = np.zeros(rows * period_bytes, np.uint8)
    padded[: raw.size] = raw
    table = padded.reshape(rows, period_bytes)
    values = np.empty((rows, period), np.uint64)
    mask = np.uint64((1 << width) - 1)
    for lane in range(period):
        first, shift = divmod(lane * width, 8)
        gathered = np.zeros(rows, np.uint64)
        for j in range((shift + width + 7) // 8):
            gathered |= table[:, first + j].astype(np.uint64) << np.uint64(8 * j)
        values[:, lane] = (gathered >> np.uint64(shift)) & mask
    out[:] = values.reshape(-1)[: out.size]

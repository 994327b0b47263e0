"""Fixed-point encoding of weighted updates into the ring Z_2^W, where masked sums are exact.

A peer in a group of ``n`` encodes ``omega * clip(x, -B, B)`` (``omega = weight / weight_bound``
in (0, 1]) as ``floor(v * s + u)`` with ``u`` uniform in [0, 1) (stochastic rounding: unbiased,
error below one step ``1/s``) and appends ``omega * B`` as one more coordinate, so the group's
weight sum travels masked with the values. ``s = (2**(31 - h) - 1) / B`` with ``h = ceil(log2 n)``
headroom bits: every encoded value lies in ``[-(2**(31-h) - 1), 2**(31-h) - 1]``, so the sum of
``n`` of them fits a signed 32-bit integer and the sum taken mod 2**32 never wraps.

With ``bits = q < 32`` (compression, node/secagg/compression.py) values get ``q`` bits instead:
``s = (2**(q - 1) - 1) / B`` and the ring narrows to ``W = q + h`` bits (``ring_bits``). Words
are still added in Z_2^32; only their low ``W`` bits matter, and only those travel. The weight
word always keeps the full 32-bit code.

Weights have a floor: a peer whose ``omega`` is below ``WEIGHT_FLOOR`` counts as the floor (its
values and its weight word alike), so every honest weight word lies in a public range and a group
sum whose weight lies outside ``[|U| * floor, |U|]`` is forged (bounds.py rejects it).

Decoding the group sum gives ``sum(omega_j x_j) / sum(omega_j)``, the weighted mean, with an
absolute error at most ``n / s * (1 + |mean| / B) / sum(omega_j)`` (``quantization_bound``).
Every peer decodes the same integers with the same float64 operations, so all members of a
group get bit-identical results.

The rounding noise comes from a ChaCha20 keystream under a fresh random key: fast, and no
numpy generator is involved anywhere near the masks.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from node.secagg.masking import keystream_into

RING_BITS = 32
# The least weight a peer counts for: below it, omega is raised to it. It bounds how far a forged weight
# word can shrink the group's weight sum (and so scale the mean): by at most 1 / WEIGHT_FLOOR. An honest
# weight is samples / the run's per-round bound (node/training: inner_steps * batch_size), so a peer
# below the floor trained on less than a thousandth of a round's batches; it still encodes exactly.
WEIGHT_FLOOR = 2.0**-10
CHUNK = 1 << 18  # elements per encoding step: float64 temporaries stay in cache


@dataclass(frozen=True)
class FixedPointCodec:
    """The fixed-point code of one group.

    Args:
        group_size: peers whose encodings are summed (sets the headroom bits).
        bound: B, the clip bound on every coordinate of an update (run-wide).
        bits: bits per value before headroom (4, 8, 16); 32 = all the 32-bit ring leaves.
    """

    group_size: int
    bound: float
    bits: int = RING_BITS

    def __post_init__(self) -> None:
        if not 1 <= self.group_size <= 1 << 16:
            raise ValueError(f"group_size must be in [1, 65536], got {self.group_size}")
        if not (math.isfinite(self.bound) and self.bound > 0):
            raise ValueError(f"bound must be a positive finite number, got {self.bound}")
        if not 2 <= self.bits <= RING_BITS:
            raise ValueError(f"bits must be in [2, {RING_BITS}], got {self.bits}")

    @property
    def headroom_bits(self) -> int:
        return max(1, math.ceil(math.log2(self.group_size)))

    @property
    def value_bits(self) -> int:
        return min(self.bits, RING_BITS - self.headroom_bits)

    @property
    def ring_bits(self) -> int:
        """W: the low bits of a word that carry a value's share of the group sum."""
        return self.value_bits + self.headroom_bits

    @property
    def scale(self) -> float:
        return ((1 << (self.value_bits - 1)) - 1) / self.bound

    @property
    def weight_scale(self) -> float:
        return float((1 << (RING_BITS - 1 - self.headroom_bits)) - 1)

    def encode_into(self, values: np.ndarray, omega: float, out: np.ndarray, seed: bytes | None = None) -> None:
        """Encode ``omega * clip(values)`` into ``out`` (uint32, same length), stochastically rounded.

        Non-finite values are refused: a NaN would turn into an arbitrary ring element.
        """
        if not 0 < omega <= 1:
            raise ValueError(f"omega must be in (0, 1], got {omega}")
        omega = max(omega, WEIGHT_FLOOR)
        if values.shape != out.shape or out.dtype != np.uint32:
            raise ValueError("out must be a uint32 array shaped like values")
        seed = os.urandom(32) if seed is None else seed
        size = min(CHUNK, values.size)
        noise, wide, uniform = np.empty(size, np.uint32), np.empty(size, np.float64), np.empty(size, np.float64)
        factor = self.scale * omega
        for start in range(0, values.size, CHUNK):  # temporaries are reused: no page faults per chunk
            stop = min(start + CHUNK, values.size)
            chunk, u, r = wide[: stop - start], noise[: stop - start], uniform[: stop - start]
            np.copyto(chunk, values[start:stop])
            if not np.isfinite(chunk).all():
                raise ValueError("the update holds non-finite values")
            np.clip(chunk, -self.bound, self.bound, out=chunk)
            chunk *= factor
            keystream_into(u, seed, counter_block=start // 16)
            np.multiply(u, 1.0 / 4294967296.0, out=r)
            chunk += r
            np.floor(chunk, out=chunk)
            # |chunk| < 2**31 here, so float64 -> int32 is exact; int32 and uint32 share the ring's bits
            np.copyto(out[start:stop].view(np.int32), chunk, casting="unsafe")

    def encode_weight(self, omega: float) -> int:
        """The ring element carrying ``omega`` (at least ``WEIGHT_FLOOR``; exact up to one step, rounded to nearest)."""
        return round(max(omega, WEIGHT_FLOOR) * self.weight_scale) & 0xFFFFFFFF

    def dequantize_into(self, words: np.ndarray, omega: float, out: np.ndarray) -> None:
        """What a peer's own (unmasked) encoded words stand for: ``out = words / (s * omega)``."""
        np.multiply(words.view(np.int32), 1.0 / (self.scale * max(omega, WEIGHT_FLOOR)), out=out, casting="unsafe")

    def decode_sum(self, total: np.ndarray, out: np.ndarray) -> float:
        """Write the weighted mean of a group sum (uint32: values, then the weight word) into ``out``.

        Returns the group's weight sum. ``out`` is float32 with one element less than ``total``.
        """
        if out.dtype != np.float32 or out.size + 1 != total.size:
            raise ValueError("out must be float32 with one element less than the sum")
        weight_sum = float(total[-1:].view(np.int32)[0]) / self.weight_scale
        if weight_sum <= 0:
            raise ValueError(f"the group's weight sum decodes to {weight_sum}; the sum is corrupt")
        factor = 1.0 / (self.scale * weight_sum)
        wide, signed = np.empty(min(CHUNK, out.size), np.float64), np.empty(min(CHUNK, out.size), np.uint32)
        spare = np.uint32(RING_BITS - self.ring_bits)
        for start in range(0, out.size, CHUNK):
            stop = min(start + CHUNK, out.size)
            chunk, words = wide[: stop - start], signed[: stop - start]
            # sign-extend the low W bits: shift them to the top, then shift back arithmetically
            np.left_shift(total[start:stop], spare, out=words)
            np.right_shift(words.view(np.int32), spare.astype(np.int32), out=words.view(np.int32))
            np.multiply(words.view(np.int32), factor, out=chunk)
            np.copyto(out[start:stop], chunk, casting="same_kind")
        return weight_sum

    def quantization_bound(self, weight_sum: float, mean_abs_max: float) -> float:
        """An upper bound on |decoded mean - exact weighted mean of the clipped values|."""
        step = 1.0 / self.scale
        return self.group_size * step * (1.0 + mean_abs_max / self.bound) / weight_sum + 1e-7 * mean_abs_max

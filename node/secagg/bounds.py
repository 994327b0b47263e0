"""Bounded influence: what a group's unmasked sum over U may hold, checked by every member before decoding.

Masking hides each input, so nothing proves that a contributor encoded ``omega * clip(x, -B, B)``
with ``omega`` in (0, 1] (no range proofs). What every member can check is the sum: each honest
weight word lies in ``[encode_weight(WEIGHT_FLOOR), encode_weight(1)]``, so the weight word of a
sum over ``|U|`` honest contributors lies in ``|U|`` times that range, and each honest value word
is at most ``omega * B * s + 1`` in magnitude (stochastic rounding adds under one step), so a
coordinate of the sum is at most ``B * s * (weight + |U| / 2 / weight_scale) + |U|`` (the half
step: the weight word is rounded to nearest), plus ``NOISE_SIGMAS`` standard deviations of the
differential-privacy noise when there is some. A sum outside either range is refused
(``InfluenceError``): a peer that forges its weight word to make the weight sum tiny, and so
scale the mean without limit, makes the round fail instead. Every member holds the same total, U
and code, so every member refuses the same way. What remains: a contributor can still pull the
mean anywhere within ``[-B, B]`` (it may claim up to ``|U|`` minus the others' weights), which is
what the robust combination across groups is for.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from node.secagg.fixed_point import CHUNK, RING_BITS, WEIGHT_FLOOR, FixedPointCodec

if TYPE_CHECKING:
    from node.secagg.privacy import NoiseShare

NOISE_SIGMAS = 10.0  # DP noise allowance in standard deviations (an honest coordinate beyond it: p < 1e-22)


class InfluenceError(ValueError):
    """A group sum that no set of honest contributors can produce: a forged weight word or value."""


def check_group_sum(total: np.ndarray, codec: FixedPointCodec, contributors: int, noise: NoiseShare | None) -> None:
    """Refuse a sum over ``contributors`` peers (uint32: values, then the weight word) outside the honest range.

    Raises:
        InfluenceError: the weight word lies outside ``[|U| * floor, |U|]`` (in words), or a value
            word beyond what ``|U|`` honest encodings of that weight (and the DP noise) can reach.
    """
    word = int(total[-1:].view(np.int32)[0])
    low, high = contributors * codec.encode_weight(WEIGHT_FLOOR), contributors * codec.encode_weight(1.0)
    if not low <= word <= high:
        raise InfluenceError(
            f"its weight sum {word / codec.weight_scale:.3g} lies outside [|U| * floor, |U|] = "
            f"[{low / codec.weight_scale:.3g}, {high / codec.weight_scale:.3g}] (a forged weight word)"
        )
    limit = codec.bound * codec.scale * (word + contributors / 2) / codec.weight_scale + contributors + 1
    if noise is not None:  # each share's std is noise.std(n) * scale ring units; U holds |U| shares
        limit += NOISE_SIGMAS * noise.std(codec.group_size) * codec.scale * math.sqrt(contributors)
    largest = largest_magnitude(total[:-1], codec.ring_bits)
    if largest > limit:
        weight = word / codec.weight_scale
        raise InfluenceError(
            f"a coordinate of its mean decodes to {largest / (codec.scale * weight):.3g}, beyond the "
            f"{limit / (codec.scale * weight):.3g} that {contributors} encodings of bound {codec.bound:.3g} allow"
        )


def largest_magnitude(words: np.ndarray, ring_bits: int) -> int:
    """The largest |v| over ``words`` read as signed ``ring_bits``-bit integers (low bits, sign-extended)."""
    spare = RING_BITS - ring_bits
    buffer = np.empty(min(CHUNK, words.size), np.int32)
    largest = 0
    for start in range(0, words.size, CHUNK):
        chunk = words[start : start + CHUNK]
        signed = chunk.view(np.int32)
        if spare:  # shift the low W bits to the top, then back arithmetically (as decode_sum does)
            signed = buffer[: chunk.size]
            np.left_shift(chunk, np.uint32(spare), out=signed.view(np.uint32))
            np.right_shift(signed, np.int32(spare), out=signed)
        largest = max(largest, int(signed.max()), -int(signed.min()))
    return largest

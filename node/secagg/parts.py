"""Data layout of the masked all-reduce: how a peer's ring words are cut into parts and travel.

A peer encodes its ``values`` (the selected coordinates of its update) and one weight word, so
the vector in the ring has ``values + 1`` words; part ``k`` is the slice ``[start, stop)`` its
reducer sums. On the wire a part is its raw uint32 words, or, for low-bit codes, the low
``width`` bits of each value word packed (compression.py) followed by the weight word as 32 bits
(the last part only): the weight needs its full width whatever the code.

``Workspace`` keeps the large arrays across rounds: a fresh 100 MB array costs a page fault per
4 KiB on first touch, more than the masking of it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from node.secagg.compression import pack_bits, packed_size, unpack_bits


class Workspace:
    """Arrays reused across rounds.

    ``take`` hands out a view of a free buffer at least as large as asked (or a new one); ``reset``
    frees them all for the next round. Named arrays (``array``) persist with their contents.
    """

    def __init__(self) -> None:
        self._named: dict[str, np.ndarray] = {}
        self._free: list[np.ndarray] = []
        self._used: list[np.ndarray] = []

    def array(self, name: str, size: int, dtype: Any = np.uint32) -> np.ndarray:
        found = self._named.get(name)
        if found is None or found.size != size or found.dtype != dtype:
            found = self._named[name] = np.empty(size, dtype)
        return found

    def take(self, size: int) -> np.ndarray:
        fitting = [i for i, b in enumerate(self._free) if b.size >= size]
        if fitting:
            buffer = self._free.pop(min(fitting, key=lambda i: self._free[i].size))
        else:
            buffer = np.empty(size, np.uint32)
        self._used.append(buffer)
        return buffer[:size]

    def reset(self) -> None:
        self._free += self._used
        self._used = []


def split_parts(total: int, sizes: Iterable[int]) -> list[tuple[int, int]]:
    """[start, stop) of each part, from part sizes that sum to ``total``."""
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    if start != total:
        raise ValueError(f"part sizes sum to {start}, the vector has {total} elements")
    return bounds


class PartLayout:
    """The wire form of each part of a group's ring vector.

    Args:
        bounds: [start, stop) of each part, over ``values + 1`` words (``split_parts``).
        values: how many value words precede the weight word.
        width: bits per value word on the wire (32: raw words, nothing packed).
        workspace: where unpacked words and payload buffers are taken from.
    """

    def __init__(self, bounds: list[tuple[int, int]], values: int, width: int, workspace: Workspace):
        self.bounds, self.values, self.width, self.workspace = bounds, values, width, workspace

    def wire_size(self, part: int) -> int:
        """Bytes of part ``part`` on the wire."""
        start, stop = self.bounds[part]
        count = min(stop, self.values) - start
        return packed_size(count, self.width) + (4 if stop > self.values else 0)

    def to_wire(self, words: np.ndarray, part: int) -> Any:
        """A part's words as sent: raw 32-bit words, or the low ``width`` bits packed (weight word: 32)."""
        if self.width == 32:
            return words.data.cast("B")
        start, stop = self.bounds[part]
        count = min(stop, self.values) - start
        packed = pack_bits(words[:count], self.width)
        return packed + (words[-1:].astype("<u4").tobytes() if stop > self.values else b"")

    def from_wire(self, payload: np.ndarray, part: int) -> np.ndarray:
        """A received part or partial sum as uint32 words (``payload`` as read into ``buffer``)."""
        if self.width == 32:
            return payload
        start, stop = self.bounds[part]
        words = self.workspace.take(stop - start)
        count = min(stop, self.values) - start
        unpack_bits(payload[: packed_size(count, self.width)], self.width, words[:count])
        if stop > self.values:  # the weight word travels as 32 bits after the packed values
            words[-1] = payload[-4:].view("<u4")[0]
        return words

    def buffer(self, part: int) -> np.ndarray:
        """Where a part's payload is read to: a reused buffer of its wire size."""
        size = self.wire_size(part)
        if self.width == 32:
            return self.workspace.take(size // 4)
        return self.workspace.take((size + 3) // 4).view(np.uint8)[:size]

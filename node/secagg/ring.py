"""One peer's update in the ring Z_2^W: the values it encodes, their encoding part by part, the mean.

With random-k (compression.py) a peer encodes only the group's selected coordinates of its
update; the weight word ``omega`` follows the values, so the ring vector has ``values + 1``
words. With error feedback, what the group's sum does not take (the rounding error and clipped
excess of each sent value, every unselected coordinate) goes to ``residual``, written only once
the round has decoded: a failed round leaves it as it was.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from node.secagg.fixed_point import FixedPointCodec
from node.secagg.messages import NO_BOUND
from node.secagg.parts import Workspace

if TYPE_CHECKING:
    from node.secagg.privacy import NoiseShare


class RingVector:
    """This peer's ``vector`` as it enters the ring, and the group's mean as it leaves it.

    Args:
        vector: this peer's update, float32, flattened.
        omega: this peer's weight in (0, 1].
        codec: the group's fixed-point code (``use_bound`` may tighten it).
        selected: the coordinates sent (random-k), or None for all.
        workspace: buffers reused across rounds.
        out: float32 array (the vector's length) the mean is written into; may be ``vector`` itself.
        residual: for error feedback: overwritten on success with what the sum did not take.
        noise: this peer's share of the differential-privacy noise, added in the ring.
    """

    def __init__(
        self,
        *,
        vector: np.ndarray,
        omega: float,
        codec: FixedPointCodec,
        selected: np.ndarray | None,
        workspace: Workspace,
        out: np.ndarray,
        residual: np.ndarray | None,
        noise: NoiseShare | None,
    ):
        if residual is not None and (residual.shape != vector.shape or residual.dtype != np.float32):
            raise ValueError("residual must be a float32 array shaped like vector")
        if out.shape != vector.shape or out.dtype != np.float32:
            raise ValueError("out must be a float32 array shaped like vector")
        self.vector, self.omega, self.codec, self.selected = vector, omega, codec, selected
        self.workspace, self.out, self.residual, self.noise = workspace, out, residual, noise
        self.values = self._inputs()  # what this peer encodes: the selected coordinates of vector
        # error feedback: per sent value, what its encoded word fails to carry
        self.sent_error = None if residual is None else workspace.array("sent_error", self.values.size, np.float32)

    def propose_bound(self) -> int:
        """log2 of the power of two at or above 3x the RMS of our values (NO_BOUND for an all-zero update)."""
        rms = float(np.sqrt(np.mean(np.square(self.values, dtype=np.float64)))) if self.values.size else 0.0
        if not (np.isfinite(rms) and rms > 0):
            return NO_BOUND
        return int(min(30, max(-100, np.ceil(np.log2(3 * rms)))))

    def use_bound(self, bound: float) -> None:
        """Encode with the code bound the group agreed on."""
        self.codec = dataclasses.replace(self.codec, bound=bound)

    def encode_part(self, words: np.ndarray, start: int, stop: int, seed: bytes) -> None:
        """words = enc(omega * values[start:stop]) (+ noise; + the weight word if the part holds it), unmasked."""
        values = self.values[start : min(stop, self.values.size)]
        self.codec.encode_into(values, self.omega, words[: values.size], seed=seed)
        if self.sent_error is not None:  # error feedback: what the encoded words fail to carry
            error = self.sent_error[start : start + values.size]
            self.codec.dequantize_into(words[: values.size], self.omega, error)
            np.subtract(values, error, out=error)
        if self.noise is not None:
            self.noise.add_to(words[: values.size], self.codec.group_size, self.codec.scale)
        if stop > self.values.size:  # the part that carries the weight word
            words[-1] = self.codec.encode_weight(self.omega)

    def decode(self, total: np.ndarray) -> float:
        """Decode the group sum into ``out`` (zeros off the selected coordinates); commit the residual."""
        if self.selected is None:
            weight_sum = self.codec.decode_sum(total, self.out)
        else:
            mean = self.workspace.array("selected_mean", self.selected.size, np.float32)
            weight_sum = self.codec.decode_sum(total, mean)
            self.out.fill(0)
            self.out[self.selected] = mean
        if self.residual is not None and self.sent_error is not None:
            # what was not sent stays: every unselected coordinate, and the error of each sent one
            if self.selected is None:
                np.copyto(self.residual, self.sent_error)
            else:
                np.copyto(self.residual, self.workspace.array("inputs", self.vector.size, np.float32))
                self.residual[self.selected] = self.sent_error
        return weight_sum

    def _inputs(self) -> np.ndarray:
        """The values to encode: ``vector`` on the selected coordinates (a copy: ``out`` may be ``vector``)."""
        if self.selected is None and self.residual is None:
            return self.vector
        source = self.workspace.array("inputs", self.vector.size, np.float32)
        np.copyto(source, self.vector)
        if self.selected is None:
            return source
        return np.take(source, self.selected, out=self.workspace.array("selected", self.selected.size, np.float32))

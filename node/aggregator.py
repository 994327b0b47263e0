"""Aggregation: one interface for merging pseudo-gradients with peers.

``Aggregator.aggregate`` takes this node's update tensors and its weight (samples) for an outer
round and replaces the tensors, in place, with the weighted mean over the group it joined.
``PlainAggregator`` runs hivemind's ``DecentralizedAverager`` (butterfly all-reduce over
libp2p); the masked all-reduce of the next issue implements the same interface.

Round alignment: a node sets its matchmaking group bits to its round number before each
step, so only peers at the same round meet (hivemind forms groups per key). Every member
gathers its round into the group; a mismatch is an error, not an average of unrelated deltas.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import hivemind
import torch
from hivemind.averaging import DecentralizedAverager

from node.config import AggregationConfig

logger = logging.getLogger(__name__)

ROUND_BITS = 16  # the round number modulo 2**16 picks the matchmaking key


class AggregationError(Exception):
    """A round's aggregation produced an inconsistent result and must not be applied."""


@dataclass(frozen=True)
class AggregationResult:
    """What a successful aggregation reports."""

    round: int  # the outer round that was averaged
    group_size: int  # peers whose updates are in the mean, self included
    peers: tuple[str, ...]  # their PeerIDs


class Aggregator(ABC):
    """Merge one round's update with peers."""

    @abstractmethod
    def aggregate(self, round_no: int, tensors: Sequence[torch.Tensor], weight: float) -> AggregationResult | None:
        """Replace ``tensors`` in place with the weighted mean over a group of peers at ``round_no``.

        Args:
            round_no: the outer round this update belongs to.
            tensors: this node's update; overwritten with the group's mean on success.
            weight: this node's weight in the mean (its sample count for the round), > 0.

        Returns:
            The group's description, or None when no group formed in time (``tensors`` unchanged).

        Raises:
            AggregationError: the group's result is inconsistent; ``tensors`` are unchanged.
        """

    @abstractmethod
    def shutdown(self) -> None:
        """Stop background work and release network handlers."""


def round_group_bits(round_no: int) -> str:
    return format(round_no % (1 << ROUND_BITS), f"0{ROUND_BITS}b")


class PlainAggregator(Aggregator):
    """hivemind's DecentralizedAverager behind the Aggregator interface (no masking: for comparison).

    Args:
        dht: the node's running DHT.
        run_id: the run; its averaging key is derived from it.
        templates: tensors with the shapes and dtypes of the update.
        config: group size, matchmaking time and timeout.
        client_mode: dial out only (a peer behind NAT).
        stop_event: when set, a pending aggregation is cancelled and returns None.
    """

    def __init__(
        self,
        dht: hivemind.DHT,
        run_id: str,
        templates: Sequence[torch.Tensor],
        config: AggregationConfig,
        client_mode: bool = False,
        stop_event: threading.Event | None = None,
    ):
        self.config = config
        self._stop = stop_event or threading.Event()
        self._buffers = [torch.zeros_like(t, dtype=torch.float32, device="cpu") for t in templates]
        self._averager = DecentralizedAverager(
            self._buffers,
            dht,
            start=True,
            prefix=f"zen_{run_id}_grads",
            min_group_size=config.min_group_size,
            min_matchmaking_time=config.matchmaking_time,
            request_timeout=min(1.0, config.matchmaking_time / 2),
            initial_group_bits=round_group_bits(0),
            client_mode=client_mode,
            allow_state_sharing=False,
            shutdown_timeout=2,
        )

    def aggregate(self, round_no: int, tensors: Sequence[torch.Tensor], weight: float) -> AggregationResult | None:
        if weight <= 0:
            raise ValueError(f"weight must be > 0, got {weight}")
        with self._averager.get_tensors() as buffers:
            for buffer, tensor in zip(buffers, tensors, strict=True):
                buffer.copy_(tensor.detach().float().cpu())
        self._averager.set_group_bits(round_group_bits(round_no))
        control = self._averager.step(
            gather={"round": round_no},
            weight=float(weight),
            timeout=self.config.timeout,
            allow_retries=True,
            wait=False,
        )
        while not control.done():
            if self._stop.wait(0.2):
                control.cancel()
                return None
        try:
            gathered = control.result()
        except Exception as e:  # hivemind reports a failed all-reduce as an exception of its own
            logger.warning(f"round {round_no}: averaging failed: {e}")
            return None
        if not gathered:
            return None
        rounds = {str(peer): data.get("round") if isinstance(data, dict) else None for peer, data in gathered.items()}
        if set(rounds.values()) != {round_no}:
            raise AggregationError(f"group mixed rounds {rounds}; the average of round {round_no} is discarded")
        with self._averager.get_tensors() as buffers:
            if not all(torch.isfinite(buffer).all() for buffer in buffers):
                raise AggregationError(f"round {round_no}: the group's mean holds non-finite values")
            for buffer, tensor in zip(buffers, tensors, strict=True):
                tensor.copy_(buffer.to(tensor.device, tensor.dtype))
        return AggregationResult(round=round_no, group_size=len(gathered), peers=tuple(sorted(rounds)))

    def shutdown(self) -> None:
        self._averager.shutdown()


def make_aggregator(
    dht: hivemind.DHT,
    run_id: str,
    templates: Sequence[torch.Tensor],
    config: AggregationConfig,
    client_mode: bool = False,
    stop_event: threading.Event | None = None,
) -> Aggregator:
    """The aggregator that ``config.mode`` names."""
    if config.mode == "plain":
        return PlainAggregator(dht, run_id, templates, config, client_mode=client_mode, stop_event=stop_event)
    raise ValueError(f"unknown aggregation mode {config.mode!r}")

"""Aggregation: one interface for merging pseudo-gradients with peers.

``Aggregator.aggregate`` takes this node's update tensors and its weight (samples) for an outer
round and replaces the tensors, in place, with the weighted mean over the group it joined.
``SecureAggregator`` (the default) runs the masked all-reduce (node/masked_allreduce.py): no peer
sees another's update. ``PlainAggregator`` runs hivemind's ``DecentralizedAverager`` (float
butterfly all-reduce over libp2p), for comparison.

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
from typing import Any

import hivemind
import torch
from hivemind.averaging import DecentralizedAverager

from dht import NodeIdentity
from node.config import AggregationConfig, CompressionConfig, ConfigError
from node.masked_allreduce import SecAggIdentity, SecAggTimeouts
from node.privacy import NoiseShare
from node.secure_averager import SecureAverager

logger = logging.getLogger(__name__)

ROUND_BITS = 16  # the round number modulo 2**16 picks the matchmaking key
MAX_SECURE_GROUP = 32  # the largest group a secure all-reduce runs in


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

    @property
    def residual(self) -> torch.Tensor | None:
        """After a successful ``aggregate``: what of the update the group's sum left out (flat), or None
        when it took all of it (no compression)."""
        return None


def round_group_bits(round_no: int) -> str:
    return format(round_no % (1 << ROUND_BITS), f"0{ROUND_BITS}b")


def _averager_kwargs(config: AggregationConfig) -> dict[str, Any]:
    return dict(
        start=True,
        min_group_size=config.min_group_size,
        min_matchmaking_time=config.matchmaking_time,
        request_timeout=min(1.0, config.matchmaking_time / 2),
        initial_group_bits=round_group_bits(0),
        allow_state_sharing=False,
        shutdown_timeout=2,
    )


def _buffers(templates: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The averager's own float32 CPU copies of the update (shared with its process)."""
    return [torch.zeros_like(t, dtype=torch.float32, device="cpu") for t in templates]


class _AveragerAggregator(Aggregator):
    """Runs one step of a hivemind averager per round; subclasses build the averager."""

    def __init__(self, averager: DecentralizedAverager, config: AggregationConfig, stop_event: threading.Event | None):
        self.config = config
        self._stop = stop_event or threading.Event()
        self._averager = averager

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


class PlainAggregator(_AveragerAggregator):
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
        averager = DecentralizedAverager(
            _buffers(templates), dht, prefix=f"zen_{run_id}_grads", client_mode=client_mode, **_averager_kwargs(config)
        )
        super().__init__(averager, config, stop_event)


class SecureAggregator(_AveragerAggregator):
    """The masked all-reduce behind the Aggregator interface: no peer sees another's update.

    Args:
        dht: the node's running DHT.
        run_id: the run; its averaging key is derived from it.
        templates: tensors with the shapes and dtypes of the update.
        config: group size (>= 3), matchmaking time, timeout and the clip bound.
        identity: the node's identity; it signs every protocol message.
        weight_bound: the largest weight (samples per round) a peer brings.
        stop_event: when set, a pending aggregation is cancelled and returns None.
        bandwidth: this node's upload bandwidth (bytes/s) for load balancing; None: unknown.
        noise: this node's share of differential-privacy noise (None: no DP). The ring's clip
            bound then leaves room for the noise: max(clip_bound, C * (1 + 10 sigma)).
        compression: low-bit words and random-k inside the ring, with error feedback.
        bound: the code's clip bound (``ring_bound``).
    """

    def __init__(
        self,
        dht: hivemind.DHT,
        run_id: str,
        templates: Sequence[torch.Tensor],
        config: AggregationConfig,
        identity: NodeIdentity,
        weight_bound: float,
        stop_event: threading.Event | None = None,
        bandwidth: float | None = None,
        noise: NoiseShare | None = None,
        compression: CompressionConfig | None = None,
        bound: float | None = None,
    ):
        if config.min_group_size < 3:
            raise ValueError("secure aggregation needs min_group_size >= 3: a sum of two reveals both inputs")
        averager = SecureAverager(
            _buffers(templates),
            dht,
            identity=SecAggIdentity(identity.sign, identity.signing_public_key, identity.binding),
            clip_bound=bound or ring_bound(config, noise),
            weight_bound=weight_bound,
            timeouts=SecAggTimeouts(message=config.message_timeout, data=config.timeout),
            noise=noise,
            compression=compression,
            prefix=f"zen_{run_id}_secagg",
            target_group_size=MAX_SECURE_GROUP,
            bandwidth=bandwidth,
            allreduce_timeout=config.timeout,  # a hung peer cannot hold the round past the timeout
            **_averager_kwargs(config),
        )
        super().__init__(averager, config, stop_event)

    @property
    def bytes_sent(self) -> float:
        """Protocol bytes this node has put on the wire for secure aggregation."""
        return float(self._averager.bytes_sent.value)

    @property
    def residual(self) -> torch.Tensor | None:
        return self._averager.residual if self._averager.residual.numel() else None


def ring_bound(config: AggregationConfig, noise: NoiseShare | None, compression_bound: float = 0.0) -> float:
    """The fixed-point code's bound: the clip bound (or a low-bit code's bound), widened with DP so
    the noise cannot wrap the ring."""
    base = compression_bound or config.clip_bound
    if noise is None:
        return base
    return max(base, noise.clip_norm * (1 + 10 * noise.noise_multiplier))


def make_aggregator(
    dht: hivemind.DHT,
    run_id: str,
    templates: Sequence[torch.Tensor],
    config: AggregationConfig,
    identity: NodeIdentity,
    weight_bound: float,
    client_mode: bool = False,
    stop_event: threading.Event | None = None,
    bandwidth: float | None = None,
    noise: NoiseShare | None = None,
    compression: CompressionConfig | None = None,
    compression_bound: float = 0.0,
) -> Aggregator:
    """The aggregator that ``config.mode`` names (``bandwidth``: upload bytes/s, None if unknown)."""
    if config.mode == "plain":
        return PlainAggregator(dht, run_id, templates, config, client_mode=client_mode, stop_event=stop_event)
    if config.mode == "secure":
        if client_mode:
            raise ConfigError(
                "secure aggregation needs every peer to be reachable (it reduces a part); "
                "drop client mode or set aggregation.mode = 'plain'"
            )
        return SecureAggregator(
            dht,
            run_id,
            templates,
            config,
            identity,
            weight_bound,
            stop_event=stop_event,
            bandwidth=bandwidth,
            noise=noise,
            compression=compression,
            bound=ring_bound(config, noise, compression_bound),
        )
    raise ValueError(f"unknown aggregation mode {config.mode!r}")

"""The masked all-reduce behind the Aggregator interface (node/secagg)."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import hivemind
import torch
from hivemind.p2p import PeerID

from dht import NodeIdentity
from node.aggregation.plain import AveragerAggregator, averager_buffers, averager_kwargs
from node.config import AggregationConfig, CompressionConfig
from node.secagg.averager import SecureAverager
from node.secagg.privacy import NoiseShare
from node.secagg.protocol import SecAggIdentity, SecAggTimeouts

MAX_SECURE_GROUP = 32  # the largest group a secure all-reduce runs in


class SecureAggregator(AveragerAggregator):
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
            averager_buffers(templates),
            dht,
            identity=SecAggIdentity(identity.sign, identity.signing_public_key, identity.binding),
            clip_bound=bound or ring_bound(config, noise),
            weight_bound=weight_bound,
            timeouts=SecAggTimeouts(message=config.message_timeout, data=config.timeout),
            noise=noise,
            compression=compression,
            group_rounds=config.group_rounds,
            formation=config.formation,
            allowlist=[PeerID.from_base58(peer) for peer in config.allowlist],
            prefix=f"zen_{run_id}_secagg",
            target_group_size=MAX_SECURE_GROUP,
            bandwidth=bandwidth,
            allreduce_timeout=config.timeout,  # a hung peer cannot hold the round past the timeout
            **averager_kwargs(config),
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

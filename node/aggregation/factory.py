"""Build the aggregator that the run's aggregation mode names."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import hivemind
import torch

from dht import NodeIdentity
from node.aggregation.base import Aggregator
from node.aggregation.plain import PlainAggregator
from node.aggregation.secure import SecureAggregator, ring_bound
from node.config import AggregationConfig, CompressionConfig
from node.secagg.privacy import NoiseShare


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
    """The aggregator that ``config.mode`` names (``bandwidth``: upload bytes/s, None if unknown).

    ``client_mode`` applies to the plain averager only: a secure run refuses client mode when its
    ``NodeConfig`` is built (node/config.py), since every member of a secure group reduces a part.
    """
    if config.mode == "plain":
        return PlainAggregator(dht, run_id, templates, config, client_mode=client_mode, stop_event=stop_event)
    if config.mode == "secure":
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

"""The signed record a sharding node (stage server or sharded trainer) publishes about itself."""

from __future__ import annotations

from typing import Any

from hivemind.utils import get_dht_time

from dht import NodeIdentity, PeerRecord
from node._version import __version__
from node.config import RunConfig


def signed_record(identity: NodeIdentity, run: RunConfig, ttl: float, **fields: Any) -> bytes:
    """A PeerRecord naming ``identity`` in ``run``, signed now; ``fields`` fill in the rest (roles, capacity, ...)."""
    return PeerRecord(
        peer_id=identity.peer_id,
        signing_key=identity.signing_public_key,
        binding=identity.binding,
        x25519_key=identity.x25519_public_key,
        version=__version__,
        run_hash=run.digest(),
        timestamp=get_dht_time(),
        run_config=run.to_bytes(),
        ttl=ttl,
        **fields,
    ).sign(identity)

"""A node joins a run only with the run's configuration: every peer of a run agrees on its ``[run]``.

A PeerRecord carries its run's config hash and the config itself (msgpack). A joining trainer
compares the hash of every listed peer with its own; on a difference it refuses to join and names
the differing fields (``describe_difference``), decoding the peer's config with the bounded decoder
(dht/wire.py): a record is peer input.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from dht import PeerRecord
from dht.wire import WireError, unpack_bounded
from node.config import RunConfig, describe_difference


class ConfigMismatchError(Exception):
    """A peer of the same run uses a different run configuration."""


def refuse_mismatched(run: RunConfig, run_hash: str, peers: Iterable[PeerRecord]) -> None:
    """Raise ConfigMismatchError, naming the differing fields, if a peer's run hash is not ``run_hash``."""
    for peer in peers:
        if peer.run_hash != run_hash:
            theirs = decode_run_config(peer.run_config)
            raise ConfigMismatchError(
                f"peer {peer.peer_id[:16]} runs {run.run_id!r} with a different config "
                f"({describe_difference(run, theirs)}); use the run's config file (--config)"
            )


def decode_run_config(raw: bytes) -> dict[str, Any]:
    """A peer's run config (its record's ``run_config``), or {} when it is not a bounded msgpack map."""
    try:
        value = unpack_bounded(raw, max_str=1024, max_array=64, max_map=64)
    except WireError:
        return {}
    return value if isinstance(value, dict) else {}

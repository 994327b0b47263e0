"""Guard the public surface of ``dht``: adding or removing an exported name is a deliberate change."""

from __future__ import annotations

import importlib

import pytest

import dht

DHT_EXPORTS = [
    "MAX_TTL",
    "SKETCH_DIM",
    "BanError",
    "BanRecord",
    "Capacity",
    "Cohort",
    "CohortMatcher",
    "Heartbeat",
    "IdentityError",
    "LedgerError",
    "LedgerSummary",
    "NodeIdentity",
    "PeerRecord",
    "PeerRecordValidator",
    "RecordError",
    "SwarmConfig",
    "SwarmError",
    "adjusted_rand_index",
    "check_multiaddr",
    "connect_to_peers",
    "encode_sketch",
    "list_bans",
    "list_peers",
    "list_summaries",
    "peer_id_from_public_key",
    "peers_key",
    "public_key_from_peer_id",
    "publish_ban",
    "publish_record",
    "publish_summary",
    "reap",
    "start_dht",
]


def _isort_style(name: str) -> tuple[int, str]:
    """ruff's RUF022 order: CONSTANTS, then Classes, then functions, each alphabetical."""
    return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)


def test_dht_all_is_the_expected_sorted_list() -> None:
    """``dht.__all__`` is exactly the reviewed list, kept sorted (update DHT_EXPORTS when the API changes)."""
    # Assert
    assert dht.__all__ == DHT_EXPORTS
    assert sorted(DHT_EXPORTS, key=_isort_style) == DHT_EXPORTS


@pytest.mark.parametrize("name", DHT_EXPORTS)
def test_dht_export_is_importable(name: str) -> None:
    """Each exported name resolves on a fresh import of ``dht`` and is defined inside the package."""
    # Execute
    value = getattr(importlib.import_module("dht"), name)

    # Assert
    assert value is not None
    module = getattr(value, "__module__", "dht")
    assert module.startswith("dht")

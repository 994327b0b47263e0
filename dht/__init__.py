"""The swarm's shared state: joining, identities, signed typed records, discovery, cohorts.

class NodeIdentity (identity.py): a node's libp2p key (its PeerID) and the record-signing key bound to it
class PeerRecord, Capacity (records.py): a node's signed self-description, msgpack on the wire
class CohortMatcher, Cohort (cohorts.py): peers with similar data, by a deterministic rule over the records;
    adjusted_rand_index
class BanRecord (bans.py): a trainer's signed claim that a stage server cheated; publish_ban, list_bans
class LedgerSummary (ledger.py): a node's signed running total of what it gave a run; publish_summary, list_summaries
class PeerRecordValidator (validator.py): hivemind validator that drops forged, stale or malformed records
class SwarmConfig (config.py): join options, loaded without hivemind; check_multiaddr
class Heartbeat (swarm.py): keep a node's record fresh
start_dht, publish_record, list_peers, reap (swarm.py): start a DHT peer, publish, read the live peers, end it

``dht`` never imports ``node`` or ``bootstrap``. Names are imported lazily, on first use.
"""

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "MAX_TTL": "validator",
    "SKETCH_DIM": "records",
    "BanError": "bans",
    "BanRecord": "bans",
    "Capacity": "records",
    "Cohort": "cohorts",
    "CohortMatcher": "cohorts",
    "Heartbeat": "swarm",
    "IdentityError": "identity",
    "LedgerError": "ledger",
    "LedgerSummary": "ledger",
    "NodeIdentity": "identity",
    "PeerRecord": "records",
    "PeerRecordValidator": "validator",
    "RecordError": "records",
    "SwarmConfig": "config",
    "SwarmError": "config",
    "adjusted_rand_index": "cohorts",
    "check_multiaddr": "config",
    "connect_to_peers": "swarm",
    "encode_sketch": "records",
    "list_bans": "bans",
    "list_peers": "swarm",
    "list_summaries": "ledger",
    "peer_id_from_public_key": "identity",
    "peers_key": "validator",
    "public_key_from_peer_id": "identity",
    "publish_ban": "bans",
    "publish_record": "swarm",
    "publish_summary": "ledger",
    "reap": "swarm",
    "start_dht": "swarm",
}
__all__ = [
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

if TYPE_CHECKING:
    from dht.bans import BanError, BanRecord, list_bans, publish_ban
    from dht.cohorts import Cohort, CohortMatcher, adjusted_rand_index
    from dht.config import SwarmConfig, SwarmError, check_multiaddr
    from dht.identity import IdentityError, NodeIdentity, peer_id_from_public_key, public_key_from_peer_id
    from dht.ledger import LedgerError, LedgerSummary, list_summaries, publish_summary
    from dht.records import SKETCH_DIM, Capacity, PeerRecord, RecordError, encode_sketch
    from dht.swarm import Heartbeat, connect_to_peers, list_peers, publish_record, reap, start_dht
    from dht.validator import MAX_TTL, PeerRecordValidator, peers_key


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use: ``import dht`` stays cheap (no hivemind)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dht' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"dht.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value

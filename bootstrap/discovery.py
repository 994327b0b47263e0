"""What the bootstrap peer learns from inside its own DHT process: the runs it stores, its validator's refusals.

Both functions run in the DHT process (``hivemind.DHT.run_coroutine``), where hivemind keeps the local
storage and the record validator, and return plain values.

Finding runs without ``--run-id``: a DHT key is a hash (``DHTID``) of ``zen.<run_id>.peers``, so the
storage alone does not name a run. Each stored peer record carries its run's configuration, which names
the run; a run id counts only when a record under that key verifies (signature and key binding,
``PeerRecord.verify``) and the key is exactly the hash of that run's peers key. A forged record can
therefore not make up a run, and the poller still reads every listed run through ``list_peers``, which
checks each record again.
"""

from __future__ import annotations

from typing import Any

from hivemind.dht.routing import DHTID
from hivemind.dht.storage import DictionaryDHTValue

from dht.records import MAX_RECORD_BYTES, PeerRecord, RecordError
from dht.validator import PeerRecordValidator, peers_key
from dht.wire import WireError, unpack_bounded

MAX_KEYS_SCANNED = 4096  # stored keys looked at per scan
MAX_TRIES_PER_KEY = 4  # records tried per key before giving up on it


async def stored_runs(_dht: Any, node: Any, limit: int) -> list[str]:
    """Run ids with a verified peer record in this peer's DHT storage, sorted, at most ``limit``."""
    runs: set[str] = set()
    for index, (key, item) in enumerate(list(node.protocol.storage.items())):
        if index >= MAX_KEYS_SCANNED or len(runs) >= limit:
            break
        if isinstance(item.value, DictionaryDHTValue):
            run_id = _run_of(key, [entry.value for _, entry in list(item.value.items())[:MAX_TRIES_PER_KEY]])
            if run_id is not None:
                runs.add(run_id)
    return sorted(runs)


def _run_of(key: DHTID, values: list[bytes]) -> str | None:
    for value in values:
        try:
            envelope = unpack_bounded(value, max_bin=MAX_RECORD_BYTES, max_str=4096)
            if not isinstance(envelope, bytes):
                continue
            record = PeerRecord.verify(envelope)
            config = unpack_bounded(record.run_config, max_str=4096, max_bin=4096, max_array=256, max_map=64)
        except (RecordError, WireError):
            continue
        run_id = config.get("run_id") if isinstance(config, dict) else None
        if isinstance(run_id, str) and 0 < len(run_id) <= 128 and DHTID.generate(source=peers_key(run_id)) == key:
            return run_id
    return None


async def rejections(_dht: Any, node: Any) -> dict[str, int]:
    """Records this peer's validator refused so far, by reason (``dht.validator.REJECTION_REASONS``)."""
    validator = node.protocol.record_validator
    for candidate in [validator, *getattr(validator, "_validators", [])]:  # hivemind's CompositeValidator
        if isinstance(candidate, PeerRecordValidator):
            return dict(candidate.rejected_by_reason)
    return {}

"""``zen-node ledger``: read a run's ledger summaries from the DHT and print its contributors.

    zen-node ledger --initial-peers /ip4/203.0.113.5/tcp/31337/p2p/12D3KooW... --config run.toml --csv

A short-lived DHT peer in client mode (it stores nothing and needs no identity) reads every entry
under the run's ledger key; each is verified (dht/ledger.py) and checked against the run hash of
``--config``; the rows (node/ledger/contributors.py) list the unverified ones too, marked. Receipt
files presented with it (``receipts``: ``ledger.jsonl`` files or workdirs) are audited
(node/ledger/audit.py): their certificates checked, and each row gets the rounds they attest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Literal

from dht.config import SwarmConfig
from dht.ledger import list_summaries
from dht.swarm import start_dht
from node.config import RunConfig
from node.ledger.audit import apply_audit, audit_receipts
from node.ledger.contributors import (
    ContributorRow,
    claims_from_entries,
    contributor_rows,
    rows_as_csv,
    rows_as_json,
    rows_as_text,
)

Output = Literal["text", "json", "csv"]


def read_run_ledger(swarm: SwarmConfig, run: RunConfig, receipts: Sequence[Path] = ()) -> list[ContributorRow]:
    """The contributors of ``run`` as the DHT shows them now, verified or marked, audited against ``receipts``.

    Raises:
        dht.SwarmError: the swarm cannot be reached (a one-line error in the CLI).
        ValueError: a presented receipts path does not exist (one line).
    """
    audit = audit_receipts(receipts, run.digest()) if receipts else None
    dht = start_dht(replace(swarm, client_mode=True), None, [run.run_id])
    try:
        entries = list_summaries(dht, run.run_id)
    finally:
        dht.shutdown()
    claims = claims_from_entries(entries, run.digest())
    return contributor_rows(claims if audit is None else apply_audit(claims, audit))


def format_rows(rows: list[ContributorRow], run_id: str, output: Output = "text") -> str:
    """The rows as ``zen-node ledger`` prints them: a table, JSON lines or CSV."""
    if output == "json":
        return rows_as_json(rows)
    if output == "csv":
        return rows_as_csv(rows)
    return rows_as_text(rows, run_id)

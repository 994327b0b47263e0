"""Bookkeeping for the swarm a bootstrap peer watches: who is connected, who joined and who left.

The bootstrap peer polls two views of the swarm and hands each snapshot to :class:`SwarmMonitor`,
which diffs it against the previous one and logs the changes:

- libp2p connections: every node dials a bootstrap peer first, so the set of connected PeerIDs
  shows joins and leaves within one poll period (a leave is seen when the libp2p connection
  closes, usually at once when a node stops, at worst after libp2p's idle timeout);
- signed peer records of the runs named with ``--run-id``: a record that appears is a node that
  enrolled in the run, one that disappears is a node whose heartbeat stopped (its record expired).

This module only keeps state; it never touches the network, so its behaviour is easy to pin.
All methods are thread-safe: the poller writes while the HTTP thread reads.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SwarmView:
    """A consistent copy of what the monitor knows, for health reports."""

    connected: frozenset[str]  # PeerIDs with an open libp2p connection to us
    seen: int  # distinct PeerIDs ever connected to us since start
    records: dict[str, frozenset[str]]  # run id -> PeerIDs with a live signed record in that run


class SwarmMonitor:
    """Diff successive views of the swarm and log joins and leaves.

    Args:
        run_ids: runs whose peer records are tracked (may be empty).
    """

    def __init__(self, run_ids: Iterable[str] = ()):
        self._lock = threading.Lock()
        self._connected: frozenset[str] = frozenset()
        self._seen: set[str] = set()
        self._records: dict[str, frozenset[str]] = {run_id: frozenset() for run_id in run_ids}

    def update_connected(self, peers: dict[str, list[str]]) -> tuple[set[str], set[str]]:
        """Record the peers connected now and log who joined and who left.

        Args:
            peers: PeerID -> the addresses we are connected to it on.

        Returns:
            The PeerIDs that joined and those that left since the previous update.
        """
        current = frozenset(peers)
        with self._lock:
            joined, left = set(current - self._connected), set(self._connected - current)
            self._connected = current
            self._seen.update(current)
            total = len(current)
        for peer_id in sorted(joined):
            addrs = ", ".join(peers[peer_id]) or "unknown address"
            logger.info(f"peer joined: {peer_id} from {addrs} ({total} connected)")
        for peer_id in sorted(left):
            logger.info(f"peer left: {peer_id} ({total} connected)")
        return joined, left

    def update_records(self, run_id: str, peer_ids: Iterable[str]) -> tuple[set[str], set[str]]:
        """Record the PeerIDs with a live record in ``run_id`` and log who enrolled and who expired.

        Returns:
            The PeerIDs whose record appeared and those whose record disappeared.
        """
        current = frozenset(peer_ids)
        with self._lock:
            previous = self._records.get(run_id, frozenset())
            self._records[run_id] = current
        appeared, gone = set(current - previous), set(previous - current)
        for peer_id in sorted(appeared):
            logger.info(f"run {run_id}: record appeared for {peer_id} ({len(current)} enrolled)")
        for peer_id in sorted(gone):
            logger.info(f"run {run_id}: record gone for {peer_id} ({len(current)} enrolled)")
        return appeared, gone

    def view(self) -> SwarmView:
        """Return a consistent copy of the current state."""
        with self._lock:
            return SwarmView(connected=self._connected, seen=len(self._seen), records=dict(self._records))

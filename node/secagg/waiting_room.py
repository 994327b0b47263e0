"""Where messages for a group not started here yet wait for it, bounded per sender and in total.

Peers enter a group a little apart, so a faster peer's keys message may reach us before our
all-reduce for that group is registered; it waits (``SecAggEndpoint.wait_for_group`` seconds at
most). Anyone can name a group that does not exist, so waiting is bounded three ways:

- per sender (the libp2p-authenticated PeerID of the stream): at most ``per_peer`` messages and
  ``groups_per_peer`` distinct groups; more from that sender are refused at once, so a flood from
  one peer never touches what other peers have waiting;
- in total: at most ``total`` messages. When full, the oldest message of the sender holding the
  most is dropped to make room, but only if that sender holds more than the newcomer would; else
  the newcomer is refused. Many Sybils therefore evict one another before they evict an honest
  peer's single early message.

Every refusal and eviction is a ``MessageError`` with its reason (the endpoint logs it and
answers the sender); nothing here raises anything else.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from node.secagg.messages import MessageError

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Waiter:
    """One message waiting for its group; ``wake`` is set when the group registers or it is evicted."""

    remote: str  # the sender's PeerID
    group: bytes
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    evicted: str = ""  # why it was dropped to make room ("" while it may wait)


class WaitingRoom:
    """Bounded waiting for unregistered groups (module docstring).

    Args:
        total: messages that may wait at once, from everyone.
        per_peer: messages one sender may have waiting.
        groups_per_peer: distinct groups one sender's waiting messages may name.
    """

    def __init__(self, total: int = 256, per_peer: int = 8, groups_per_peer: int = 4):
        if not 1 <= groups_per_peer <= per_peer <= total:
            raise ValueError(
                f"need 1 <= groups_per_peer <= per_peer <= total, got {groups_per_peer}, {per_peer}, {total}"
            )
        self.total, self.per_peer, self.groups_per_peer = total, per_peer, groups_per_peer
        self._by_remote: dict[str, list[Waiter]] = {}  # sender -> its waiting messages, oldest first
        self._count = 0  # messages waiting, from everyone
        self.evictions = 0  # messages dropped to make room so far

    def enter(self, remote: str, group: bytes) -> Waiter:
        """A place for one message from ``remote`` for ``group``; MessageError if the bounds refuse it."""
        mine = self._by_remote.get(remote, [])
        if len(mine) >= self.per_peer:
            raise MessageError(f"{len(mine)} messages from this peer already wait for groups not started here")
        groups = {waiter.group for waiter in mine}
        if group not in groups and len(groups) >= self.groups_per_peer:
            raise MessageError(f"this peer already has messages waiting for {len(groups)} groups not started here")
        if self._count >= self.total:
            self._make_room(len(mine) + 1)
        waiter = Waiter(remote, group)
        self._by_remote.setdefault(remote, []).append(waiter)
        self._count += 1
        return waiter

    def leave(self, waiter: Waiter) -> None:
        """Free a message's place (it got its group, timed out, or was evicted); safe to call twice."""
        mine = self._by_remote.get(waiter.remote, [])
        if waiter in mine:
            mine.remove(waiter)
            self._count -= 1
            if not mine:
                del self._by_remote[waiter.remote]

    def wake(self, group: bytes) -> None:
        """Wake every message waiting for ``group`` (it has just registered)."""
        for mine in self._by_remote.values():
            for waiter in mine:
                if waiter.group == group:
                    waiter.wake.set()

    def waiting(self, remote: str | None = None) -> int:
        """Messages now waiting: from ``remote``, or from everyone."""
        return self._count if remote is None else len(self._by_remote.get(remote, []))

    def _make_room(self, newcomer_would_hold: int) -> None:
        """Evict the oldest message of the sender holding the most, if it holds more than the newcomer would."""
        biggest = max(self._by_remote, key=lambda remote: len(self._by_remote[remote]))
        if len(self._by_remote[biggest]) <= newcomer_would_hold:
            raise MessageError(f"{self._count} messages already wait for groups not started here")
        victim = self._by_remote[biggest][0]
        self.leave(victim)
        victim.evicted = f"dropped to make room: its sender had the most of {self.total} waiting messages"
        victim.wake.set()
        self.evictions += 1
        logger.warning(f"evicted a waiting secure-aggregation message from {biggest}: the waiting room is full")

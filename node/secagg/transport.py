"""Transport of the masked all-reduce: one peer's messages in one group, over hivemind P2P streams.

Every message travels on a fresh libp2p stream to the recipient's ``SecAggEndpoint`` (the framing
is in messages.py): the sender writes the header and payload and waits for the ``[ok, reason]``
reply, so a delivered message is an acknowledged one. A peer that fails a send, refuses a message
or stays silent past a deadline is marked dead for the rest of the round: no phase waits for it
again, and the protocol goes on without it. A received message is admitted (``check``) before
its payload is read, then waits in an inbox keyed by (kind, sender, slot) until a phase collects
it; ``SecAggEndpoint`` hands messages in through the all-reduce, which keeps what it must know
of them (the keys adverts, a recorded view) and passes them on (``accept``).

p2pd now and then resets a fresh stream before the reply arrives (seen under load), so a broken
stream is retried on a new one: delivery is idempotent (the receiver acknowledges the same signed
message twice without storing it twice), so resending cannot duplicate anything. A retry that the
receiver refuses because its round has ended counts as delivered: the broken stream may have carried
it, and a receiver that has ended waits for nothing more from us.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from hivemind.p2p import P2P, PeerID

from dht.identity import verify_binding
from node.secagg.messages import (
    FINISHED,
    MAX_REASON,
    MAX_REPLY_BYTES,
    Message,
    MessageError,
    named_indices,
    parse_reply,
)
from node.secagg.parts import PartLayout

logger = logging.getLogger(__name__)

WRITE_CHUNK = 1 << 18  # bytes handed to the stream at a time
STREAM_ATTEMPTS = 3  # fresh streams tried for one message when a stream breaks before the reply


class GroupTransport:
    """Sends and receives one peer's protocol messages in one group.

    A received message is admitted (``check``) only if it names this group, round and peer, comes
    from the peer it names as its sender, fits the group's shape and carries its sender's
    signature: the signing key bound to the sender's PeerID, learned from its keys message.

    Args:
        p2p: the peer's libp2p client; messages go out as streams to ``handler_name``.
        handler_name: the protocol name every member's ``SecAggEndpoint`` serves.
        group_id: the group's id; named in every message and log line.
        round_no: the outer round; named in every message.
        peer_ids: the group in the agreed order; this peer is at ``index``.
        index: this peer's position in ``peer_ids``.
        sign: the identity's Ed25519 signer for outgoing headers.
        timeout: seconds one send may take unless the caller gives another.
        stats: counters this adds to: bytes_sent (each delivered message's length, header and payload), the same
            by kind (bytes_by_kind), payload_bytes (the masked vector's words alone), messages_sent, stream_retries.
        layout: the parts' wire sizes, which a part or sum message's payload must match.
    """

    def __init__(
        self,
        *,
        p2p: P2P,
        handler_name: str,
        group_id: bytes,
        round_no: int,
        peer_ids: list[PeerID],
        index: int,
        sign: Callable[[bytes], bytes],
        timeout: float,
        stats: dict[str, Any],
        layout: PartLayout,
    ):
        self.p2p, self.handler_name = p2p, handler_name
        self.group_id, self.round_no, self.peer_ids, self.index = group_id, round_no, peer_ids, index
        self.sign, self.timeout, self.stats, self.layout = sign, timeout, stats, layout
        self.dead: set[int] = set()  # peers that failed a send or a deadline: not waited for again
        self.closed = False  # set when the round ends; later messages are refused
        self._signers: dict[int, bytes] = {}  # sender -> the signing key its keys message bound to its PeerID
        self._inbox: dict[tuple[str, int, int], Message] = {}  # (kind, sender, part or attempt) -> message
        self._changed = asyncio.Event()  # set on every arrival or death, to wake a collector
        self._background: list[asyncio.Future[Any]] = []  # sends not waited for; cancelled on close

    # ------------------------------------------------------------------ sending

    async def send(self, to: int, kind: str, data: dict[str, Any], payload: Any = b"", timeout: float = 0) -> bool:
        """Deliver one message; False (and ``to`` marked dead) if it could not be delivered."""
        if to in self.dead:
            return False
        message = Message(kind, self.group_id, self.round_no, self.index, to, data, payload=payload)
        header = message.seal(self.sign)
        try:
            async with asyncio.timeout(timeout or self.timeout):
                ok, reason = await self._deliver(to, kind, header, payload)
        except Exception as e:  # a dead, slow or refusing peer: any failure means "not delivered"
            logger.warning(f"group {self.group_id.hex()[:8]}: {kind} to peer {to} failed, counted as gone: {e!r}")
            self._mark_dead(to)
            return False
        if not ok:
            logger.warning(f"group {self.group_id.hex()[:8]}: peer {to} refused our {kind}: {reason}")
            self._mark_dead(to)
            return False
        sent = 4 + len(header) + len(payload)
        self.stats["bytes_sent"] += sent
        self.stats["bytes_by_kind"][kind] = self.stats["bytes_by_kind"].get(kind, 0) + sent
        self.stats["payload_bytes"] += len(payload)
        self.stats["messages_sent"] += 1
        return True

    async def abort(self, reason: str, wait: float, evidence: list[list[bytes]]) -> None:
        """Tell the other peers that we left the round, so that none waits for us until its deadline.

        Best effort, at most ``wait`` s: a peer that misses it waits for us as for any silent peer.
        A signed abort only removes its sender, which silence would do anyway. ``evidence``: the signed
        messages we were told (consistency.py), so that a peer who lied to us can still be proven to have.
        """
        data = {"reason": reason[:MAX_REASON], "evidence": evidence}

        async def tell(to: int) -> None:
            header = Message("abort", self.group_id, self.round_no, self.index, to, data).seal(self.sign)
            await self._deliver(to, "abort", header, b"")

        sends = [asyncio.ensure_future(tell(j)) for j in range(len(self.peer_ids)) if j != self.index]
        for send in sends:
            send.add_done_callback(_retrieve)
        if sends:
            _, pending = await asyncio.wait(sends, timeout=wait)
            for send in pending:
                send.cancel()

    def spawn(self, sending: Awaitable[Any]) -> asyncio.Future[Any]:
        """Run a send in the background (a peer that stalls must not hold up a phase); cancelled on close."""
        future = asyncio.ensure_future(sending)
        future.add_done_callback(_retrieve)  # a send cancelled on close is expected, not an unread error
        self._background.append(future)
        return future

    async def _deliver(self, to: int, kind: str, header: bytes, payload: Any) -> tuple[bool, str]:
        """The receiver's reply to one message, on a fresh stream each time one breaks before the reply."""
        for attempt in range(STREAM_ATTEMPTS):
            try:
                ok, reason = await self._exchange(to, header, payload)
            except (asyncio.IncompleteReadError, ConnectionError) as e:
                # a stream reset before the reply (seen under load with p2pd); delivery is
                # idempotent, so a fresh stream may carry the same message again
                if attempt + 1 == STREAM_ATTEMPTS:
                    raise
                logger.debug(f"{kind} to peer {to}: stream broke ({e!r}), retrying")
                self.stats["stream_retries"] += 1
                await asyncio.sleep(0.05 * (attempt + 1))
                continue
            if not ok and attempt and reason == FINISHED:
                # the broken stream may have carried it, and the receiver has ended its round since: it waits
                # for nothing more from us, and counting it gone would only skew this round's view of it
                logger.debug(f"{kind} to peer {to}: its round had ended by our retry; counted as delivered")
                return True, ""
            return ok, reason
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _exchange(self, to: int, header: bytes, payload: Any) -> tuple[bool, str]:
        """One stream: the header, the payload in chunks, then the receiver's [ok, reason] reply."""
        opening = asyncio.ensure_future(self.p2p.call_binary_stream_handler(self.peer_ids[to], self.handler_name))
        try:
            _, reader, writer = await asyncio.shield(opening)
        except asyncio.CancelledError:
            # hivemind's stream_open leaks its daemon connection if cancelled midway: let it finish, then close
            opening.add_done_callback(_close_stream)
            raise
        try:
            writer.write(len(header).to_bytes(4, "big") + header)
            for offset in range(0, len(payload), WRITE_CHUNK):  # bounded buffering, no 25 MB copies
                writer.write(payload[offset : offset + WRITE_CHUNK])
                await writer.drain()
            await writer.drain()
            length = int.from_bytes(await reader.readexactly(4), "big")
            if length > MAX_REPLY_BYTES:
                raise MessageError("oversized reply")
            return parse_reply(await reader.readexactly(length))
        finally:
            writer.close()

    def _mark_dead(self, peer: int) -> None:
        self.dead.add(peer)
        self._changed.set()  # a collector waiting on this peer stops waiting

    # ------------------------------------------------------------------ receiving

    def check(self, message: Message, remote: PeerID, payload_size: int) -> None:
        """Refuse a message not for this group and peer, or not signed by its sender, before its payload is read."""
        if message.group != self.group_id:
            raise MessageError("wrong group id")
        if message.round != self.round_no:
            raise MessageError(f"message for round {message.round}, this all-reduce is round {self.round_no}")
        n = len(self.peer_ids)
        if message.sender >= n or self.peer_ids[message.sender] != remote:
            raise MessageError(f"sender index {message.sender} is not the stream's peer {remote}")
        if message.recipient != self.index or message.sender == self.index:
            raise MessageError(f"message addressed to peer {message.recipient}, this is peer {self.index}")
        if any(i >= n for i in named_indices(message.data)):
            raise MessageError(f"a {message.kind!r} message names a peer outside the group of {n}")
        if message.kind == "claim" and len(message.data["holders"]) != n:
            raise MessageError(f"a claim must name one holder per part ({n})")
        if message.kind in ("part", "sum"):
            part = message.data["part"]
            if part >= n:
                raise MessageError(f"part {part} does not exist in a group of {n}")
            if payload_size != self.layout.wire_size(part):
                raise MessageError(f"part {part} must be {self.layout.wire_size(part)} bytes, got {payload_size}")
        elif payload_size:
            raise MessageError(f"a {message.kind!r} message carries no payload")
        self._check_signature(message, remote)

    def _check_signature(self, message: Message, remote: PeerID) -> None:
        """A keys message must carry a signing key bound to the PeerID; the others are checked against it."""
        if message.kind == "keys":
            data = message.data
            if not verify_binding(str(remote), data["signing_pk"], data["binding"]):
                raise MessageError(f"peer {message.sender}'s signing key is not bound to its PeerID")
            message.verify(data["signing_pk"])
        else:
            signing_key = self._signers.get(message.sender)
            if signing_key is None:
                raise MessageError(f"peer {message.sender} sent {message.kind!r} before its keys")
            message.verify(signing_key)

    def accept(self, message: Message) -> bool:
        """Put a checked message in the inbox; False if this very message is there already (a resend).

        Raises:
            MessageError: the round has ended, or another message holds the same slot.
        """
        if self.closed:
            raise MessageError(FINISHED)
        slot = (message.kind, message.sender, message.data.get("part", message.data.get("attempt", 0)))
        if slot in self._inbox:
            if self._inbox[slot].body == message.body:
                return False  # the same signed message again (a retry after a broken stream): already have it
            raise MessageError(f"duplicate {message.kind!r} message from peer {message.sender}")
        if message.kind == "keys":
            self._signers[message.sender] = message.data["signing_pk"]
        if message.kind == "abort":
            logger.info(f"group {self.group_id.hex()[:8]}: peer {message.sender} left: {message.data['reason']}")
            self._mark_dead(message.sender)
        self._inbox[slot] = message
        self._changed.set()
        return True

    def received(self, kind: str, sender: int, slot: int = 0) -> Message | None:
        """The message of ``kind`` from ``sender`` for ``slot`` (a part or an attempt), if it arrived."""
        return self._inbox.get((kind, sender, slot))

    async def collect(
        self, kind: str, senders: Iterable[int], timeout: float, slot: int = 0, need: int | None = None
    ) -> dict[int, Message]:
        """Wait until every live sender's message arrived (or ``need`` of them), or the timeout.

        Senders still silent at the timeout are marked dead.
        """
        senders = [j for j in senders if j != self.index]
        deadline = time.monotonic() + timeout
        while True:
            got = {j: self._inbox[(kind, j, slot)] for j in senders if (kind, j, slot) in self._inbox}
            waiting = [j for j in senders if j not in got and j not in self.dead]
            if not waiting or (need is not None and len(got) >= need) or self.closed:
                return got
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.dead.update(waiting)
                logger.info(f"group {self.group_id.hex()[:8]}: no {kind} from peers {waiting}")
                return got
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=min(remaining, 0.5))
            except TimeoutError:
                pass

    def close(self) -> None:
        """End the round: background sends stop, collectors return, later messages are refused."""
        for pending in self._background:
            pending.cancel()
        self.closed = True
        self._changed.set()


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _close_stream(opening: asyncio.Future[Any]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        opening.result()[2].close()

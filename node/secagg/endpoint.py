"""The receiving side of the masked all-reduce: one libp2p stream handler per averager.

``SecAggEndpoint`` reads a bounded header, checks it against the all-reduce it names (group,
round, sender, size, signature) before reading any payload, and answers ``[ok, reason]``.
Refusals are logged and counted; they never raise into the node. Peers enter a group a little
apart, so a message for a group not started here yet waits for it (bounded in time, per sender and
in total: waiting_room.py); one for a group that finished here is refused at once.

A message may wait only once what can be checked without its group is checked: its header size,
that a message without a payload kind carries none, and its signature by the sender's identity.
A keys message (the only kind an honest peer sends before we start: every other kind goes only to
peers whose keys it has received) carries its signing key and the binding of that key to the
stream's PeerID, so both are verified; any other kind waits only if its sender's signing key is
known here from an earlier verified keys message, and verifies under it. So an unsigned header,
or one signed for another PeerID, never takes a place in the queue.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
from typing import TYPE_CHECKING, Any

import numpy as np
from hivemind.p2p import P2P, PeerID

from dht.identity import verify_binding
from node.secagg.messages import (
    FINISHED,
    MAX_HEADER_BYTES,
    MAX_REASON,
    Message,
    MessageError,
    encode_reply,
    parse_header,
)
from node.secagg.waiting_room import WaitingRoom

if TYPE_CHECKING:
    from node.secagg.protocol import MaskedAllReduce

logger = logging.getLogger(__name__)

READ_CHUNK = 1 << 16  # bytes read from a stream at a time (small reads reuse memory)
_RECENT_GROUPS = 256  # finished groups remembered, so late messages are refused at once
_KNOWN_SIGNERS = 4096  # PeerID -> signing key pairs remembered from verified keys messages
_PAYLOAD_KINDS = ("part", "sum")  # the kinds that carry a payload


class SecAggEndpoint:
    """Receives masked all-reduce messages on one P2P and hands each to the all-reduce it names.

    Args:
        p2p: the libp2p client to serve on.
        name: the protocol name (per run).
        wait_for_group: seconds a message may wait for its group to start here (peers enter a
            group a little apart).
        max_waiting: messages that may wait at once, from everyone (bounds memory and streams).
        max_waiting_per_peer: messages one sender may have waiting.
        max_groups_per_peer: distinct not-yet-started groups one sender's waiting messages may name.
    """

    def __init__(
        self,
        p2p: P2P,
        name: str,
        wait_for_group: float = 10.0,
        max_waiting: int = 256,
        max_waiting_per_peer: int = 8,
        max_groups_per_peer: int = 4,
    ):
        self.p2p, self.name = p2p, name
        self.wait_for_group, self.max_waiting = wait_for_group, max_waiting
        self.sessions: dict[bytes, MaskedAllReduce] = {}  # running all-reduces by group id
        self.rejected = 0  # messages refused so far
        per_peer = min(max_waiting_per_peer, max_waiting)
        self.room = WaitingRoom(max_waiting, per_peer, min(max_groups_per_peer, per_peer))  # for unstarted groups
        self._finished: collections.deque[bytes] = collections.deque(maxlen=_RECENT_GROUPS)
        self._signers: collections.OrderedDict[str, bytes] = collections.OrderedDict()  # PeerID -> its signing key

    async def start(self) -> None:
        await self.p2p.add_binary_stream_handler(self.name, self._handle)

    def register(self, session: MaskedAllReduce) -> None:
        self.sessions[session.group_id] = session
        self.room.wake(session.group_id)

    def unregister(self, session: MaskedAllReduce) -> None:
        self.sessions.pop(session.group_id, None)
        self._finished.append(session.group_id)

    async def _session(self, message: Message, remote: PeerID, size: int) -> MaskedAllReduce:
        """The all-reduce ``message`` names; a message for a group not started here waits for it, bounded."""
        group_id = message.group
        if group_id in self.sessions:
            return self.sessions[group_id]
        if group_id in self._finished:
            raise MessageError(FINISHED)
        self._check_unqueued(message, remote, size)
        waiter = self.room.enter(str(remote), group_id)
        try:
            async with asyncio.timeout(self.wait_for_group):
                while group_id not in self.sessions:
                    if waiter.evicted:
                        raise MessageError(waiter.evicted)
                    if group_id in self._finished:  # it started and ended while we were not looking
                        raise MessageError(FINISHED)
                    waiter.wake.clear()
                    await waiter.wake.wait()
        except TimeoutError:
            raise MessageError("wrong group id: no such all-reduce here") from None
        finally:
            self.room.leave(waiter)
        return self.sessions[group_id]

    def _check_unqueued(self, message: Message, remote: PeerID, size: int) -> None:
        """What a message for a group not started here must pass before it may wait (module docstring)."""
        if size and message.kind not in _PAYLOAD_KINDS:
            raise MessageError(f"a {message.kind!r} message carries no payload")
        if message.kind == "keys":
            data = message.data
            if not verify_binding(str(remote), data["signing_pk"], data["binding"]):
                raise MessageError("its signing key is not bound to the stream's PeerID")
            message.verify(data["signing_pk"])
            return
        signing_key = self._signers.get(str(remote))
        if signing_key is None:
            raise MessageError(f"a {message.kind!r} message for a group not started here, from an unknown signer")
        message.verify(signing_key)

    def _remember_signer(self, remote: PeerID, signing_key: bytes) -> None:
        """Keep a signing key that a session verified as bound to ``remote`` (most recent last, bounded)."""
        self._signers[str(remote)] = signing_key
        self._signers.move_to_end(str(remote))
        while len(self._signers) > _KNOWN_SIGNERS:
            self._signers.popitem(last=False)

    async def _handle(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            ok, reason = await self._receive(info, reader)
            writer.write(encode_reply(ok, reason))
            await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError) as e:
            logger.debug(f"secure-aggregation stream from {info.peer_id} broke: {e!r}")
        finally:
            writer.close()

    async def _receive(self, info: Any, reader: asyncio.StreamReader) -> tuple[bool, str]:
        """Read, check and deliver one message; returns the reply (refusals are logged and counted)."""
        try:
            async with asyncio.timeout(self.wait_for_group):
                length = int.from_bytes(await reader.readexactly(4), "big")
                if length > MAX_HEADER_BYTES:
                    raise MessageError(f"oversized header: {length} bytes > {MAX_HEADER_BYTES}")
                message, size, digest = parse_header(await reader.readexactly(length))
            session = await self._session(message, info.peer_id, size)
            session.check_header(message, info.peer_id, size)
            if message.kind == "keys":
                self._remember_signer(info.peer_id, message.data["signing_pk"])
            if size:
                buffer = session.payload_buffer(message)
                async with asyncio.timeout(session.timeouts.data):
                    await _read_payload(reader, buffer, digest)
                message.payload = buffer
            session.deliver(message)
            return True, ""
        except MessageError as e:
            reason = str(e)[:MAX_REASON]
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            raise
        except Exception as e:  # a bug here must not take the node down; the sender sees a refusal
            logger.exception(f"error handling a secure-aggregation message from {info.peer_id}")
            reason = f"internal error: {e!r}"[:MAX_REASON]
        self.rejected += 1
        logger.warning(f"refused a secure-aggregation message from {info.peer_id}: {reason}")
        return False, reason


async def _read_payload(reader: asyncio.StreamReader, buffer: np.ndarray, digest: bytes) -> None:
    """Read exactly ``buffer.nbytes`` into ``buffer``, hashing as it arrives; check the signed digest."""
    view, hasher, filled = buffer.data.cast("B"), hashlib.sha256(), 0
    while filled < len(view):
        chunk = await reader.read(min(READ_CHUNK, len(view) - filled))
        if not chunk:
            raise asyncio.IncompleteReadError(b"", len(view) - filled)
        view[filled : filled + len(chunk)] = chunk
        hasher.update(chunk)
        filled += len(chunk)
    if hasher.digest() != digest:
        raise MessageError("payload does not match its signed digest")

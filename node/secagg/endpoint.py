"""The receiving side of the masked all-reduce: one libp2p stream handler per averager.

``SecAggEndpoint`` reads a bounded header, checks it against the all-reduce it names (group,
round, sender, size, signature) before reading any payload, and answers ``[ok, reason]``.
Refusals are logged and counted; they never raise into the node. Peers enter a group a little
apart, so a message for a group not started here yet waits for it (bounded in time and number);
one for a group that finished here is refused at once.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
from typing import TYPE_CHECKING, Any

import numpy as np
from hivemind.p2p import P2P

from node.secagg.messages import MAX_HEADER_BYTES, MAX_REASON, MessageError, encode_reply, parse_header

if TYPE_CHECKING:
    from node.secagg.protocol import MaskedAllReduce

logger = logging.getLogger(__name__)

READ_CHUNK = 1 << 16  # bytes read from a stream at a time (small reads reuse memory)
_RECENT_GROUPS = 256  # finished groups remembered, so late messages are refused at once


class SecAggEndpoint:
    """Receives masked all-reduce messages on one P2P and hands each to the all-reduce it names.

    Args:
        p2p: the libp2p client to serve on.
        name: the protocol name (per run).
        wait_for_group: seconds a message may wait for its group to start here (peers enter a
            group a little apart).
        max_waiting: messages that may wait at once; more are refused (bounds memory).
    """

    def __init__(self, p2p: P2P, name: str, wait_for_group: float = 10.0, max_waiting: int = 256):
        self.p2p, self.name = p2p, name
        self.wait_for_group, self.max_waiting = wait_for_group, max_waiting
        self.sessions: dict[bytes, MaskedAllReduce] = {}  # running all-reduces by group id
        self.rejected = 0  # messages refused so far
        self._finished: collections.deque[bytes] = collections.deque(maxlen=_RECENT_GROUPS)
        self._registered = asyncio.Event()  # replaced on each register, to wake waiting messages
        self._waiting = 0  # messages now waiting for their group

    async def start(self) -> None:
        await self.p2p.add_binary_stream_handler(self.name, self._handle)

    def register(self, session: MaskedAllReduce) -> None:
        self.sessions[session.group_id] = session
        self._registered.set()
        self._registered = asyncio.Event()

    def unregister(self, session: MaskedAllReduce) -> None:
        self.sessions.pop(session.group_id, None)
        self._finished.append(session.group_id)

    async def _session(self, group_id: bytes) -> MaskedAllReduce:
        if group_id not in self.sessions and self._waiting >= self.max_waiting:
            raise MessageError("too many messages waiting for their group")
        self._waiting += 1
        try:
            async with asyncio.timeout(self.wait_for_group):
                while group_id not in self.sessions:
                    if group_id in self._finished:
                        raise MessageError("that all-reduce has finished here")
                    await self._registered.wait()
        except TimeoutError:
            raise MessageError("wrong group id: no such all-reduce here") from None
        finally:
            self._waiting -= 1
        return self.sessions[group_id]

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
            session = await self._session(message.group)
            session.check_header(message, info.peer_id, size)
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

"""Stage calls over libp2p: a background event loop holding a P2P replica, and one request/reply call.

Calls are hivemind unary protobuf requests (one message each way over the daemon's persistent
connection, so no stream is left half-open when a call times out); the bytes inside are the
msgpack messages of ``messages.py``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import hivemind
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from node.sharding.messages import StageReply, StageRequest

T = TypeVar("T")


def stage_handler_name(run_id: str) -> str:
    """The libp2p protocol name stage servers of ``run_id`` answer on."""
    return f"zen.{run_id}.stage"


class P2PLoop:
    """An asyncio loop in a daemon thread, with a P2P replica of ``dht``'s daemon living on it."""

    def __init__(self, dht: hivemind.DHT, name: str):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()
        self.p2p: P2P = self.run(dht.replicate_p2p(), timeout=30)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop from another thread and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def shutdown(self) -> None:
        if not self.loop.is_running():
            return
        try:
            self.run(self._close(), timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            self.loop.close()

    async def _close(self) -> None:
        await self.p2p.shutdown()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def call_stage(p2p: P2P, peer_id: str, name: str, request: StageRequest, timeout: float) -> StageReply:
    """Send one request and decode the reply.

    Raises:
        asyncio.TimeoutError: no reply within ``timeout`` seconds.
        StageMessageError: the reply is malformed.
        Exception: the daemon could not reach the peer (hivemind's P2P errors).
    """
    message = runtime_pb2.ExpertRequest(uid="", metadata=request.encode())
    response = await asyncio.wait_for(
        p2p.call_protobuf_handler(PeerID.from_base58(peer_id), name, message, runtime_pb2.ExpertResponse),
        timeout,
    )
    return StageReply.decode(response.metadata)

"""Stage calls over libp2p: one request/reply call (the event loop holding a P2P replica is node/runtime.py's).

Calls are hivemind unary protobuf requests (one message each way over the daemon's persistent
connection, so no stream is left half-open when a call times out); the bytes inside are the
msgpack messages of ``messages.py``.
"""

from __future__ import annotations

import asyncio

from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from node.runtime import P2PLoop
from node.sharding.messages import StageReply, StageRequest

__all__ = ["P2PLoop", "call_stage", "stage_handler_name"]


def stage_handler_name(run_id: str) -> str:
    """The libp2p protocol name stage servers of ``run_id`` answer on."""
    return f"zen.{run_id}.stage"


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

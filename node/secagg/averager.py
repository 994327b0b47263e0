"""The secure averager: hivemind's matchmaking and process model, our masked all-reduce.

``SecureAverager`` is a hivemind ``DecentralizedAverager`` (its own process, shared-memory
tensors, matchmaking on the DHT, step control, retries) whose all-reduce is replaced: where
hivemind would run its float butterfly ``AllReduceRunner``, it runs ``MaskedAllReduce`` over the
group that matchmaking formed. Part sizes come from hivemind's ``load_balance_peers`` over the
bandwidths the peers announced, so faster peers reduce larger parts.

``SecAggEndpoint`` is the receiving side: one libp2p stream handler per averager that reads a
bounded header, checks it against the all-reduce it names (group, round, sender, size,
signature) before reading any payload, and answers ``[ok, reason]``. Refusals are logged and
counted; they never raise into the node.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import math
import multiprocessing as mp
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import hivemind
import msgpack
import numpy as np
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllreduceException, AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.load_balancing import load_balance_peers
from hivemind.averaging.matchmaking import Matchmaking, PotentialLeaders
from hivemind.p2p import P2P
from hivemind.utils import enter_asynchronously

from node.config import CompressionConfig
from node.secagg.messages import MAX_HEADER_BYTES, MessageError, parse_header
from node.secagg.privacy import NoiseShare
from node.secagg.protocol import MaskedAllReduce, SecAggError, SecAggIdentity, SecAggTimeouts, Workspace

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
        self.sessions: dict[bytes, MaskedAllReduce] = {}
        self.rejected = 0
        self._finished: collections.deque[bytes] = collections.deque(maxlen=_RECENT_GROUPS)
        self._registered = asyncio.Event()
        self._waiting = 0

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
            reply = msgpack.packb([ok, reason])
            writer.write(len(reply).to_bytes(4, "big") + reply)
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
            reason = str(e)[:200]
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            raise
        except Exception as e:  # a bug here must not take the node down; the sender sees a refusal
            logger.exception(f"error handling a secure-aggregation message from {info.peer_id}")
            reason = f"internal error: {e!r}"[:200]
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


LEADER_POLL_INTERVAL = 0.25  # seconds between a searching peer's DHT reads of its group key, at first
LEADER_POLL_MAX = 2.0  # ... growing by half each read that finds nothing new, up to this (and matchmaking_time / 4)


class _PacedKeys:
    """A GroupKeyManager whose ``get_averagers`` is paced: 0.25 s apart, backing off to 2 s while the
    averagers it returns stay the same (a new one resets the pace)."""

    def __init__(self, keys: Any, interval: float, longest: float):
        self._keys, self._shortest, self._longest = keys, interval, longest
        self._interval, self._last = interval, -math.inf
        self._seen: frozenset[Any] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._keys, name)

    async def get_averagers(self, *args: Any, **kwargs: Any) -> Any:
        wait = self._last + self._interval - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        self._last = time.monotonic()
        found = await self._keys.get_averagers(*args, **kwargs)
        seen = frozenset(peer for peer, _ in found)
        changed, self._seen = seen != self._seen, seen
        self._interval = self._shortest if changed else min(self._longest, self._interval * 1.5)
        return found


class _PacedLeaders(PotentialLeaders):
    """hivemind's leader search with its DHT polling paced.

    A peer that would lead (or sees no leader yet) asks for a fresh read of its group key after
    every read, so hivemind 1.1.12 re-reads it back to back for the whole matchmaking time:
    about 450 KB sent per peer per round in a group of 4 on 127.0.0.1, measured, 15x the masked
    all-reduce of a 120k-parameter model. Followers join by RPC, so a leader polling a few times
    a second still forms the same groups; with the overlapped outer loop a peer may wait for the
    others' launch for many seconds, so the pace backs off while nothing changes.
    """

    async def _update_queue_periodically(self, key_manager: Any) -> None:
        # a leader's declaration lives for about min_matchmaking_time: poll several times within it
        longest = min(LEADER_POLL_MAX, self.min_matchmaking_time / 4)
        paced = _PacedKeys(key_manager, min(LEADER_POLL_INTERVAL, longest), longest)
        await super()._update_queue_periodically(paced)


class SecureAverager(DecentralizedAverager):
    """A DecentralizedAverager whose all-reduce is the masked one (see the module docstring).

    Args:
        averaged_tensors, dht, **kwargs: as for ``DecentralizedAverager``.
        identity: signs this peer's protocol messages.
        clip_bound: the run-wide bound B on every coordinate of an update.
        weight_bound: the largest weight a peer may bring (its weight is scaled into (0, 1]).
        timeouts: per-phase waits of the masked all-reduce.
        noise: this node's share of differential-privacy noise per round (None: no DP).
        compression: low-bit words and random-k inside the ring (None: full 32-bit words). With
            error feedback on, ``residual`` (shared memory, flat float32) holds what was not sent.
    """

    def __init__(
        self,
        averaged_tensors: Sequence[torch.Tensor],
        dht: hivemind.DHT,
        *,
        identity: SecAggIdentity,
        clip_bound: float,
        weight_bound: float,
        timeouts: SecAggTimeouts,
        noise: NoiseShare | None = None,
        compression: CompressionConfig | None = None,
        **kwargs: Any,
    ):
        if kwargs.get("client_mode"):
            raise ValueError("secure aggregation needs every peer to reduce a part; client mode is not supported")
        self._signer, self._clip_bound, self._weight_bound = identity, clip_bound, weight_bound
        self._secagg_timeouts, self._noise = timeouts, noise
        self._endpoint: SecAggEndpoint | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._workspace = Workspace()
        self.bytes_sent = mp.Value("d", 0.0)  # shared with the averager process
        self._compression = compression or CompressionConfig()
        size = sum(t.numel() for t in averaged_tensors)
        keep = self._compression.active and self._compression.error_feedback
        self.residual = torch.zeros(size if keep else 0, dtype=torch.float32).share_memory_()
        super().__init__(averaged_tensors, dht, **kwargs)

    @property
    def _matchmaking(self) -> Matchmaking:
        return self.__dict__["_paced_matchmaking"]

    @_matchmaking.setter
    def _matchmaking(self, matchmaking: Matchmaking) -> None:
        # hivemind assigns its Matchmaking here when the averager starts: pace its leader search
        matchmaking.potential_leaders.__class__ = _PacedLeaders
        self.__dict__["_paced_matchmaking"] = matchmaking

    async def add_p2p_handlers(self, p2p: P2P, *args: Any, **kwargs: Any) -> None:
        await super().add_p2p_handlers(p2p, *args, **kwargs)
        self._endpoint = SecAggEndpoint(p2p, f"{self.prefix}.secagg")
        await self._endpoint.start()

    async def _aggregate_with_group(self, group_info: GroupInfo, min_vector_size: int, **kwargs: Any) -> Any:
        session = None
        try:
            bandwidths, mode_ids, user_bytes = zip(*map(self.serializer.loads, group_info.gathered), strict=True)
            gathered = dict(zip(group_info.peer_ids, map(self.serializer.loads, user_bytes), strict=True))
            if any(mode != AveragingMode.NODE.value for mode in mode_ids):
                raise SecAggError("a peer in the group runs in client or aux mode; secure aggregation needs reducers")
            rounds = {data.get("round") if isinstance(data, dict) else None for data in gathered.values()}
            round_no = next(iter(rounds))
            if len(rounds) != 1 or not isinstance(round_no, int):
                raise SecAggError(f"the group mixes rounds {sorted(map(str, rounds))}")
            loop = asyncio.get_running_loop()
            sizes = await loop.run_in_executor(
                None,
                load_balance_peers,
                self._compression.count(self.total_size) + 1,
                list(bandwidths),
                min_vector_size,
            )
            weight = float(kwargs["weight"])
            if weight > self._weight_bound:
                logger.warning(f"weight {weight} exceeds the run's bound {self._weight_bound}; it counts as the bound")
            omega = min(1.0, weight / self._weight_bound)
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="secagg")
            async with enter_asynchronously(self.get_tensors()) as tensors:
                vector = self._workspace.array("flat", self.total_size, np.float32)
                offset = 0
                for tensor in tensors:
                    np.copyto(vector[offset : offset + tensor.numel()], tensor.reshape(-1).numpy())
                    offset += tensor.numel()
                session = MaskedAllReduce(
                    p2p=self._p2p,
                    handler_name=f"{self.prefix}.secagg",
                    group_id=group_info.group_id,
                    peer_ids=list(group_info.peer_ids),
                    index=group_info.peer_ids.index(self.peer_id),
                    round_no=round_no,
                    identity=self._signer,
                    vector=vector,
                    omega=omega,
                    part_sizes=[int(s) for s in sizes],
                    bound=self._clip_bound,
                    timeouts=self._secagg_timeouts,
                    executor=self._executor,
                    out=vector,
                    workspace=self._workspace,
                    noise=self._noise,
                    compression=self._compression,
                    residual=self.residual.numpy() if self.residual.numel() else None,
                    adaptive_bound=self._compression.bits < 32 and self._noise is None,
                )
                self._running_groups[group_info.group_id].set_result(session)
                assert self._endpoint is not None, "the endpoint starts with the averager"
                self._endpoint.register(session)
                result = await session.run()
                offset = 0
                for tensor in tensors:
                    np.copyto(tensor.reshape(-1).numpy(), result.mean[offset : offset + tensor.numel()])
                    offset += tensor.numel()
            return {group_info.peer_ids[j]: gathered[group_info.peer_ids[j]] for j in result.contributors}
        except SecAggError as e:
            logger.warning(str(e))
            raise AllreduceException(str(e)) from e
        finally:
            if session is not None:
                if self._endpoint is not None:
                    self._endpoint.unregister(session)
                with self.bytes_sent.get_lock():
                    self.bytes_sent.value += session.stats["bytes_sent"]
                logger.info(
                    f"secure all-reduce: {session.stats['bytes_sent']} bytes sent; phases {session.stats['phases']}"
                )

"""The secure averager: hivemind's matchmaking and process model, our masked all-reduce.

``SecureAverager`` is a hivemind ``DecentralizedAverager`` (its own process, shared-memory
tensors, matchmaking on the DHT, step control, retries) whose all-reduce is replaced: where
hivemind would run its float butterfly ``AllReduceRunner``, it runs ``MaskedAllReduce`` over the
group that matchmaking formed. Part sizes come from hivemind's ``load_balance_peers`` over the
bandwidths the peers announced, so faster peers reduce larger parts.

Each averager serves one ``SecAggEndpoint`` (endpoint.py), the receiving side of the all-reduce's
streams; each group's ``MaskedAllReduce`` registers with it while it runs. A group that averaged
a round runs the next one without matchmaking, up to ``group_rounds`` rounds (kept_group.py).

A round's result leaves the averager's process with the group's consistency certificate (the t+
signatures on U with the digest's inputs, consistency.py ``group_certificate``; at most
``MAX_CERTIFICATE_BYTES``), which the contribution ledger's receipt carries.
"""

from __future__ import annotations

import asyncio
import logging
import math
import multiprocessing as mp
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import hivemind
import numpy as np
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllreduceException, AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.load_balancing import load_balance_peers
from hivemind.averaging.matchmaking import Matchmaking, PotentialLeaders
from hivemind.p2p import P2P, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import enter_asynchronously

from node.config import CompressionConfig
from node.secagg.declared import DeclaredFormation
from node.secagg.endpoint import SecAggEndpoint
from node.secagg.formation import GROUP_TARGET, SITTING_OUT, span_patience
from node.secagg.kept_group import KeptGroup, gathered_data, gathered_round, key_fingerprint, round_group_id
from node.secagg.parts import Workspace
from node.secagg.privacy import NoiseShare
from node.secagg.protocol import MaskedAllReduce
from node.secagg.state import (
    MAX_REFUSAL,
    REFUSED,
    REFUSED_GROUP,
    SAT_OUT,
    SecAggError,
    SecAggIdentity,
    SecAggTimeouts,
    SumRefused,
)
from node.secagg.suspicion import asks_split

logger = logging.getLogger(__name__)

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


class _GatedMatchmaking(Matchmaking):
    """hivemind's matchmaking, where the run's allowlist decides who may share a group: a leader
    refuses followers outside it, and a follower never asks a leader outside it to lead it."""

    allowed: frozenset[PeerID]  # set on the instance when its class is swapped for this one

    def _check_reasons_to_reject(self, request: Any, context: Any) -> Any:
        if context.remote_id not in self.allowed:
            logger.warning(f"refused {context.remote_id} as a follower: not in aggregation.allowlist")
            return averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
        return super()._check_reasons_to_reject(request, context)

    async def _request_join_group(self, leader: PeerID) -> GroupInfo | None:
        if leader not in self.allowed:
            logger.debug(f"not asking {leader} to lead us: not in aggregation.allowlist")
            return None
        return await super()._request_join_group(leader)


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
        group_rounds: rounds a matched group runs before matching again (kept_group.py); 1: every round.
        allowlist: the PeerIDs that may share a group with this peer (itself included); empty: anyone.
        formation: "matchmaking" (hivemind's: a leader gathers followers) or "declared" (formation.py: a
            partition of the declared peers under a seed that nobody chose).
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
        group_rounds: int = 1,
        allowlist: Iterable[PeerID] = (),
        formation: str = "matchmaking",
        **kwargs: Any,
    ):
        if kwargs.get("client_mode"):
            raise ValueError("secure aggregation needs every peer to reduce a part; client mode is not supported")
        self._signer, self._clip_bound, self._weight_bound = identity, clip_bound, weight_bound
        self._secagg_timeouts, self._noise = timeouts, noise
        self._endpoint: SecAggEndpoint | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._workspace = Workspace()
        self._group_rounds, self._formation = group_rounds, formation
        self._allowed = frozenset(allowlist)
        self._kept: KeptGroup | None = None  # the group that may run the next round unmatched (in the averager process)
        self._declared_formation: DeclaredFormation | None = None  # set with the matchmaking, in that process
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
        # hivemind assigns its Matchmaking here when the averager starts: pace its leader search, and
        # let a kept group's next round skip it
        matchmaking.potential_leaders.__class__ = _PacedLeaders
        if self._allowed:
            matchmaking.__class__ = _GatedMatchmaking
            matchmaking.allowed = self._allowed
        match = matchmaking.look_for_group
        declared = self._declared(matchmaking) if self._formation == "declared" else None
        self._declared_formation = declared

        async def look_for_group(step: Any) -> GroupInfo | None:
            group = self._kept_round(step.data_for_gather)
            if group is not None:
                return group
            return await declared.form(step.data_for_gather) if declared is not None else await match(step)

        matchmaking.look_for_group = look_for_group
        self.__dict__["_paced_matchmaking"] = matchmaking

    def _declared(self, matchmaking: Matchmaking) -> DeclaredFormation:
        """Declared group formation in place of ``matchmaking``'s leaders (formation.py); it never runs theirs."""
        return DeclaredFormation(
            dht=self.dht,
            prefix=self.prefix,
            peer_id=matchmaking.peer_id,
            identity=self._signer,
            window=matchmaking.min_matchmaking_time,
            min_size=matchmaking.min_group_size,
            target=GROUP_TARGET,
            allowed=self._allowed,
            serializer=self.serializer,
            patience=span_patience(matchmaking.min_matchmaking_time, self._secagg_timeouts.data),
        )

    def _kept_round(self, data_for_gather: bytes) -> GroupInfo | None:
        """The kept group's next round for the round this step gathers, or None (then matchmaking)."""
        kept, round_no = self._kept, gathered_round(data_for_gather, self.serializer)
        if kept is None or round_no is None:
            return None
        split = asks_split(gathered_data(data_for_gather, self.serializer))
        group = kept.next_round(round_no, self._group_rounds, self.serializer, split)
        if group is None:
            self._kept = None
            logger.info(f"group {kept.origin.group_id.hex()[:8]} ends after {kept.uses} round(s); matching again")
        return group

    def _keep(self, kept: KeptGroup | None, group_info: GroupInfo, round_no: int, contributors: int) -> int:
        """Keep the group after a round all of it contributed to; returns the rounds it has averaged."""
        resumed = kept is not None and group_info.group_id == round_group_id(kept.origin.group_id, round_no)
        uses = kept.uses + 1 if kept is not None and resumed else 1
        origin = kept.origin if kept is not None and resumed else group_info
        whole = contributors == len(group_info.peer_ids)
        split = self._declared_formation is not None and origin.group_id in self._declared_formation.split_groups
        self._kept = KeptGroup(origin, round_no, uses) if whole and not split and self._group_rounds > 1 else None
        return uses

    async def add_p2p_handlers(self, p2p: P2P, *args: Any, **kwargs: Any) -> None:
        await super().add_p2p_handlers(p2p, *args, **kwargs)
        self._endpoint = SecAggEndpoint(p2p, f"{self.prefix}.secagg")
        await self._endpoint.start()

    async def _aggregate_with_group(self, group_info: GroupInfo, min_vector_size: int, **kwargs: Any) -> Any:
        session, kept, self._kept = None, self._kept, None  # any failure ends a kept group
        if group_info.group_id == SITTING_OUT:  # declared formation left us out of a split slot's one group
            return {SAT_OUT: 1}
        try:
            bandwidths, mode_ids, user_bytes = zip(*map(self.serializer.loads, group_info.gathered), strict=True)
            gathered = dict(zip(group_info.peer_ids, map(self.serializer.loads, user_bytes), strict=True))
            outsiders = [str(peer) for peer in group_info.peer_ids if self._allowed and peer not in self._allowed]
            if outsiders:
                raise SecAggError(f"the group holds peers outside aggregation.allowlist: {', '.join(outsiders)}")
            if any(mode != AveragingMode.NODE.value for mode in mode_ids):
                raise SecAggError("a peer in the group runs in client or aux mode; secure aggregation needs reducers")
            round_no = _common_round(gathered.values())
            sizes = await asyncio.get_running_loop().run_in_executor(
                None,
                load_balance_peers,
                self._compression.count(self.total_size) + 1,
                list(bandwidths),
                min_vector_size,
            )
            omega = self._omega(float(kwargs["weight"]))
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="secagg")
            async with enter_asynchronously(self.get_tensors()) as tensors:
                vector = self._workspace.array("flat", self.total_size, np.float32)
                _flatten_into(vector, tensors)
                session = self._session(group_info, round_no, vector, omega, [int(s) for s in sizes])
                self._running_groups[group_info.group_id].set_result(session)
                assert self._endpoint is not None, "the endpoint starts with the averager"
                self._endpoint.register(session)
                result = await session.run()
                _unflatten_from(result.mean, tensors)
            uses = self._keep(kept, group_info, round_no, len(result.contributors))
            certificate = session.agreement.group_certificate()  # the t+ signatures on U, for the ledger's receipt
            about = {
                "group": group_info.group_id.hex(),
                "group_round": uses - 1,
                "certificate": b"" if certificate is None else certificate.encode(),
            }
            keys = session.agreement.keys  # each contributor's verified round keys, as received
            return {
                group_info.peer_ids[j]: {**gathered[group_info.peer_ids[j]], **about, "keys": key_fingerprint(keys[j])}
                for j in result.contributors
            }
        except SumRefused as e:  # not retried: the step ends with the refusal (``refusal_of``)
            logger.warning(f"{e}; the round ends for this group")
            return {REFUSED: str(e)[:MAX_REFUSAL], REFUSED_GROUP: [str(peer) for peer in group_info.peer_ids]}
        except SecAggError as e:
            logger.warning(str(e))
            raise AllreduceException(str(e)) from e
        finally:
            if session is not None:
                self._finish(session)

    def _omega(self, weight: float) -> float:
        """This peer's weight scaled into (0, 1] by the run's weight bound (a larger one counts as the bound)."""
        if weight > self._weight_bound:
            logger.warning(f"weight {weight} exceeds the run's bound {self._weight_bound}; it counts as the bound")
        return min(1.0, weight / self._weight_bound)

    def _session(
        self, group_info: GroupInfo, round_no: int, vector: np.ndarray, omega: float, part_sizes: list[int]
    ) -> MaskedAllReduce:
        """This peer's masked all-reduce in the group matchmaking formed; the mean is written over ``vector``."""
        return MaskedAllReduce(
            p2p=self._p2p,
            handler_name=f"{self.prefix}.secagg",
            group_id=group_info.group_id,
            peer_ids=list(group_info.peer_ids),
            index=group_info.peer_ids.index(self.peer_id),
            round_no=round_no,
            identity=self._signer,
            vector=vector,
            omega=omega,
            part_sizes=part_sizes,
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

    def _finish(self, session: MaskedAllReduce) -> None:
        """Stop routing the group's messages to ``session``; count and log what it sent."""
        if self._endpoint is not None:
            self._endpoint.unregister(session)
        with self.bytes_sent.get_lock():
            self.bytes_sent.value += session.stats["bytes_sent"]
        stats = session.stats
        logger.info(
            f"secure all-reduce: {stats['bytes_sent']} bytes sent in {stats['messages_sent']} messages "
            f"(vector {stats['payload_bytes']}; by kind {stats['bytes_by_kind']}); phases {stats['phases']}"
        )


def _common_round(gathered: Iterable[Any]) -> int:
    """The outer round every member of the group announced; SecAggError if they differ."""
    rounds = {data.get("round") if isinstance(data, dict) else None for data in gathered}
    round_no = next(iter(rounds))
    if len(rounds) != 1 or not isinstance(round_no, int):
        raise SecAggError(f"the group mixes rounds {sorted(map(str, rounds))}")
    return round_no


def _flatten_into(vector: np.ndarray, tensors: Sequence[torch.Tensor]) -> None:
    """Copy the averaged tensors, in order, into one flat float32 vector."""
    offset = 0
    for tensor in tensors:
        np.copyto(vector[offset : offset + tensor.numel()], tensor.reshape(-1).numpy())
        offset += tensor.numel()


def _unflatten_from(vector: np.ndarray, tensors: Sequence[torch.Tensor]) -> None:
    """Copy a flat vector back into the averaged tensors, in order."""
    offset = 0
    for tensor in tensors:
        np.copyto(tensor.reshape(-1).numpy(), vector[offset : offset + tensor.numel()])
        offset += tensor.numel()

"""Late joiners download the run's current state from peers instead of starting from scratch.

A ``StateSharer`` is a hivemind ``DecentralizedAverager`` used only for its state-download RPC
(``load_state_from_peers``): it never averages. Peers declare themselves as donors with their
round as priority, so a joiner downloads from the most advanced peer. What arrives is checked
before use: the metadata is a small msgpack map (hivemind's MSGPackSerializer; no pickle), and
the tensors must match the local model's count, shapes and dtypes and be finite. Anything else
is rejected and logged, and the node starts from its own state. ``wait_for_peer_ahead`` waits
for a live peer that has finished a later round (a node that missed its group resyncs from it), for
``ahead_wait`` seconds: as long as a group that formed without us takes to finish its round, not the
whole aggregation timeout (when every member failed the same round, nobody is ahead to wait for).

Verified downloads: a donor's priority and round are its own say, so a Sybil could claim a huge
round and serve anything. A trainer therefore checks a state against the run's signed records
(``RecordVerifier``): more than half of the run's live trainer records (other than its own) must
sign the state's round, with the very ``state_digest`` of its parameters (secure rounds leave every
member's parameters bit-identical, so honest digests agree). A round beyond what they show, or a
digest they do not sign, is refused; the donor is logged and skipped, and the next donor by
priority is asked, up to ``MAX_DONORS``. A download is also cut off past ``max_bytes``. With
``[run.cohorts]`` the shared state holds zeros for local parameters, so no record signs its digest:
there only the round is checked. A majority of Sybil records can still pass a state (an allowlist
closes that); a minority can only delay a joiner.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import hivemind
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.compression import deserialize_torch_tensor
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import MPFuture
from hivemind.utils.asyncio import aiter_with_timeout
from hivemind.utils.streaming import combine_from_streaming
from hivemind.utils.timed_storage import ValueWithExpiration

from dht import PeerRecord, connect_to_peers
from node.config import AggregationConfig
from node.runtime import NodeRuntime
from node.training.outer import state_digest

logger = logging.getLogger(__name__)

DOWNLOAD_ATTEMPTS = 4
ANNOUNCE_GAP = 5.0  # seconds between two declarations of a new round (see ``StateSharer.announce``)
MAX_DONORS = 8  # donors one download asks, best priority first, before it gives up
Download = tuple[str, Any, list[torch.Tensor], str]  # donor PeerID, metadata, tensors, error ("" if none)


@dataclass(frozen=True)
class SharedState:
    """A downloaded, checked state."""

    round: int  # the outer round the donor had completed
    run_hash: str  # the donor's run config hash
    tensors: list[torch.Tensor]  # global parameters, then outer optimizer buffers


StateProvider = Callable[[], tuple[dict[str, Any], Sequence[torch.Tensor]]]


class _StateAverager(DecentralizedAverager):
    def __init__(self, provider: StateProvider, **kwargs: Any):
        self._provider = provider
        super().__init__([torch.zeros(1)], **kwargs)

    def get_current_state(self):
        metadata, tensors = self._provider()
        return metadata, [t.detach().cpu() for t in tensors], None

    def download_from(
        self, skip: Collection[str], max_bytes: int, timeout: float, only: Collection[str] | None = None
    ) -> Download | None:
        """The state of the donor with the best priority outside ``skip`` (and in ``only``, if given); None if
        there is none left."""
        future: MPFuture = MPFuture()
        only_ = None if only is None else tuple(only)
        options = dict(future=future, skip=tuple(skip), max_bytes=max_bytes, timeout=timeout, only=only_)
        self._outer_pipe.send(("_download_one", [], options))
        return future.result(timeout=timeout + 30)

    async def _download_one(
        self, future: MPFuture, skip: tuple[str, ...], max_bytes: int, timeout: float, only: tuple[str, ...] | None
    ) -> None:
        """In the averager's process: ``download_from`` (hivemind's ``_load_state_from_peers``, one donor, bounded)."""
        donor = ""
        try:
            prefix = self._matchmaking.group_key_manager.prefix
            entries, _ = self.dht.get(f"{prefix}.all_averagers", latest=True) or ({}, None)
            ranked = sorted(
                (float(info.value), random.random(), PeerID(key))
                for key, info in (entries.items() if isinstance(entries, dict) else ())
                if isinstance(info, ValueWithExpiration) and isinstance(info.value, float | int)
            )
            peers = [
                p
                for _, _, p in reversed(ranked)
                if p != self.peer_id and str(p) not in skip and (only is None or str(p) in only)
            ]
            if not peers:
                return
            donor = str(peers[0])
            stub = self.get_stub(self._p2p, peers[0], namespace=self.prefix)
            stream = await stub.rpc_download_state(averaging_pb2.DownloadRequest())
            metadata, size = None, 0
            parts: list[Any] = []
            tensors: list[torch.Tensor] = []
            async for message in aiter_with_timeout(stream, timeout=timeout):
                size += len(message.metadata) + len(message.tensor_part.buffer)
                if size > max_bytes:
                    raise ValueError(f"it sent over {max_bytes} bytes")
                if message.metadata:
                    metadata = self.serializer.loads(message.metadata)
                if message.tensor_part.dtype and parts:  # a new tensor starts
                    tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
                    parts = []
                parts.append(message.tensor_part)
            if parts:
                tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
            future.set_result((donor, metadata, tensors, ""))
        except Exception as e:  # a donor's failure is its own: the caller skips it
            future.set_result((donor, None, [], f"download failed: {e!r}"[:400]) if donor else None)
        finally:
            if not future.done():
                future.set_result(None)


class StateSharer:
    """Serve this node's state to joiners, and download the swarm's state when joining.

    Args:
        dht: the node's running DHT.
        run_id: the run.
        provider: returns ``({"round": int, "run_hash": str}, tensors)`` for a joiner; called in this process.
        client_mode: a client-mode node downloads but does not serve.
        verify: raises ValueError for a downloaded state the run's records do not vouch for (``RecordVerifier``);
            None: no such check.
    """

    def __init__(
        self,
        dht: hivemind.DHT,
        run_id: str,
        provider: StateProvider,
        client_mode: bool = False,
        verify: Callable[[SharedState], None] | None = None,
    ):
        self._averager = _StateAverager(
            provider,
            dht=dht,
            start=True,
            prefix=f"zen_{run_id}_state",
            client_mode=client_mode,
            allow_state_sharing=False,
            declare_state_period=10,
            next_chunk_timeout=30,
            shutdown_timeout=2,
        )
        self.client_mode = client_mode
        self._verify = verify
        self._announced = -math.inf  # monotonic time of the last declaration we triggered

    def announce(self, round_no: int) -> None:
        """Offer our state to joiners, preferred in proportion to how far along we are.

        Each change of priority makes hivemind store a declaration in the DHT; rounds may come several
        a second, so a new round is declared at most every ``ANNOUNCE_GAP`` seconds (a joiner may see
        a donor's round that much behind)."""
        if self.client_mode or time.monotonic() - self._announced < ANNOUNCE_GAP:
            return
        self._announced = time.monotonic()
        self._averager.state_sharing_priority = float(round_no)
        self._averager.allow_state_sharing = True

    def download(
        self,
        templates: Sequence[torch.Tensor],
        run_hash: str,
        timeout: float = 60.0,
        donors: Collection[str] | None = None,
    ) -> SharedState | None:
        """Download and check the most advanced donor's state (of ``donors``, if given: a cohort's members),
        skipping donors whose state is refused; None if no donor (of the best ``MAX_DONORS``) offers a usable one."""
        max_bytes = 2 * sum(t.numel() * t.element_size() for t in templates) + 2**20  # framing and metadata
        refused: set[str] = set()
        for _ in range(MAX_DONORS):
            result = self._averager.download_from(refused, max_bytes, timeout, donors)
            if result is None:
                return None
            donor, metadata, tensors, error = result
            try:
                if error:
                    raise ValueError(error)
                state = check_state(metadata, tensors, templates, run_hash)
                if self._verify is not None:
                    self._verify(state)
                return state
            except ValueError as e:
                logger.warning(f"refused the state of donor {donor}: {e}; skipping it")
                refused.add(donor)
        return None

    def download_retrying(
        self,
        templates: Sequence[torch.Tensor],
        run_hash: str,
        stop_event: threading.Event,
        donors: Collection[str] | None = None,
    ) -> SharedState | None:
        """``download``, tried up to ``DOWNLOAD_ATTEMPTS`` times (waiting 2, 4, 8 s between) until ``stop_event``."""
        state = None
        for attempt in range(DOWNLOAD_ATTEMPTS):
            # A fresh peer's first dials can fail (libp2p then backs off for a few seconds): retry.
            state = self.download(templates, run_hash, donors=donors)
            if state is not None or stop_event.wait(2.0 * 2**attempt):
                break
        return state

    def shutdown(self) -> None:
        self._averager.shutdown()


def ahead_wait(config: AggregationConfig, longest_round: float) -> float:
    """Seconds a node that missed a round waits for a peer to finish it: matchmaking, a message timeout
    and twice the slowest round it has merged (``longest_round``; 0 before any), at most ``config.timeout``."""
    return min(config.timeout, config.matchmaking_time + config.message_timeout + 2 * longest_round)


def wait_for_peer_ahead(
    runtime: NodeRuntime,
    round_no: int,
    timeout: float,
    stop_event: threading.Event,
    among: Collection[str] | None = None,
) -> bool:
    """Wait up to ``timeout`` s until a live peer (of ``among``, if given) has finished a later round than
    ``round_no``; connect to it."""
    deadline = time.monotonic() + timeout
    while not stop_event.is_set() and time.monotonic() < deadline:
        ahead = [p for p in runtime.peers() if p.round > round_no and (among is None or p.peer_id in among)]
        if ahead:
            connect_to_peers(runtime.dht, ahead)
            return True
        stop_event.wait(1.0)
    return False


def check_state(
    metadata: Any, tensors: Sequence[torch.Tensor], templates: Sequence[torch.Tensor], run_hash: str
) -> SharedState:
    """Validate a downloaded state against the local model; raise ValueError naming the problem."""
    if not isinstance(metadata, dict) or set(metadata) != {"round", "run_hash"}:
        raise ValueError("metadata must be a map with exactly 'round' and 'run_hash'")
    round_no, their_hash = metadata["round"], metadata["run_hash"]
    if not isinstance(round_no, int) or isinstance(round_no, bool) or not 0 <= round_no < 2**40:
        raise ValueError(f"round {round_no!r} is not a valid round number")
    if their_hash != run_hash:
        raise ValueError(f"donor's run hash {their_hash!r} differs from ours {run_hash!r}")
    if len(tensors) != len(templates):
        raise ValueError(f"expected {len(templates)} tensors, got {len(tensors)}")
    for i, (tensor, template) in enumerate(zip(tensors, templates, strict=True)):
        if tensor.shape != template.shape or tensor.dtype != template.dtype:
            raise ValueError(f"tensor {i} is {tuple(tensor.shape)} {tensor.dtype}, expected {tuple(template.shape)}")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"tensor {i} holds non-finite values")
    return SharedState(round=round_no, run_hash=their_hash, tensors=list(tensors))


@dataclass(frozen=True)
class RecordVerifier:
    """Vouches for a downloaded state only if more than half of the run's trainer records sign it.

    Args:
        records: the run's live, verified peer records (``NodeRuntime.peers``).
        run_hash: our run's config hash; records of other runs do not count.
        own_peer_id: this node, whose own record does not count.
        params: how many tensors at the head of a state are the global parameters whose digest records sign;
            None to check the round only (``[run.cohorts]``: local parameters are served as zeros).
    """

    records: Callable[[], Sequence[PeerRecord]]
    run_hash: str
    own_peer_id: str
    params: int | None

    def __call__(self, state: SharedState) -> None:
        """Raise ValueError naming why the run's records do not vouch for ``state``."""
        trainers = [
            r
            for r in self.records()
            if r.run_hash == self.run_hash and "trainer" in r.roles and r.peer_id != self.own_peer_id
        ]
        if not trainers:
            raise ValueError("no trainer record of the run to check it against")
        latest = max(r.round for r in trainers)
        if state.round > latest:
            raise ValueError(f"its round {state.round} is beyond what the run's trainer records show ({latest})")
        at_round = [r for r in trainers if (r.round == state.round if self.params else r.round >= state.round)]
        if 2 * len(at_round) <= len(trainers):
            raise ValueError(f"only {len(at_round)} of the run's {len(trainers)} trainer records show its round")
        if self.params is None:
            return
        digest, votes = Counter(r.state_digest for r in at_round).most_common(1)[0]
        if 2 * votes <= len(trainers):
            raise ValueError(f"no digest at round {state.round} is signed by a majority of {len(trainers)} records")
        if state_digest(state.tensors[: self.params]) != digest:
            raise ValueError(
                f"its parameters' digest differs from the one {votes} of the run's {len(trainers)} trainer records "
                f"sign at round {state.round}"
            )

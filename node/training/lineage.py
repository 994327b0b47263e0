"""One model for the whole run: members of a group that arrive with different global parameters merge them.

Global parameters change only by group means, so every member of a group leaves a round with bit-identical
ones, but only if they arrived with identical ones. They do not after a round applied alone (``solo``), a
mean one member's gate rejected, or when the run had several groups a round (16 or more declared peers,
or a slot split): each group's means accumulate in its own *lineage*, and a later group that mixes lineages
applies one mean to different parameters, so the difference stays forever. The run then trains several
models, late joiners find no majority digest to verify a download against, and a rejecting member never
comes back.

So each member declares the digest of its global parameters and outer momentum (its lineage) in the data
matchmaking or declared formation gathers. When a group's mean lands and its members declared more than
one lineage, each member takes every member's state after that mean (its own for members of its own
lineage, fetched from the member for the others: ``LineageServer``), and replaces its global state by
their coordinate-wise robust combination (``combine``, ``aggregation.combine``), one entry per member,
in PeerID order. Every member combines the same entries, so they leave the round bit-identical again;
its local model moves by the same change (its unsent progress stays its own).

Robustness: a member can declare any lineage and serve any state for it, so its entry is arbitrary.
``median`` stays within the range of the honest entries while fewer than half of the members lie (a
group of 3 with one liar takes an honest member's value); ``trimmed_mean`` drops the ``n // 4`` lowest
and highest values of each coordinate (breakdown: ``n // 4`` liars); ``mean`` lets one liar move the
result without limit and is there for comparison. A member whose fetch fails (a peer left, a malformed
state) keeps its own state: members may then part, and the next group that mixes them merges them again.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Collection, Sequence

import hivemind
import msgpack
import numpy as np
import torch
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import runtime_pb2

from node.aggregation.base import AggregationResult, StateDigest
from node.run_config import CombineRule, RunConfig
from node.runtime import P2PLoop
from node.training.outer import OuterState, state_digest

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20  # bytes of state per reply (hivemind's unary payload limit is 2 MiB)
KEPT_SNAPSHOTS = 2  # states served: the last rounds that landed with several lineages
MAX_REQUEST_BYTES = 64
Adopt = Callable[[str, Callable[[], None]], None]  # NodeRuntime.adopt: a component's shutdown, run at close
FETCH_POLL = 0.2  # seconds between two asks for a state its holder has not landed yet
DRAIN_SECONDS = 10.0  # at shutdown, the longest wait for members still to fetch our last kept state


def lineage_digest(tensors: Sequence[torch.Tensor]) -> str:
    """The hex ``state_digest`` of global parameters and outer momentum (``OuterState.shared_tensors``)."""
    return state_digest(tensors).hex()


def combine(entries: Sequence[Sequence[torch.Tensor]], rule: CombineRule) -> list[torch.Tensor]:
    """The coordinate-wise ``rule`` over ``entries`` (one list of tensors per member, all alike), on the CPU.

    ``median`` takes the mean of the two middle values for an even count.
    """
    if not entries:
        raise ValueError("combine needs at least one entry")
    count, out = len(entries), []
    for parts in zip(*entries, strict=True):
        stacked = torch.stack([p.detach().cpu().float() for p in parts])
        if rule == "mean":
            value = stacked.mean(dim=0)
        else:
            ordered = stacked.sort(dim=0).values
            trim = count // 4 if rule == "trimmed_mean" else (count - 1) // 2
            value = ordered[trim : count - trim].mean(dim=0)
        out.append(value.to(parts[0].dtype))
    return out


def _encode(tensors: Sequence[torch.Tensor]) -> bytes:
    return b"".join(t.detach().cpu().contiguous().numpy().tobytes() for t in tensors)


def decode_state(blob: bytes, templates: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Tensors shaped and typed like ``templates`` from their concatenated bytes.

    Raises:
        ValueError: the size is not the templates' exactly, or a value is not finite.
    """
    sizes = [t.numel() * t.element_size() for t in templates]
    if len(blob) != sum(sizes):
        raise ValueError(f"a state of {len(blob)} bytes, expected {sum(sizes)}")
    out, offset = [], 0
    for template, size in zip(templates, sizes, strict=True):
        dtype = torch.empty(0, dtype=template.dtype).numpy().dtype
        array = np.frombuffer(blob, dtype=dtype, count=template.numel(), offset=offset).reshape(template.shape)
        tensor = torch.from_numpy(array.copy())
        if not torch.isfinite(tensor).all():
            raise ValueError("the state holds non-finite values")
        out.append(tensor)
        offset += size
    return out


class LineageServer:
    """Serves the states this node held right after rounds that mixed lineages, and fetches other members'.

    Args:
        dht: the node's running DHT (an in-process P2P replica of its daemon answers the calls).
        run_id: the run; the handler's name is derived from it and ``kind`` (a sharded trainer serves its parts to
            late joiners under ``"parts"``: node/sharding/catchup.py).
    """

    def __init__(self, dht: hivemind.DHT, run_id: str, kind: str = "lineage"):
        self.name = f"zen.{run_id}.{kind}"
        self._states: dict[int, bytes] = {}
        self._lock = threading.Lock()
        self._owed: tuple[int, set[str]] = (-1, set())  # the last kept round, and who is still to fetch it
        self._rpc = P2PLoop(dht, "lineage")
        self._rpc.run(self._rpc.p2p.add_protobuf_handler(self.name, self._handle, runtime_pb2.ExpertRequest))

    def keep(self, round_no: int, tensors: Sequence[torch.Tensor], fetchers: Collection[str] = ()) -> None:
        """Serve ``tensors`` as our state after round ``round_no`` (the last ``KEPT_SNAPSHOTS`` rounds kept);
        ``fetchers``: the members that will fetch it (a node that leaves waits for them: ``shutdown``)."""
        blob = _encode(tensors)
        with self._lock:
            self._states[round_no] = blob
            self._owed = (round_no, set(fetchers))
            for old in sorted(self._states)[:-KEPT_SNAPSHOTS]:
                del self._states[old]

    async def _handle(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        reply: dict[str, object] = {"ok": False}
        try:
            fields = msgpack.unpackb(request.metadata[:MAX_REQUEST_BYTES], raw=False) if request.metadata else None
            round_no, offset = (fields["round"], fields["offset"]) if isinstance(fields, dict) else (None, None)
            if isinstance(round_no, int) and isinstance(offset, int) and offset >= 0:
                with self._lock:
                    blob = self._states.get(round_no)
                if blob is not None:
                    chunk = blob[offset : offset + CHUNK_BYTES]
                    reply = {"ok": True, "total": len(blob), "chunk": chunk}
                    done = offset + len(chunk) >= len(blob) and context.remote_id is not None
                    if done and round_no == self._owed[0]:
                        self._owed[1].discard(context.remote_id.to_base58())  # its fetch is complete
        except (ValueError, TypeError, KeyError, msgpack.ExtraData) as e:
            logger.info(f"refused a malformed lineage request: {e}")
        return runtime_pb2.ExpertResponse(metadata=msgpack.packb(reply, use_bin_type=True))

    def fetch(
        self, peer_id: str, round_no: int, templates: Sequence[torch.Tensor], timeout: float
    ) -> list[torch.Tensor]:
        """``peer_id``'s state after ``round_no``, shaped like ``templates``; waits up to ``timeout`` s for it.

        Raises:
            ValueError: the peer does not serve it in time, or what it serves is malformed.
        """
        expected = sum(t.numel() * t.element_size() for t in templates)
        deadline = time.monotonic() + timeout
        parts: list[bytes] = []
        while sum(map(len, parts)) < expected:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ValueError(f"{peer_id[:16]} did not serve its state after round {round_no} within {timeout} s")
            reply = self._ask(peer_id, round_no, sum(map(len, parts)), left)
            if reply is None:
                time.sleep(FETCH_POLL)  # not landed yet
                continue
            total, chunk = reply
            if total != expected or not chunk:
                raise ValueError(f"{peer_id[:16]} serves a state of {total} bytes, expected {expected}")
            parts.append(chunk)
        return decode_state(b"".join(parts), templates)

    def _ask(self, peer_id: str, round_no: int, offset: int, timeout: float) -> tuple[int, bytes] | None:
        """One chunk: (total, chunk), or None if the peer holds no state for ``round_no`` (yet)."""
        request = runtime_pb2.ExpertRequest(uid="", metadata=msgpack.packb({"round": round_no, "offset": offset}))
        call = self._rpc.p2p.call_protobuf_handler(
            PeerID.from_base58(peer_id), self.name, request, runtime_pb2.ExpertResponse
        )
        try:
            response = self._rpc.run(asyncio.wait_for(call, timeout), timeout=timeout + 5)
            reply = msgpack.unpackb(response.metadata, raw=False)
        except Exception as e:  # the daemon's errors, a timeout, a malformed reply: this peer's state is out
            raise ValueError(f"{peer_id[:16]} did not serve its state after round {round_no}: {e!r}") from e
        if not isinstance(reply, dict) or not reply.get("ok"):
            return None
        total, chunk = reply.get("total"), reply.get("chunk")
        if not isinstance(total, int) or not isinstance(chunk, bytes) or len(chunk) > CHUNK_BYTES:
            raise ValueError(f"{peer_id[:16]} sent a malformed state chunk")
        return total, chunk

    def shutdown(self) -> None:
        """Stop serving, once the members of our last mixed round fetched our state (at most ``DRAIN_SECONDS``):
        a node that leaves right after its last round would otherwise keep them from merging it."""
        round_no, owed = self._owed
        if owed:
            logger.info(
                f"waiting up to {DRAIN_SECONDS:.0f} s for {len(owed)} member(s) to fetch our state after "
                f"round {round_no}"
            )
            deadline = time.monotonic() + DRAIN_SECONDS
            while owed and time.monotonic() < deadline:
                time.sleep(FETCH_POLL)
        self._rpc.shutdown()


class LineageMerger:
    """After a group's round: merge the members' lineages where a ring declared several (the module docstring).

    Args:
        server: serves our states and fetches the others'.
        rule: the combination (``aggregation.combine``).
        timeout: seconds to wait for one member's state.
        peer_id: this node's PeerID (its own entry in a ring).
        local: with cohorts, the local parameters' indices: never served (zeros) nor merged.
    """

    def __init__(
        self, server: LineageServer, rule: CombineRule, timeout: float, peer_id: str, local: Collection[int] = ()
    ):
        self.server, self.rule, self.timeout = server, rule, timeout
        self.peer_id, self.local = peer_id, set(local)

    @classmethod
    def start(
        cls, dht: hivemind.DHT, run: RunConfig, peer_id: str, local: Collection[int], adopt: Adopt
    ) -> LineageMerger:
        """The run's merger, its server answering on ``dht``'s daemon; ``adopt`` is handed the server's shutdown."""
        server = LineageServer(dht, run.run_id)
        adopt("lineage server", server.shutdown)
        return cls(server, run.aggregation.combine, max(run.aggregation.message_timeout, 10.0), peer_id, local)

    def digest_of(self, outer: OuterState) -> StateDigest:
        """The lineage digest of some parameters' global state (params and momentum), for ``declare_state``."""
        state, count = outer.shared_tensors(self.local), len(outer.params)
        return lambda indices: lineage_digest([state[k] for k in _slots(indices, count)])

    def merge(self, result: AggregationResult, outer: OuterState, model: torch.nn.Module, applied: bool) -> int:
        """Merge after ``result`` landed (``applied``: its mean was applied, not rejected by the gate).

        Returns the most lineages a ring held (1: nothing to merge)."""
        rings = [ring for ring in result.lineages if ring.distinct() > 1 and self.peer_id in ring.peers]
        if not rings:
            return 1
        own = [t.detach().cpu().clone() for t in outer.shared_tensors(self.local)]
        fetchers = {  # the members of other lineages: each fetches our state
            peer
            for ring in rings
            for peer, state in zip(ring.peers, ring.states, strict=True)
            if state != ring.states[ring.peers.index(self.peer_id)]
        }
        self.server.keep(result.round, own, fetchers)  # what the other lineages' members fetch from us
        if not applied:
            return 1
        count, merged, fetched = len(outer.params), list(own), dict[str, list[torch.Tensor]]()
        try:
            for ring in rings:  # the cohort ring first, then the cross-cohort ring: its global parameters stand
                mine = ring.states[ring.peers.index(self.peer_id)]
                entries = [
                    own if state == mine else self._fetch(peer, result.round, own, fetched)
                    for peer, state in zip(ring.peers, ring.states, strict=True)
                ]
                slots = _slots(ring.indices, count)
                for k, value in zip(slots, combine([[e[k] for k in slots] for e in entries], self.rule), strict=True):
                    merged[k] = value
        except ValueError as e:
            logger.warning(f"round {result.round}: kept our own lineage: {e}")
            return 1
        before = outer.snapshot()
        outer.load_shared(merged, self.local)
        outer.follow(model, before, None)  # our unsent progress stays on top of the merged state
        held = max(ring.distinct() for ring in rings)
        logger.info(
            f"round {result.round}: merged {held} lineages of the group ({self.rule} of "
            f"{', '.join(str(len(r.peers)) for r in rings)} members' states)"
        )
        return held

    def _fetch(
        self, peer: str, round_no: int, templates: list[torch.Tensor], fetched: dict[str, list[torch.Tensor]]
    ) -> list[torch.Tensor]:
        if peer not in fetched:
            fetched[peer] = self.server.fetch(peer, round_no, templates, self.timeout)
        return fetched[peer]


def _slots(indices: Sequence[int] | None, count: int) -> list[int]:
    """Where parameters ``indices`` (None: all) sit in a shared state: their params, then their momentum."""
    chosen = range(count) if indices is None else indices
    return [*chosen, *(count + i for i in chosen)]

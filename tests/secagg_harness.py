"""A harness for masked all-reduce tests: real libp2p peers on 127.0.0.1, one asyncio loop in a thread.

``SecAggSwarm`` starts N ``hivemind.P2P`` daemons (real p2pd, real streams) with an endpoint each
and runs one ``MaskedAllReduce`` per peer for a given group, so tests can drop peers at chosen
phases, record what each peer saw, and inject raw messages, without matchmaking in the way.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from hivemind.p2p import P2P, PeerID
from hivemind.utils import MSGPackSerializer

from dht import NodeIdentity
from node.aggregation.base import AggregationError
from node.config import CompressionConfig
from node.secagg.declared import DeclaredFormation
from node.secagg.endpoint import SecAggEndpoint
from node.secagg.formation import GROUP_TARGET
from node.secagg.masking import add_masks
from node.secagg.messages import TAG, Message
from node.secagg.protocol import MaskedAllReduce, SecAggError, SecAggIdentity, SecAggResult, SecAggTimeouts

HANDLER = "test.secagg"
TEST_TIMEOUTS = SecAggTimeouts(message=5.0, data=20.0)


class Dropout(Exception):
    """Raised inside a session to make its peer vanish at a chosen point."""


class DroppingAllReduce(MaskedAllReduce):
    """A peer that leaves at ``drop_at``: "parts" (before sending any part), "mid-parts" (after
    sending one part), or "decode" (during unmasking: its sums are out, its reveals reached only
    the odd-numbered peers)."""

    drop_at: str = ""

    def _phase(self, name: str) -> None:
        if name == self.drop_at:
            raise Dropout(f"peer {self.index} drops at {name}")
        super()._phase(name)

    async def _send(self, to: int, kind: str, data: dict[str, Any], payload: Any = b"", timeout: float = 0) -> bool:
        if self.drop_at == "mid-parts" and kind == "part":
            first_sent = self.__dict__.setdefault("_first_part_sent", asyncio.Event())
            if self.__dict__.setdefault("_parts_started", 0):
                await first_sent.wait()  # leave only once the first part has reached its reducer
                raise Dropout(f"peer {self.index} drops after sending one part")
            self._parts_started = 1
            delivered = await super()._send(to, kind, data, payload, timeout)
            first_sent.set()
            return delivered
        if self.drop_at == "decode" and kind == "reveal" and to % 2 == 0:
            return True  # pretend: this reveal never leaves
        return await super()._send(to, kind, data, payload, timeout)


class MaliciousAllReduce(MaskedAllReduce):
    """A colluding peer that deviates on purpose (set the class attributes in a subclass, see ``deviating``).

    bad_box_to: peers whose share box is random bytes (it does not open for them).
    claim_maskset: the peers it masks with and claims in every part and claim (instead of its U2).
    bound_exp_to: {peer: exponent}: a keys message proposing another code bound to those peers.
    claim_to: {peer: maskset}: claims to those peers name this maskset (equivocation).
    low_order_keys_to: peers whose keys message carries a low-order X25519 point as its c and s keys.
    corrupt_reveal: every self-mask-seed share in its reveals is off by one (a lying revealer).
    weight_word: the weight word it encodes instead of its own (a forged weight), as a ring element.
    """

    bad_box_to: tuple[int, ...] = ()
    claim_maskset: tuple[int, ...] | None = None
    bound_exp_to: dict[int, int] = {}
    claim_to: dict[int, tuple[int, ...]] = {}
    low_order_keys_to: tuple[int, ...] = ()
    corrupt_reveal: bool = False
    weight_word: int | None = None

    async def _share_secrets(self, state: Any) -> None:
        await super()._share_secrets(state)
        if self.claim_maskset is not None:
            state.u2 = sorted(self.claim_maskset)

    async def _agree_on_contributors(self, state: Any) -> None:
        if self.claim_maskset is not None:
            state.live = set(state.u1)  # count everyone live, whether or not they sent us claims
        await super()._agree_on_contributors(state)

    async def _send(self, to: int, kind: str, data: dict[str, Any], payload: Any = b"", timeout: float = 0) -> bool:
        if kind == "shares" and to in self.bad_box_to:
            data = dict(data, box=os.urandom(len(data["box"])))
        elif kind == "keys" and to in self.bound_exp_to:
            data = dict(data, bound_exp=self.bound_exp_to[to])
        elif kind == "claim" and to in self.claim_to:
            data = dict(data, maskset=sorted(self.claim_to[to]))
        if kind == "keys" and to in self.low_order_keys_to:
            data = dict(data, c_pk=LOW_ORDER_POINT, s_pk=LOW_ORDER_POINT)
        elif kind == "reveal" and self.corrupt_reveal:
            data = dict(data, b={j: off_by_one(share) for j, share in data["b"].items()})
        return await super()._send(to, kind, data, payload, timeout)

    def _mask_part(self, part: int, state: Any) -> None:
        start, stop = self.parts[part]
        if self.weight_word is None or stop <= self.ring.values.size:
            return super()._mask_part(part, state)
        words = state.masked[start:stop]  # the part that carries the weight word: encode, forge it, mask
        seed = hashlib.blake2b(part.to_bytes(4, "little"), key=state.rounding_seed, digest_size=32).digest()
        self.ring.encode_part(words, start, stop, seed)
        words[-1] = np.uint32(self.weight_word % (1 << 32))
        add_masks(words, state.b_seed, state.pair_secrets, self.index, self.group_id, self.round_no, part)
        return None


# a point of order 8 on Curve25519 (every X25519 agreement with it is zero; libsodium refuses it)
LOW_ORDER_POINT = bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")


def off_by_one(share: bytes) -> bytes:
    """A Shamir share (66 bytes, big-endian) plus one: still a field element, no longer on the polynomial."""
    return (int.from_bytes(share, "big") + 1).to_bytes(len(share), "big")


def deviating(name: str, **attributes: Any) -> type[MaskedAllReduce]:
    """A ``MaliciousAllReduce`` subclass with the given deviations (its class attributes)."""
    return type(name, (MaliciousAllReduce,), attributes)


def colluders_can_unmask(sessions: list[MaskedAllReduce], colluders: list[int], honest: list[int]) -> list[int]:
    """The honest peers whose b and s_sk the colluders could both rebuild (their own shares + reveals seen)."""
    threshold = sessions[0].threshold
    exposed = []
    for j in honest:
        b_holders, s_holders = set(), set()
        for m in colluders:
            if j in sessions[m].state.held:
                b_holders.add(m)
                s_holders.add(m)
            for message in sessions[m].view or []:
                if message.kind == "reveal" and message.sender in honest:
                    if j in message.data["b"]:
                        b_holders.add(message.sender)
                    if j in message.data["s"]:
                        s_holders.add(message.sender)
        if len(b_holders) >= threshold and len(s_holders) >= threshold:
            exposed.append(j)
    return exposed


class SecAggSwarm:
    """N real P2P peers with identities and endpoints, driven from the test's thread."""

    def __init__(self, folder: Path, size: int, wait_for_group: float = 2.0, **endpoint_options: Any):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.identities = [NodeIdentity.load_or_create(folder / f"peer{i}") for i in range(size)]
        self.p2ps: list[P2P] = []
        self.endpoints: list[SecAggEndpoint] = []
        self.stream_retries = 0  # streams that broke before their reply and were retried
        self.call(self._start(wait_for_group, endpoint_options))

    def call(self, coroutine: Coroutine[Any, Any, Any], timeout: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    async def _start(self, wait_for_group: float, endpoint_options: dict[str, Any]) -> None:
        for identity in self.identities:
            initial = await self.p2ps[0].get_visible_maddrs() if self.p2ps else []
            p2p = await P2P.create(
                identity_path=str(identity.p2p_key_path),
                check_if_identity_free=False,
                host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                initial_peers=initial,
            )
            endpoint = SecAggEndpoint(p2p, HANDLER, wait_for_group=wait_for_group, **endpoint_options)
            await endpoint.start()
            self.p2ps.append(p2p)
            self.endpoints.append(endpoint)

    def signer(self, i: int) -> SecAggIdentity:
        identity = self.identities[i]
        return SecAggIdentity(identity.sign, identity.signing_public_key, identity.binding)

    def sessions(
        self,
        vectors: list[np.ndarray],
        weights: list[float] | None = None,
        round_no: int = 1,
        group_id: bytes | None = None,
        classes: dict[int, type[MaskedAllReduce]] | None = None,
        bound: float = 1.0,
        timeouts: SecAggTimeouts = TEST_TIMEOUTS,
        record_view: bool = False,
        compression: CompressionConfig | None = None,
        residuals: list[np.ndarray] | None = None,
        adaptive_bound: bool = False,
        unregistered: tuple[int, ...] = (),
    ) -> list[MaskedAllReduce]:
        """One session per vector (peers 0..n-1 of the swarm), registered with its endpoint unless ``unregistered``."""
        n = len(vectors)
        group_id = group_id or os.urandom(32)
        weights = weights or [1.0] * n
        size = (compression or CompressionConfig()).count(vectors[0].size) + 1
        part_sizes = [size // n + (1 if k < size % n else 0) for k in range(n)]
        classes = classes or {}
        result = []
        for i in range(n):
            session = classes.get(i, MaskedAllReduce)(
                p2p=self.p2ps[i],
                handler_name=HANDLER,
                group_id=group_id,
                peer_ids=[p.peer_id for p in self.p2ps[:n]],
                index=i,
                round_no=round_no,
                identity=self.signer(i),
                vector=vectors[i],
                omega=weights[i],
                part_sizes=part_sizes,
                bound=bound,
                timeouts=timeouts,
                record_view=record_view,
                compression=compression,
                residual=None if residuals is None else residuals[i],
                adaptive_bound=adaptive_bound,
            )
            if i not in unregistered:
                self.endpoints[i].register(session)
            result.append(session)
        return result

    def run(self, sessions: list[MaskedAllReduce]) -> list[SecAggResult | BaseException]:
        """Run every session to completion; each entry is a result or the exception it ended with."""

        async def run_all() -> list[Any]:
            try:
                outcomes = await asyncio.gather(*(s.run() for s in sessions), return_exceptions=True)
                self.stream_retries += sum(s.stats["stream_retries"] for s in sessions)
                return outcomes
            finally:
                for session, endpoint in zip(sessions, self.endpoints, strict=False):
                    endpoint.unregister(session)

        return self.call(run_all())

    def send_raw(self, sender: int, recipient: int, header: bytes, payload: bytes = b"") -> tuple[bool, str]:
        """Put bytes on a stream from one peer to another's endpoint; returns its [ok, reason] reply."""
        for attempt in range(3):  # p2pd now and then resets a fresh stream; MaskedAllReduce retries too
            try:
                return self.call(self.exchange(sender, recipient, header, payload))
            except asyncio.IncompleteReadError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def exchange(self, sender: int, recipient: int, header: bytes, payload: bytes = b"") -> tuple[bool, str]:
        """One stream from ``sender`` to ``recipient``'s endpoint: header and payload out, [ok, reason] back."""
        _, reader, writer = await self.p2ps[sender].call_binary_stream_handler(self.p2ps[recipient].peer_id, HANDLER)
        try:
            writer.write(len(header).to_bytes(4, "big") + header + payload)
            await writer.drain()
            length = int.from_bytes(await reader.readexactly(4), "big")
            ok, reason = msgpack.unpackb(await reader.readexactly(length))
            return ok, reason
        finally:
            writer.close()

    def close(self) -> None:
        async def stop() -> None:
            for p2p in self.p2ps:
                await p2p.shutdown()

        self.call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


def header_of(message: Message) -> bytes:
    """The exact header bytes a recorded message arrived with (for replays)."""
    return msgpack.packb([TAG, message.body, message.signature], use_bin_type=True)


def forged(message: Message, sign: Callable[[bytes], bytes], **changes: Any) -> bytes:
    """A header with fields changed and signed by ``sign`` (a key of the attacker's choice)."""
    fields = dict(
        kind=message.kind,
        group=message.group,
        round=message.round,
        sender=message.sender,
        recipient=message.recipient,
        data=message.data,
        payload=message.payload,
    )
    fields.update(changes)
    return Message(**fields).seal(sign)


def contributors_mean(vectors: list[np.ndarray], weights: list[float], members: list[int], bound: float) -> np.ndarray:
    """The exact (float64) weighted mean of the clipped inputs of ``members``."""
    total = sum(weights[j] * np.clip(vectors[j].astype(np.float64), -bound, bound) for j in members)
    return total / sum(weights[j] for j in members)


def results_of(outcomes: list[SecAggResult | BaseException], members: list[int]) -> list[SecAggResult]:
    """The results of ``members``; fails the test with the exception if one of them failed."""
    found = []
    for i in members:
        outcome = outcomes[i]
        if isinstance(outcome, BaseException):
            raise AssertionError(f"peer {i} failed: {outcome!r}") from outcome
        found.append(outcome)
    return found


__all__ = [
    "LOW_ORDER_POINT",
    "Dropout",
    "DroppingAllReduce",
    "MaliciousAllReduce",
    "SecAggError",
    "SecAggSwarm",
    "colluders_can_unmask",
    "contributors_mean",
    "deviating",
    "forged",
    "header_of",
    "off_by_one",
]


def module_swarm(name: str, size: int) -> Any:
    """A module-scoped ``swarm`` fixture: ``size`` real P2P peers shared by a module's tests (each
    test runs its own group). Use as ``swarm = module_swarm("attacks", 5)``."""

    @pytest.fixture(scope="module")
    def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecAggSwarm]:
        peers = SecAggSwarm(Path(tmp_path_factory.mktemp(name)), size=size)
        try:
            yield peers
        finally:
            peers.close()

    return swarm


def random_inputs(n: int, seed: int, numel: int, scale: float = 0.3) -> tuple[list[np.ndarray], list[float]]:
    """``n`` seeded float32 updates of ``numel`` values and weights in [0.3, 1)."""
    rng = np.random.default_rng(seed)
    vectors = [(rng.standard_normal(numel) * scale).astype(np.float32) for _ in range(n)]
    return vectors, [float(w) for w in rng.uniform(0.3, 1.0, n)]


def assert_same_or_none(outcomes: list[SecAggResult | BaseException], honest: list[int]) -> list[SecAggResult]:
    """Every honest peer ends with the same result or with SecAggError, never another exception."""
    results = []
    for i in honest:
        outcome = outcomes[i]
        if isinstance(outcome, BaseException):
            assert isinstance(outcome, SecAggError), f"honest peer {i} failed with {outcome!r}"
        else:
            results.append(outcome)
    for result in results[1:]:
        assert result.contributors == results[0].contributors
        assert np.array_equal(result.mean, results[0].mean)
    return results


def aggregate_together(
    aggregators: list[Any], round_no: int, updates: list[list[Any]], weights: list[float], errors: bool = False
) -> list[Any]:
    """Every node aggregator's ``aggregate`` of ``round_no`` at once, from threads (as the trainer does); None
    where one raised or had not returned within 90 s (``errors``: the AggregationError it raised instead)."""
    results: list[Any] = [None] * len(aggregators)

    def step(i: int) -> None:
        try:
            results[i] = aggregators[i].aggregate(round_no, updates[i], weights[i])
        except AggregationError as e:
            if not errors:
                raise
            results[i] = e

    threads = [threading.Thread(target=step, args=(i,)) for i in range(len(aggregators))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=90)
    return results


def declared_formation(
    peer: Any, prefix: str, cls: type[DeclaredFormation] = DeclaredFormation, window: float = 1.0
) -> DeclaredFormation:
    """Declared formation (node/secagg/declared.py) for a swarm_factory ``peer``: groups of 3 to 8, anyone allowed."""
    identity = peer.identity
    return cls(
        dht=peer.dht,
        prefix=prefix,
        peer_id=PeerID.from_base58(identity.peer_id),
        identity=SecAggIdentity(identity.sign, identity.signing_public_key, identity.binding),
        window=window,
        min_size=3,
        target=GROUP_TARGET,
        allowed=frozenset(),
        serializer=MSGPackSerializer,
    )

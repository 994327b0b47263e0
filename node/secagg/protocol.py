"""Masked butterfly all-reduce: secure aggregation (Bonawitz et al. 2017) without a server.

Each of the ``n`` peers of a group (formed by hivemind's matchmaking) encodes its weighted update
in Z_2^32 (``FixedPointCodec``), adds a self mask and one pairwise mask per peer, and sends part
``k`` of the masked vector to the reducer of part ``k``. Pairwise masks cancel coordinate by
coordinate, so sums of parts are sums of inputs once the self masks are removed; a reducer only
ever sees uniformly random words. Phases, each bounded by a timeout:

    keys     broadcast per-round X25519 keys (c: share encryption, s: mask agreement) and a
             commitment to the self-mask seed b, signed by the identity key bound to the PeerID
    shares   Shamir t-of-n shares of s_sk and b to every peer, boxed (X25519 + XSalsa20-Poly1305)
             under the c keys; a peer whose view of who sent keys differs is left out
    parts    masked parts to reducers; a reducer that fails is replaced by the next live peer in
             ring order (the holder), so a dropout loses no part
    claims   two rounds: each peer announces which holder acknowledged each of its parts; after
             the first, parts held by peers that went silent are sent again
    agree    each peer derives the contributor set U from the claims (every part held by a live
             peer, masks consistent) and all check they derived the same U; nothing is revealed
             before ``t`` peers confirm one U
    reveal   survivors reveal shares of b_j for j in U and of s_sk_d for dropouts d, never both
             for one peer (t > n/2 makes two conflicting reveals impossible to complete); each
             peer rebuilds the secrets it needs, checked against the keys and commitments
    sums     each holder removes from its partial sums the self masks of their senders and their
             pairwise masks with dropouts (pairwise masks within U cancel only in the total, so a
             partial sum stays masked), and sends them to every peer; all decode the same total

The threshold is ``t = n // 2 + 1``; U must hold at least ``max(3, t)`` peers, since a sum over two
reveals both inputs. Any missing piece makes the round fail with ``SecAggError``: a partial result
is never returned. A peer that leaves after sending its sums (while others unmask) costs
nothing; one that leaves between ``agree`` and its sums takes its parts with it and fails the
round for everyone (it is then out of the next group).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np
from hivemind.p2p import P2P, PeerID
from nacl.bindings import crypto_scalarmult_base
from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey

from dht.identity import verify_binding
from node.config import CompressionConfig
from node.secagg.compression import pack_bits, packed_size, select_coordinates, unpack_bits
from node.secagg.fixed_point import FixedPointCodec
from node.secagg.masking import apply_mask, pair_mask_key, pair_secret, pair_sign, self_mask_key
from node.secagg.messages import MAX_GROUP, NO_BOUND, Message, MessageError
from node.secagg.shamir import ShareError, combine_secret, split_secret

if TYPE_CHECKING:
    from node.secagg.privacy import NoiseShare

logger = logging.getLogger(__name__)

CLAIM_ATTEMPTS = 2
WRITE_CHUNK = 1 << 18  # bytes handed to the stream at a time
STREAM_ATTEMPTS = 3  # fresh streams tried for one message when a stream breaks before the reply


class SecAggError(Exception):
    """The masked all-reduce of one group failed; nothing from it may be applied."""


@dataclass(frozen=True)
class SecAggIdentity:
    """What a peer signs protocol messages with."""

    sign: Callable[[bytes], bytes]  # Ed25519 signature by the identity's signing key
    signing_public_key: bytes
    binding: bytes  # the PeerID's key over the signing key (dht.identity)


@dataclass(frozen=True)
class SecAggResult:
    """The weighted mean over the contributors U."""

    mean: np.ndarray  # float32, the length of the input vector
    contributors: tuple[int, ...]  # U, as indices in the group's peer order
    weight_sum: float  # sum of omega over U


@dataclass(frozen=True)
class SecAggTimeouts:
    """Seconds each phase may wait for peers before going on without them."""

    message: float = 10.0  # small messages (keys, shares, claims, agreement, reveals)
    data: float = 60.0  # masked parts and partial sums (one send gives up after half of it, so a
    # stalled reducer is replaced while its peers still wait for our claims)


class Workspace:
    """Arrays reused across rounds: a fresh 100 MB array costs a page fault per 4 KiB on first touch.

    ``take`` hands out a view of a free buffer at least as large as asked (or a new one); ``reset``
    frees them all for the next round. Named arrays (``array``) persist with their contents.
    """

    def __init__(self) -> None:
        self._named: dict[str, np.ndarray] = {}
        self._free: list[np.ndarray] = []
        self._used: list[np.ndarray] = []

    def array(self, name: str, size: int, dtype: Any = np.uint32) -> np.ndarray:
        found = self._named.get(name)
        if found is None or found.size != size or found.dtype != dtype:
            found = self._named[name] = np.empty(size, dtype)
        return found

    def take(self, size: int) -> np.ndarray:
        fitting = [i for i, b in enumerate(self._free) if b.size >= size]
        if fitting:
            buffer = self._free.pop(min(fitting, key=lambda i: self._free[i].size))
        else:
            buffer = np.empty(size, np.uint32)
        self._used.append(buffer)
        return buffer[:size]

    def reset(self) -> None:
        self._free += self._used
        self._used = []


def split_parts(total: int, sizes: Iterable[int]) -> list[tuple[int, int]]:
    """[start, stop) of each part, from part sizes that sum to ``total``."""
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    if start != total:
        raise ValueError(f"part sizes sum to {start}, the vector has {total} elements")
    return bounds


class MaskedAllReduce:
    """One peer's run of the masked all-reduce in one group.

    Args:
        p2p: the peer's libp2p client; messages go out as streams to ``handler_name``.
        handler_name: the protocol name every member's ``SecAggEndpoint`` serves.
        group_id: random per group (from matchmaking); binds every message to this all-reduce.
        peer_ids: the group in the agreed order; this peer is at ``index``.
        index: this peer's position in ``peer_ids``.
        round_no: the outer round; also bound into every message and mask key.
        identity: signs this peer's messages.
        vector: this peer's update, float32, flattened.
        omega: this peer's weight in (0, 1] (samples / the run's weight bound).
        part_sizes: elements of the (vector + 1 weight word) each peer reduces; 0 = not a reducer.
        bound: the run-wide clip bound B of the fixed-point code.
        timeouts: per-phase waits.
        executor: runs encoding and masking off the event loop.
        out: float32 array (the vector's length) the mean is written into; may be ``vector`` itself.
        workspace: buffers to reuse across rounds.
        noise: this peer's share of the differential-privacy noise, added in the ring before masking.
        compression: low-bit words and random-k (node/secagg/compression.py); None: full 32-bit words.
            With random-k, ``part_sizes`` split ``compression.count(vector.size) + 1`` elements.
        adaptive_bound: agree on the code's bound in the keys phase: each peer proposes the power of two
            at or above 3x the RMS of its values and the group takes the largest, capped at ``bound``
            (for low-bit codes; a proposal reveals the order of magnitude of a peer's update).
        residual: for error feedback (float32, the vector's length): on success it is overwritten with
            what of ``vector`` the group's sum did not take (unselected coordinates, clipped excess,
            rounding error), for the caller to keep and send again; untouched on failure.
        record_view: keep every received message in ``view`` (tests check what a peer can learn).
    """

    def __init__(
        self,
        *,
        p2p: P2P,
        handler_name: str,
        group_id: bytes,
        peer_ids: list[PeerID],
        index: int,
        round_no: int,
        identity: SecAggIdentity,
        vector: np.ndarray,
        omega: float,
        part_sizes: list[int],
        bound: float,
        timeouts: SecAggTimeouts,
        executor: ThreadPoolExecutor | None = None,
        out: np.ndarray | None = None,
        workspace: Workspace | None = None,
        noise: NoiseShare | None = None,
        compression: CompressionConfig | None = None,
        residual: np.ndarray | None = None,
        adaptive_bound: bool = False,
        record_view: bool = False,
    ):
        n = len(peer_ids)
        if not 3 <= n <= MAX_GROUP:
            raise SecAggError(
                f"secure aggregation needs a group of 3 to {MAX_GROUP} peers, got {n}: "
                "a sum over two peers reveals each input to the other"
            )
        if len(part_sizes) != n or vector.dtype != np.float32 or vector.ndim != 1:
            raise ValueError("part_sizes needs one entry per peer and vector a flat float32 array")
        self.p2p, self.handler_name, self.group_id = p2p, handler_name, group_id
        self.peer_ids, self.index, self.round_no, self.identity = list(peer_ids), index, round_no, identity
        self.n, self.threshold = n, n // 2 + 1
        self.vector, self.omega = vector, omega
        self.workspace = workspace or Workspace()
        self.compression = compression or CompressionConfig()
        self.residual = residual
        if residual is not None and (residual.shape != vector.shape or residual.dtype != np.float32):
            raise ValueError("residual must be a float32 array shaped like vector")
        self.selected = select_coordinates(vector.size, self.compression.count(vector.size), group_id, round_no)
        self.values = self._inputs()  # what this peer encodes: the selected coordinates of vector
        self.parts = split_parts(self.values.size + 1, part_sizes)
        self.reducers = [k for k, size in enumerate(part_sizes) if size > 0]
        self.codec = FixedPointCodec(group_size=n, bound=bound, bits=self.compression.bits)
        self.adaptive_bound = adaptive_bound
        self.width = self.codec.ring_bits
        self.sent_error = None if residual is None else self.workspace.array("sent_error", self.values.size, np.float32)
        self.timeouts = timeouts
        self.executor = executor
        self.out = np.empty_like(vector) if out is None else out
        if self.out.shape != vector.shape or self.out.dtype != np.float32:
            raise ValueError("out must be a float32 array shaped like vector")
        self.noise = noise
        self.view: list[Message] | None = [] if record_view else None
        self.dead: set[int] = set()
        self.stats: dict[str, Any] = {"bytes_sent": 0, "messages_sent": 0, "stream_retries": 0, "phases": []}
        self._inbox: dict[tuple[str, int, int], Message] = {}  # (kind, sender, part or attempt) -> message
        self._changed = asyncio.Event()
        self._keys: dict[int, dict[str, Any]] = {}  # verified key adverts by sender
        self._closed = False
        self._background: list[asyncio.Future[Any]] = []
        self.held: dict[int, tuple[bytes, bytes]] = {}

    # ------------------------------------------------------------------ receiving

    def check_header(self, message: Message, remote: PeerID, payload_size: int) -> None:
        """Refuse a message not meant for this all-reduce, before its payload is read."""
        if message.group != self.group_id:
            raise MessageError("wrong group id")
        if message.round != self.round_no:
            raise MessageError(f"message for round {message.round}, this all-reduce is round {self.round_no}")
        if message.sender >= self.n or self.peer_ids[message.sender] != remote:
            raise MessageError(f"sender index {message.sender} is not the stream's peer {remote}")
        if message.recipient != self.index or message.sender == self.index:
            raise MessageError(f"message addressed to peer {message.recipient}, this is peer {self.index}")
        if any(i >= self.n for i in _indices(message.data)):
            raise MessageError(f"a {message.kind!r} message names a peer outside the group of {self.n}")
        if message.kind == "claim" and len(message.data["holders"]) != self.n:
            raise MessageError(f"a claim must name one holder per part ({self.n})")
        if message.kind in ("part", "sum"):
            part = message.data["part"]
            if part >= self.n:
                raise MessageError(f"part {part} does not exist in a group of {self.n}")
            if payload_size != self._wire_size(part):
                raise MessageError(f"part {part} must be {self._wire_size(part)} bytes, got {payload_size}")
        elif payload_size:
            raise MessageError(f"a {message.kind!r} message carries no payload")
        if message.kind == "keys":
            data = message.data
            if not verify_binding(str(remote), data["signing_pk"], data["binding"]):
                raise MessageError(f"peer {message.sender}'s signing key is not bound to its PeerID")
            message.verify(data["signing_pk"])
        else:
            keys = self._keys.get(message.sender)
            if keys is None:
                raise MessageError(f"peer {message.sender} sent {message.kind!r} before its keys")
            message.verify(keys["signing_pk"])

    def payload_buffer(self, message: Message) -> np.ndarray:
        """Where a checked message's payload is read to (a reused buffer of the part's size)."""
        size = self._wire_size(message.data["part"])
        if self.width == 32:
            return self.workspace.take(size // 4)
        return self.workspace.take((size + 3) // 4).view(np.uint8)[:size]

    def deliver(self, message: Message) -> None:
        """Store a checked message; a second message for the same slot is refused."""
        if self._closed:
            raise MessageError("this all-reduce has finished")
        slot_id = message.data.get("part", message.data.get("attempt", 0))
        slot = (message.kind, message.sender, slot_id)
        if slot in self._inbox:
            if self._inbox[slot].body == message.body:
                return  # the same signed message again (a retry after a broken stream): already have it
            raise MessageError(f"duplicate {message.kind!r} message from peer {message.sender}")
        if message.kind == "keys":
            self._keys[message.sender] = message.data
        self._inbox[slot] = message
        if self.view is not None:
            self.view.append(message)
        self._changed.set()

    def close(self) -> None:
        self._closed = True
        self._changed.set()
        if self.view is None:
            self.workspace.reset()

    # ------------------------------------------------------------------ sending

    async def _send(self, to: int, kind: str, data: dict[str, Any], payload: Any = b"", timeout: float = 0) -> bool:
        """Deliver one message; False (and ``to`` marked dead) if it could not be delivered."""
        if to in self.dead:
            return False
        message = Message(kind, self.group_id, self.round_no, self.index, to, data, payload=payload)
        header = message.seal(self.identity.sign)
        try:
            async with asyncio.timeout(timeout or self.timeouts.message):
                for attempt in range(STREAM_ATTEMPTS):
                    try:
                        ok, reason = await self._exchange(to, header, payload)
                        break
                    except (asyncio.IncompleteReadError, ConnectionError) as e:
                        # a stream reset before the reply (seen under load with p2pd); delivery is
                        # idempotent, so a fresh stream may carry the same message again
                        if attempt + 1 == STREAM_ATTEMPTS:
                            raise
                        logger.debug(f"{kind} to peer {to}: stream broke ({e!r}), retrying")
                        self.stats["stream_retries"] += 1
                        await asyncio.sleep(0.05 * (attempt + 1))
        except Exception as e:  # a dead, slow or refusing peer: any failure means "not delivered"
            logger.warning(f"group {self.group_id.hex()[:8]}: {kind} to peer {to} failed, counted as gone: {e!r}")
            self.dead.add(to)
            self._changed.set()  # a collector waiting on this peer stops waiting
            return False
        if not ok:
            logger.warning(f"group {self.group_id.hex()[:8]}: peer {to} refused our {kind}: {reason}")
            self.dead.add(to)
            self._changed.set()
            return False
        self.stats["bytes_sent"] += 4 + len(header) + len(payload)
        self.stats["messages_sent"] += 1
        return True

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
            if length > 1024:
                raise MessageError("oversized reply")
            ok, reason = msgpack.unpackb(await reader.readexactly(length), raw=False)
            return bool(ok), str(reason)
        finally:
            writer.close()

    async def _broadcast(self, to: Iterable[int], kind: str, make: Callable[[int], dict[str, Any]]) -> None:
        """Send to each peer and wait for every acknowledgement (or failure)."""
        await asyncio.gather(*(self._send(j, kind, make(j)) for j in to if j != self.index))

    def _post(self, to: Iterable[int], kind: str, data: dict[str, Any]) -> None:
        """Send to each peer in the background: a peer that stalls must not hold up our next phase."""
        for j in to:
            if j != self.index:
                self._background.append(asyncio.ensure_future(self._send(j, kind, data)))

    async def _collect(
        self, kind: str, senders: Iterable[int], timeout: float, slot: int = 0, need: int | None = None
    ) -> dict[int, Message]:
        """Wait until every live sender's message arrived (or ``need`` of them), or the timeout."""
        senders = [j for j in senders if j != self.index]
        deadline = time.monotonic() + timeout
        while True:
            got = {j: self._inbox[(kind, j, slot)] for j in senders if (kind, j, slot) in self._inbox}
            waiting = [j for j in senders if j not in got and j not in self.dead]
            if not waiting or (need is not None and len(got) >= need) or self._closed:
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

    async def _offload(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # ------------------------------------------------------------------ the protocol

    async def run(self) -> SecAggResult:
        try:
            return await self._run()
        finally:
            for pending in self._background:  # a failed or cancelled peer stops sending
                pending.cancel()
            self.close()

    async def _run(self) -> SecAggResult:
        me, minimum = self.index, max(3, self.threshold)
        everyone = range(self.n)

        self._phase("keys")
        # keys
        c_sk, s_sk, b_seed = PrivateKey.generate(), PrivateKey.generate(), os.urandom(32)
        own_keys = {
            "c_pk": bytes(c_sk.public_key),
            "s_pk": bytes(s_sk.public_key),
            "b_commit": _commit(b_seed),
            "signing_pk": self.identity.signing_public_key,
            "binding": self.identity.binding,
            "bound_exp": self._propose_bound() if self.adaptive_bound else NO_BOUND,
        }
        self._keys[me] = own_keys
        await self._broadcast(everyone, "keys", lambda j: own_keys)  # acknowledged before any share is sent
        await self._collect("keys", everyone, self.timeouts.message)
        u1 = sorted(self._keys)
        self._require(len(u1) >= minimum, f"only {len(u1)} peers sent keys")
        proposals = [self._keys[j]["bound_exp"] for j in u1 if self._keys[j]["bound_exp"] != NO_BOUND]
        if self.adaptive_bound and proposals:  # every member of u1 (checked in shares) derives the same bound
            bound = min(self.codec.bound, 2.0 ** max(proposals))
            self.codec = FixedPointCodec(group_size=self.n, bound=bound, bits=self.compression.bits)

        self._phase("shares")
        # shares
        s_shares = split_secret(bytes(s_sk), self.threshold, self.n)
        b_shares = split_secret(b_seed, self.threshold, self.n)

        def boxed(j: int) -> dict[str, Any]:
            plain = msgpack.packb([self.group_id, self.round_no, me, j, s_shares[j], b_shares[j]])
            box = Box(c_sk, PublicKey(self._keys[j]["c_pk"])).encrypt(plain)
            return {"view": u1, "box": bytes(box)}

        await self._broadcast(u1, "shares", boxed)
        held = self.held = {me: (s_shares[me], b_shares[me])}  # (s_sk, b) shares we hold, by owner
        for j, message in (await self._collect("shares", u1, self.timeouts.message)).items():
            share = self._open_shares(c_sk, j, message, u1)
            if share is not None:
                held[j] = share
        u2 = sorted(held)
        self._require(len(u2) >= minimum, f"only {len(u2)} peers shared their secrets consistently")

        self._phase("parts")
        # parts: encode, mask, send each to its reducer (or the next live one)
        masked = self.workspace.array("masked", self.parts[-1][1])
        pair_secrets = {j: pair_secret(bytes(s_sk), self._keys[j]["s_pk"]) for j in u2 if j != me}
        rounding_seed = os.urandom(32)
        holders = [-1] * self.n
        stored: dict[tuple[int, int], np.ndarray] = {}  # (part, sender) -> masked words we hold

        async def place(part: int, live: set[int]) -> None:
            start, stop = self.parts[part]
            for h in self._candidates(part, live):
                if h == me:
                    stored[(part, me)] = masked[start:stop]
                    holders[part] = me
                    return
                payload = self._to_wire(masked[start:stop], part)
                if await self._send(h, "part", {"part": part, "maskset": u2}, payload, self.timeouts.data / 2):
                    holders[part] = h
                    return
            holders[part] = -1

        live = set(u2)
        placing = []
        for k in sorted(self.reducers, key=lambda k: (k - me - 1) % self.n):  # peers start on different reducers
            await self._offload(self._mask_part, k, masked, b_seed, pair_secrets, rounding_seed)
            placing.append(asyncio.create_task(place(k, live)))  # sent while the next part is masked
            self._background.append(placing[-1])
        await asyncio.gather(*placing)

        self._phase("claims")
        # claims: who holds what; parts on peers that went silent are placed again once
        claims: dict[int, dict[str, Any]] = {}
        for attempt in range(CLAIM_ATTEMPTS):
            own: dict[str, Any] = {"attempt": attempt, "holders": list(holders), "maskset": u2}
            self._post(live, "claim", own)
            got = await self._collect("claim", live, self.timeouts.data, slot=attempt)
            live = {me} | set(got)
            claims = {j: m.data for j, m in got.items()} | {me: own}
            lost = [k for k in self.reducers if holders[k] not in live]
            if attempt + 1 < CLAIM_ATTEMPTS and lost:
                await asyncio.gather(*(place(k, live) for k in lost))

        self._phase("agree")
        # agree on U
        u, designation = self._contributors(claims, live)
        self._require(len(u) >= minimum, f"only {len(u)} peers' inputs reached live reducers")
        digest = hashlib.blake2b(msgpack.packb([u, designation]), digest_size=32).digest()
        self._post(live, "agree", {"u": u, "digest": digest})
        agreed = await self._collect("agree", live, self.timeouts.message)
        conflicting = [j for j, m in agreed.items() if m.data["digest"] != digest]
        self._require(not conflicting, f"peers {conflicting} derived a different contributor set")
        self._require(len(agreed) + 1 >= self.threshold, f"only {len(agreed) + 1} peers confirmed U")

        self._phase("reveal")
        # U is fixed and confirmed, so shares are revealed now; each holder then strips the masks
        # of the parts it holds (self masks of U, pairwise masks shared with dropouts) and sends
        # the clean partial sums, so the unmasking work is split n ways like the reduction
        dropped = sorted({d for j in u for d in claims[j]["maskset"]} - set(u))
        self._require(all(d in self._keys for d in dropped), "a contributor masked with a peer whose keys we lack")
        reveal = {"b": {j: held[j][1] for j in u}, "s": {d: held[d][0] for d in dropped if d in held}}
        outgoing = [self._send(j, "reveal", reveal) for j in live if j != me]
        revealing = asyncio.gather(*outgoing)
        self._background.append(revealing)
        reveals = await self._collect("reveal", live, self.timeouts.message, need=self.threshold - 1)
        shares_b = {j: {me + 1: held[j][1]} for j in u}  # every j in U is in our u2, so we hold its share
        shares_s = {d: ({me + 1: held[d][0]} if d in held else {}) for d in dropped}
        for sender, message in reveals.items():
            for j, share in message.data["b"].items():
                if j in shares_b:
                    shares_b[j][sender + 1] = share
            for d, share in message.data["s"].items():
                if d in shares_s:
                    shares_s[d][sender + 1] = share
        seeds = {j: self._rebuild(shares, "b", j) for j, shares in shares_b.items()}
        secrets_s = {d: self._rebuild(shares, "s", d) for d, shares in shares_s.items()}
        dropout_pairs = {
            (j, d): pair_secret(secret, self._keys[j]["s_pk"])
            for d, secret in secrets_s.items()
            for j in u
            if d in claims[j]["maskset"]
        }

        self._phase("sums")
        total = self.workspace.array("total", self.parts[-1][1])
        total.fill(0)
        expected: dict[tuple[int, int], list[int]] = {}  # (part, holder) -> senders summed there
        for part, sender, holder in designation:
            expected.setdefault((part, holder), []).append(sender)
        sends = []
        for (part, holder), senders in expected.items():
            if holder != me:
                continue
            start, stop = self.parts[part]
            partial = self.workspace.take(stop - start)
            partial.fill(0)
            for sender in senders:
                words = stored.get((part, sender)) if sender == me else self._words(("part", sender, part))
                if words is None:
                    raise SecAggError(f"we acknowledged part {part} of peer {sender} but lost it")
                np.add(partial, words, out=partial)
            await self._offload(self._unmask_partial, part, partial, senders, seeds, dropout_pairs)
            total[start:stop] += partial
            data = {"part": part, "senders": senders}
            payload = self._to_wire(partial, part)
            sends += [self._send(j, "sum", data, payload, self.timeouts.data / 2) for j in live if j != me]
        sending = asyncio.gather(*sends)
        self._background.append(sending)
        for (part, holder), senders in expected.items():
            if holder == me:
                continue
            partial_sum = (await self._collect("sum", [holder], self.timeouts.data, slot=part)).get(holder)
            if partial_sum is None:
                raise SecAggError(f"no partial sum of part {part} from peer {holder}")
            self._require(partial_sum.data["senders"] == senders, f"peer {holder} summed part {part} over another set")
            start, stop = self.parts[part]
            total[start:stop] += self._words(("sum", holder, part))
        await sending
        await revealing
        self._phase("decode")
        try:
            weight_sum = await self._offload(self._decode, total)
        except ValueError as e:
            raise SecAggError(f"group {self.group_id.hex()[:8]}: the unmasked sum does not decode: {e}") from e
        self._phase("done")
        return SecAggResult(mean=self.out, contributors=tuple(u), weight_sum=weight_sum)

    # ------------------------------------------------------------------ helpers

    def _propose_bound(self) -> int:
        """log2 of the power of two at or above 3x the RMS of our values (NO_BOUND for an all-zero update)."""
        rms = float(np.sqrt(np.mean(np.square(self.values, dtype=np.float64)))) if self.values.size else 0.0
        if not (np.isfinite(rms) and rms > 0):
            return NO_BOUND
        return int(min(30, max(-100, np.ceil(np.log2(3 * rms)))))

    def _phase(self, name: str) -> None:
        """Record when a phase starts; ``stats["phases"]`` holds (name, seconds since the start)."""
        now = time.perf_counter()
        self._started = getattr(self, "_started", now)
        self.stats["phases"].append((name, round(now - self._started, 4)))
        logger.debug(f"group {self.group_id.hex()[:8]} peer {self.index}: {name} at {now - self._started:.3f}s")

    def _require(self, ok: bool, reason: str) -> None:
        if not ok:
            raise SecAggError(f"group {self.group_id.hex()[:8]} round {self.round_no}: {reason}")

    def _words(self, slot: tuple[str, int, int]) -> np.ndarray | None:
        """A received part or partial sum as uint32 words (unpacked from its ``width``-bit wire form)."""
        message = self._inbox.get(slot)
        if message is None or self.width == 32:
            return None if message is None else message.payload
        start, stop = self.parts[slot[2]]
        words = self.workspace.take(stop - start)
        count = min(stop, self.values.size) - start
        unpack_bits(message.payload[: packed_size(count, self.width)], self.width, words[:count])
        if stop > self.values.size:  # the weight word travels as 32 bits after the packed values
            words[-1] = message.payload[-4:].view("<u4")[0]
        return words

    def _wire_size(self, part: int) -> int:
        start, stop = self.parts[part]
        count = min(stop, self.values.size) - start
        return packed_size(count, self.width) + (4 if stop > self.values.size else 0)

    def _to_wire(self, words: np.ndarray, part: int) -> Any:
        """A part's words as sent: raw 32-bit words, or the low ``width`` bits packed (weight word: 32)."""
        if self.width == 32:
            return words.data.cast("B")
        start, stop = self.parts[part]
        count = min(stop, self.values.size) - start
        packed = pack_bits(words[:count], self.width)
        return packed + (words[-1:].astype("<u4").tobytes() if stop > self.values.size else b"")

    def _inputs(self) -> np.ndarray:
        """This peer's values to encode: ``vector`` on the selected coordinates (a copy: ``out`` may be ``vector``)."""
        if self.selected is None and self.residual is None:
            return self.vector
        source = self.workspace.array("inputs", self.vector.size, np.float32)
        np.copyto(source, self.vector)
        if self.selected is None:
            return source
        return np.take(source, self.selected, out=self.workspace.array("selected", self.selected.size, np.float32))

    def _decode(self, total: np.ndarray) -> float:
        """Decode the group sum into ``out`` (zeros off the selected coordinates); commit the residual."""
        if self.selected is None:
            weight_sum = self.codec.decode_sum(total, self.out)
        else:
            mean = self.workspace.array("selected_mean", self.selected.size, np.float32)
            weight_sum = self.codec.decode_sum(total, mean)
            self.out.fill(0)
            self.out[self.selected] = mean
        if self.residual is not None and self.sent_error is not None:
            # what was not sent stays: every unselected coordinate, and the error of each sent one
            if self.selected is None:
                np.copyto(self.residual, self.sent_error)
            else:
                np.copyto(self.residual, self.workspace.array("inputs", self.vector.size, np.float32))
                self.residual[self.selected] = self.sent_error
        return weight_sum

    def _open_shares(self, c_sk: PrivateKey, j: int, message: Message, u1: list[int]) -> tuple[bytes, bytes] | None:
        if message.data["view"] != u1:
            logger.info(f"peer {j} saw keys from {message.data['view']}, we saw {u1}: left out")
            return None
        try:
            plain = Box(c_sk, PublicKey(self._keys[j]["c_pk"])).decrypt(message.data["box"])
            group, round_no, sender, recipient, s_share, b_share = msgpack.unpackb(plain)
        except (CryptoError, ValueError, TypeError, msgpack.ExtraData) as e:
            logger.warning(f"peer {j}'s shares do not open: {e}")
            return None
        if (group, round_no, sender, recipient) != (self.group_id, self.round_no, j, self.index):
            logger.warning(f"peer {j}'s shares are bound to another group, round or pair")
            return None
        if not (isinstance(s_share, bytes) and isinstance(b_share, bytes) and len(s_share) == len(b_share) == 66):
            return None
        return s_share, b_share

    def _mask_part(
        self, part: int, masked: np.ndarray, b_seed: bytes, pair_secrets: dict[int, bytes], rounding_seed: bytes
    ) -> None:
        """masked[part] = enc(omega * x) + PRG(b) + sum_j sign * PRG(s_ij), each mask keyed for this part."""
        start, stop = self.parts[part]
        words, values = masked[start:stop], self.values[start : min(stop, self.values.size)]
        seed = hashlib.blake2b(part.to_bytes(4, "little"), key=rounding_seed, digest_size=32).digest()
        self.codec.encode_into(values, self.omega, words[: values.size], seed=seed)
        if self.sent_error is not None:  # error feedback: what the encoded words fail to carry
            error = self.sent_error[start : start + values.size]
            self.codec.dequantize_into(words[: values.size], self.omega, error)
            np.subtract(values, error, out=error)
        if self.noise is not None:
            self.noise.add_to(words[: values.size], self.n, self.codec.scale)
        if stop > self.values.size:  # the part that carries the weight word
            words[-1] = self.codec.encode_weight(self.omega)
        apply_mask(words, self_mask_key(b_seed, self.group_id, self.round_no, part), 1)
        for j, shared in pair_secrets.items():
            low, high = min(j, self.index), max(j, self.index)
            apply_mask(
                words, pair_mask_key(shared, self.group_id, self.round_no, part, low, high), pair_sign(self.index, j)
            )

    def _unmask_partial(
        self,
        part: int,
        partial: np.ndarray,
        senders: list[int],
        seeds: dict[int, bytes],
        dropout_pairs: dict[tuple[int, int], bytes],
    ) -> None:
        """Remove from a partial sum of one part its senders' self masks and their masks with dropouts.

        Pairwise masks between contributors are left: they cancel only in the total over U.
        """
        for j in senders:
            apply_mask(partial, self_mask_key(seeds[j], self.group_id, self.round_no, part), -1)
        for (j, d), shared in dropout_pairs.items():
            if j in senders:
                key = pair_mask_key(shared, self.group_id, self.round_no, part, min(j, d), max(j, d))
                apply_mask(partial, key, -pair_sign(j, d))

    def _candidates(self, part: int, live: set[int]) -> list[int]:
        """Reducers that may hold ``part``: its owner first, then the others in ring order."""
        order = [(part + step) % self.n for step in range(self.n)]
        return [h for h in order if h in live and h in self.reducers and h not in self.dead]

    def _contributors(self, claims: dict[int, dict[str, Any]], live: set[int]) -> tuple[list[int], list[list[int]]]:
        """U (every part on a live holder, masks consistent) and [part, sender, holder] for each part of U."""
        u = {
            j
            for j, claim in claims.items()
            if all(claim["holders"][k] in live for k in self.reducers) and j in claim["maskset"]
        }
        while True:  # a contributor must have masked with every other contributor, and vice versa
            broken = sorted(j for j in u if not u <= set(claims[j]["maskset"]))
            if not broken:
                break
            u.discard(broken[-1])
        members = sorted(u)
        designation = [[k, j, claims[j]["holders"][k]] for k in self.reducers for j in members]
        return members, designation

    def _rebuild(self, shares: dict[int, bytes], kind: str, owner: int) -> bytes:
        count = len(shares)
        self._require(count >= self.threshold, f"{count} shares of peer {owner}'s {kind}, need {self.threshold}")
        chosen = dict(sorted(shares.items())[: self.threshold])
        try:
            secret = combine_secret(chosen)
        except ShareError as e:
            raise SecAggError(f"peer {owner}'s {kind} cannot be rebuilt: {e}") from e
        if kind == "b":
            ok = _commit(secret) == self._keys[owner]["b_commit"]
        else:
            ok = crypto_scalarmult_base(secret) == self._keys[owner]["s_pk"]
        self._require(ok, f"peer {owner}'s rebuilt {kind} does not match what it committed to")
        return secret


def _close_stream(opening: asyncio.Future[Any]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        opening.result()[2].close()


def _indices(data: dict[str, Any]) -> list[int]:
    """Every peer index a message's data names."""
    found: list[int] = []
    for key in ("view", "maskset", "u", "senders", "holders"):
        found += data.get(key, [])
    for key in ("b", "s"):
        found += list(data.get(key, {}))
    if "part" in data:
        found.append(data["part"])
    return found


def _commit(seed: bytes) -> bytes:
    return hashlib.blake2b(seed, digest_size=32, person=b"zen-b-commit").digest()

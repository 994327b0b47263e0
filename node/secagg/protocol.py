"""Masked butterfly all-reduce: secure aggregation (Bonawitz et al. 2017) without a server.

Each of the ``n`` peers of a group (formed by hivemind's matchmaking) encodes its weighted update
in Z_2^32 (``FixedPointCodec``), adds a self mask and one pairwise mask per peer, and sends part
``k`` of the masked vector to the reducer of part ``k``. Pairwise masks cancel coordinate by
coordinate, so sums of parts are sums of inputs once the self masks are removed; a reducer only
ever sees uniformly random words. Phases, each bounded by a timeout:

    keys     broadcast per-round X25519 keys (c: share encryption, s: mask agreement) and a
             commitment to the self-mask seed b, signed by the identity key bound to the PeerID
    shares   Shamir t-of-n shares of s_sk and b to every peer, boxed (X25519 + XSalsa20-Poly1305)
             under the c keys; a sender whose box does not open, or whose view of who sent keys
             differs, is left out of our maskset and blamed (it never enters U; see derive_contributors)
    parts    masked parts to reducers; a reducer that fails is replaced by the next live peer in
             ring order (the holder), so a dropout loses no part
    claims   two rounds: each peer announces which holder acknowledged each of its parts; after
             the first, parts held by peers that went silent are sent again
    agree    each peer derives the contributor set U from the claims (every part held by a live
             peer, no live peer blames it), signs U with a digest of everything the decode depends
             on (consistency.py); nothing is revealed before every live peer's signed statement
             matches ours and t signed it; those signatures are forwarded with the reveal
    reveal   survivors reveal shares of b_j for j in U and of s_sk_d for dropouts d, never both
             for one peer; a reveal whose signatures do not certify our U fails the round; each
             peer rebuilds the secrets it needs, checked against the keys and commitments (other
             t-subsets when one share is bad, whose holder is blamed: sharing.py)
    sums     each holder removes from its partial sums the self masks of their senders and their
             pairwise masks with dropouts (pairwise masks within U cancel only in the total, so a
             partial sum stays masked), and sends them to every peer; all swap digests of the total
             (a holder that sent different sums fails the round) and decode it, refused by all
             alike if its weight or values lie outside the honest range (bounds.py)

The threshold is ``t = n // 2 + 1``; U must count ``max(3, t)`` unblamed peers (a sum over two reveals both
inputs) and, under DP, the contributors the noise was sized for. A missing piece fails the round (``SecAggError``,
never a partial result); a peer leaving after its sums costs a message timeout, one leaving before fails it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
from hivemind.p2p import P2P, PeerID

from node.config import CompressionConfig
from node.secagg.bounds import check_group_sum
from node.secagg.compression import select_coordinates
from node.secagg.consistency import ContributorAgreement
from node.secagg.fixed_point import FixedPointCodec
from node.secagg.masking import add_masks, pair_secret, remove_masks
from node.secagg.messages import CLAIM_ATTEMPTS, NO_BOUND, Message
from node.secagg.parts import PartLayout, Workspace, split_parts
from node.secagg.ring import RingVector
from node.secagg.shamir import split_secret
from node.secagg.sharing import SharingError, box_shares, commit, gather_shares, open_shares, rebuild_secrets
from node.secagg.state import (
    RoundState,
    SecAggError,
    SecAggIdentity,
    SecAggResult,
    SecAggTimeouts,
    SumRefused,
    check_group,
    derive_contributors,
)
from node.secagg.transport import GroupTransport

if TYPE_CHECKING:
    from node.secagg.privacy import NoiseShare

logger = logging.getLogger(__name__)

ABORT_WAIT = 1.0  # seconds a failed peer spends telling the others it left


class MaskedAllReduce:
    """One peer's run of the masked all-reduce in one group.

    Args:
        p2p: the peer's libp2p client; messages go out as streams to ``handler_name``.
        handler_name: the protocol name every member's ``SecAggEndpoint`` serves.
        group_id: random per group (from matchmaking); binds every message to this all-reduce.
        peer_ids, index: the group in the agreed order, and this peer's position in it.
        round_no, identity: the outer round (bound into every message and mask key); what signs our messages.
        vector, omega: this peer's update (float32, flat) and its weight in (0, 1] (samples / weight bound).
        part_sizes: elements of the (vector + 1 weight word) each peer reduces; 0 = not a reducer.
        bound: the run-wide clip bound B of the fixed-point code.
        timeouts: per-phase waits.
        executor: runs encoding and masking off the event loop.
        out: float32 array (the vector's length) the mean is written into; may be ``vector`` itself.
        workspace: buffers to reuse across rounds.
        noise: this peer's share of the differential-privacy noise, added in the ring before masking.
        compression: low-bit words and random-k (compression.py; None: 32-bit words); with random-k,
            ``part_sizes`` split ``compression.count(vector.size) + 1`` elements.
        adaptive_bound: agree on the code's bound in the keys phase: each peer proposes the power of two at or
            above 3x its values' RMS, the group takes the largest, capped at ``bound`` (low-bit codes; a
            proposal reveals the order of magnitude of a peer's update).
        residual: for error feedback (float32, the vector's length): on success, what of ``vector`` the sum did not
            take (unselected coordinates, clipped excess, rounding error), to send again; untouched on failure.
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
        check_group(n, part_sizes, vector)
        # the group
        self.group_id, self.peer_ids, self.index, self.round_no = group_id, list(peer_ids), index, round_no
        self.identity, self.timeouts, self.executor = identity, timeouts, executor
        self.n, self.threshold = n, n // 2 + 1  # t = n // 2 + 1: shares needed to rebuild a secret
        self.minimum = max(3, self.threshold)  # the fewest contributors a sum may have
        self.reducers = [k for k, size in enumerate(part_sizes) if size > 0]  # peers that sum a part
        # this peer's update in the ring, and how the ring vector is cut and sent
        self.workspace = workspace or Workspace()
        self.compression = compression or CompressionConfig()
        self.ring = RingVector(
            vector=vector,
            omega=omega,
            codec=FixedPointCodec(group_size=n, bound=bound, bits=self.compression.bits),
            selected=select_coordinates(vector.size, self.compression.count(vector.size), group_id, round_no),
            workspace=self.workspace,
            out=np.empty_like(vector) if out is None else out,
            residual=residual,
            noise=noise,
        )
        self.adaptive_bound = adaptive_bound
        self.width = self.ring.codec.ring_bits  # bits per value word on the wire
        self.parts = split_parts(self.ring.values.size + 1, part_sizes)  # [start, stop) of each part
        self.layout = PartLayout(self.parts, self.ring.values.size, self.width, self.workspace)
        # messages and the round
        self.stats: dict[str, Any] = {"bytes_sent": 0, "bytes_by_kind": {}, "payload_bytes": 0, "messages_sent": 0}
        self.stats |= {"stream_retries": 0, "phases": []}
        self.transport = GroupTransport(
            p2p=p2p,
            handler_name=handler_name,
            group_id=group_id,
            round_no=round_no,
            peer_ids=self.peer_ids,
            index=index,
            sign=identity.sign,
            timeout=timeouts.message,
            layout=self.layout,
            stats=self.stats,
        )
        self.view: list[Message] | None = [] if record_view else None  # every message received, if recorded
        self._keys: dict[int, dict[str, Any]] = {}  # verified key adverts by sender (ours too, once sent)
        self.state = RoundState()  # what the phases carry from one to the next
        self.agreement = ContributorAgreement(  # the consistency step before any reveal
            transport=self.transport, threshold=self.threshold, sign=identity.sign, keys=self._keys, post=self._post
        )
        self._started: float | None = None  # perf_counter() at the first phase

    @property
    def codec(self) -> FixedPointCodec:
        """The group's code (with an adaptive bound: the one agreed in the keys phase)."""
        return self.ring.codec

    @property
    def selected(self) -> np.ndarray | None:
        """The coordinates this group sends (random-k), or None for all."""
        return self.ring.selected

    @property
    def noise(self) -> NoiseShare | None:
        """This peer's share of the differential-privacy noise (may be set before ``run``)."""
        return self.ring.noise

    @noise.setter
    def noise(self, share: NoiseShare | None) -> None:
        self.ring.noise = share

    # ------------------------------------------------------------------ receiving (for SecAggEndpoint)

    def check_header(self, message: Message, remote: PeerID, payload_size: int) -> None:
        """Refuse a message not meant for this all-reduce, before its payload is read."""
        self.transport.check(message, remote, payload_size)

    def payload_buffer(self, message: Message) -> np.ndarray:
        """Where a checked message's payload is read to (a reused buffer of the part's size)."""
        return self.layout.buffer(message.data["part"])

    def deliver(self, message: Message) -> None:
        """Store a checked message; a second message for the same slot is refused."""
        if not self.transport.accept(message):
            return  # the same signed message again (a retry after a broken stream): already have it
        if message.kind == "keys":
            self._keys[message.sender] = message.data
        if self.view is not None:
            self.view.append(message)

    def close(self) -> None:
        """End the round here: pending sends stop and later messages are refused."""
        self.transport.close()
        if self.view is None:
            self.workspace.reset()

    # ------------------------------------------------------------------ the protocol

    async def run(self) -> SecAggResult:
        try:
            return await self._run()
        except SecAggError as e:  # the others stop waiting for us now, not at their deadlines
            await self.transport.abort(str(e), min(ABORT_WAIT, self.timeouts.message), self.agreement.evidence())
            raise
        finally:
            self.close()  # a failed or cancelled peer stops sending

    async def _run(self) -> SecAggResult:
        """The phases in order (the module docstring says what each does); any may raise SecAggError."""
        state = self.state
        self._phase("keys")
        await self._exchange_keys(state)
        self._phase("shares")
        await self._share_secrets(state)
        self._phase("parts")
        await self._send_parts(state)
        self._phase("claims")
        await self._claim_parts(state)
        self._phase("agree")
        await self._agree_on_contributors(state)
        self._phase("reveal")
        await self._reveal_secrets(state)
        self._phase("sums")
        await self._exchange_sums(state)
        self._phase("decode")
        try:
            await self._offload(check_group_sum, state.total, self.codec, len(state.u), self.noise)
            weight_sum = await self._offload(self.ring.decode, state.total)
        except ValueError as e:
            raise SumRefused(f"group {self.group_id.hex()[:8]}: the unmasked sum does not decode: {e}") from e
        self._phase("done")
        return SecAggResult(mean=self.ring.out, contributors=tuple(state.u), weight_sum=weight_sum)

    async def _exchange_keys(self, state: RoundState) -> None:
        """keys: advertise our round keys and seed commitment; U1 = the peers whose keys arrived verified."""
        own_keys = {
            "c_pk": bytes(state.c_sk.public_key),
            "s_pk": bytes(state.s_sk.public_key),
            "b_commit": commit(state.b_seed),
            "signing_pk": self.identity.signing_public_key,
            "binding": self.identity.binding,
            "bound_exp": self.ring.propose_bound() if self.adaptive_bound else NO_BOUND,
        }
        self._keys[self.index] = own_keys
        await self._broadcast(range(self.n), "keys", lambda j: own_keys)  # acknowledged before any share is sent
        await self.transport.collect("keys", range(self.n), self.timeouts.message)
        state.u1 = sorted(self._keys)
        self._require(len(state.u1) >= self.minimum, f"only {len(state.u1)} peers sent keys")
        proposals = [self._keys[j]["bound_exp"] for j in state.u1 if self._keys[j]["bound_exp"] != NO_BOUND]
        if self.adaptive_bound and proposals:  # every member of u1 (checked in shares) derives the same bound
            self.ring.use_bound(min(self.codec.bound, 2.0 ** max(proposals)))

    async def _share_secrets(self, state: RoundState) -> None:
        """shares: box our shares of s_sk and b to each peer of U1; U2 = the peers whose shares opened."""
        me = self.index
        s_shares = split_secret(bytes(state.s_sk), self.threshold, self.n)
        b_shares = split_secret(state.b_seed, self.threshold, self.n)

        def boxed(j: int) -> dict[str, Any]:
            binding = (self.group_id, self.round_no, me, j)
            return {
                "view": state.u1,
                "box": box_shares(state.c_sk, self._keys[j]["c_pk"], binding, s_shares[j], b_shares[j]),
            }

        await self._broadcast(state.u1, "shares", boxed)
        state.held[me] = (s_shares[me], b_shares[me])
        for j, message in (await self.transport.collect("shares", state.u1, self.timeouts.message)).items():
            share = self._open_shares(state, j, message)
            if share is not None:
                state.held[j] = share
        state.u2 = sorted(state.held)  # a small U2 does not end the round: we stay, so that our blames count

    async def _send_parts(self, state: RoundState) -> None:
        """parts: encode and mask each part, and place it on its reducer (or the next live one)."""
        state.masked = self.workspace.array("masked", self.parts[-1][1])
        state.pair_secrets = {
            j: pair_secret(bytes(state.s_sk), self._keys[j]["s_pk"]) for j in state.u2 if j != self.index
        }
        state.holders = [-1] * self.n
        state.live = set(state.u1)  # claims go to and come from every peer that sent keys, blamed ones too
        placing = []
        order = sorted(self.reducers, key=lambda k: (k - self.index - 1) % self.n)  # peers start on different reducers
        for k in order:
            await self._offload(self._mask_part, k, state)
            placing.append(self.transport.spawn(self._place(state, k, state.live)))  # sent while the next is masked
        await asyncio.gather(*placing)

    async def _place(self, state: RoundState, part: int, live: set[int]) -> None:
        """Hand one of our parts to the first live candidate that acknowledges it; record it in ``holders``."""
        start, stop = self.parts[part]
        for h in self._candidates(part, live):
            if h == self.index:
                state.stored[(part, h)] = state.masked[start:stop]
                state.holders[part] = h
                return
            payload = self.layout.to_wire(state.masked[start:stop], part)
            if await self._send(h, "part", {"part": part, "maskset": state.u2}, payload, self.timeouts.data / 2):
                state.holders[part] = h
                return
        state.holders[part] = -1

    async def _claim_parts(self, state: RoundState) -> None:
        """claims: who holds what; parts on peers that went silent are placed again once."""
        for attempt in range(CLAIM_ATTEMPTS):
            own: dict[str, Any] = {"attempt": attempt, "holders": list(state.holders), "maskset": state.u2}
            self._post(state.live, "claim", own)
            got = await self.transport.collect("claim", state.live, self.timeouts.data, slot=attempt)
            state.live = {self.index} | set(got)
            state.claims = {j: m.data for j, m in got.items()} | {self.index: own}
            lost = [k for k in self.reducers if state.holders[k] not in state.live]
            if attempt + 1 < CLAIM_ATTEMPTS and lost:
                await asyncio.gather(*(self._place(state, k, state.live) for k in lost))

    async def _agree_on_contributors(self, state: RoundState) -> None:
        """agree: derive U from the claims, then the consistency step: t signatures on (U, digest), cross-checked."""
        found = derive_contributors(state.claims, state.live, self.reducers)
        state.u, state.designation = found.members, found.designation
        needed = self.noise.contributors_needed(self.n) if self.noise is not None else 0
        self._require(len(state.u) >= needed, f"U of {len(state.u)}: the DP noise was sized for {needed}")
        self._require(len(found.counted) >= self.minimum, f"only {len(found.counted)} unblamed contributors in U")
        state.dropped = sorted({d for j in state.u for d in state.claims[j]["maskset"]} - set(state.u))
        self._require(all(d in self._keys for d in state.dropped), "a contributor masked with a peer without keys")
        state.digest = self.agreement.digest(state.u, state.designation, state.dropped, self.codec.bound, self.width)
        await self.agreement.confirm(state.u, state.digest, state.live)

    async def _reveal_secrets(self, state: RoundState) -> None:
        """reveal: our shares of b_j for j in U and of s_sk_d for dropouts d; rebuild both from t shares."""
        # U is fixed and confirmed, so shares are revealed now; each holder then strips the masks
        # of the parts it holds (self masks of U, pairwise masks shared with dropouts) and sends
        # the clean partial sums, so the unmasking work is split n ways like the reduction
        me, u, held = self.index, state.u, state.held
        reveal = {
            "b": {j: held[j][1] for j in u if j in held},
            "s": {d: held[d][0] for d in state.dropped if d in held},
            **self.agreement.certificate,  # the t signatures on (U, digest) we hold, forwarded
        }
        state.revealing = self.transport.spawn(
            asyncio.gather(*(self._send(j, "reveal", reveal) for j in state.live if j != me))
        )
        need = self.threshold - 1
        while True:  # wait for more reveals until each secret rebuilds (a peer outside U may lack shares, one may lie)
            reveals = await self.transport.collect("reveal", state.live, self.timeouts.message, need=need)
            shares_b, shares_s = gather_shares(me, held, {j: m.data for j, m in reveals.items()}, u, state.dropped)
            rebuilt = await self._offload(rebuild_secrets, shares_b, shares_s, self.threshold, self._keys)
            if len(reveals) < need or not (rebuilt.failed or rebuilt.unsure):
                break
            need = len(reveals) + 1
        self.agreement.check_certificates(reveals, (u, state.digest))
        for kind, owner, holder in rebuilt.bad:  # our own share came straight from its owner's box
            state.bad_shares.append(culprit := owner if holder == me else holder)
            logger.warning(f"blamed peer {culprit} ({self.peer_ids[culprit]}): a share of peer {owner}'s {kind} is bad")
        self._require(not rebuilt.failed, f"secrets that do not rebuild: {rebuilt.failed}")
        state.seeds = rebuilt.seeds
        state.dropout_pairs = {
            (j, d): pair_secret(secret, self._keys[j]["s_pk"])
            for d, secret in rebuilt.s_keys.items()
            for j in u
            if d in state.claims[j]["maskset"]
        }

    async def _exchange_sums(self, state: RoundState) -> None:
        """sums: unmask and send the partial sums of the parts we hold; add everyone's into ``total``."""
        state.total = self.workspace.array("total", self.parts[-1][1])
        state.total.fill(0)
        expected: dict[tuple[int, int], list[int]] = {}  # (part, holder) -> senders summed there
        for part, sender, holder in state.designation:
            expected.setdefault((part, holder), []).append(sender)
        sends = []
        for (part, holder), senders in expected.items():
            if holder == self.index:
                sends += await self._sum_held_part(state, part, senders)
        sending = self.transport.spawn(asyncio.gather(*sends))
        for (part, holder), senders in expected.items():
            if holder != self.index:
                await self._add_partial_sum(state, part, holder, senders)
        await sending
        assert state.revealing is not None, "the reveal phase comes first"
        await state.revealing
        await self.agreement.confirm_total(state.live)

    async def _sum_held_part(self, state: RoundState, part: int, senders: list[int]) -> list[Coroutine[Any, Any, bool]]:
        """Sum the copies of ``part`` we hold, unmask it into ``total``; returns its sends to every live peer."""
        start, stop = self.parts[part]
        partial = self.workspace.take(stop - start)
        partial.fill(0)
        for sender in senders:
            words = state.stored.get((part, sender)) if sender == self.index else self._words("part", sender, part)
            if words is None:
                raise SecAggError(f"we acknowledged part {part} of peer {sender} but lost it")
            np.add(partial, words, out=partial)
        await self._offload(
            remove_masks, partial, senders, state.seeds, state.dropout_pairs, self.group_id, self.round_no, part
        )
        state.total[start:stop] += partial
        data = {"part": part, "senders": senders}
        payload = self.layout.to_wire(partial, part)
        return [self._send(j, "sum", data, payload, self.timeouts.data / 2) for j in state.live if j != self.index]

    async def _add_partial_sum(self, state: RoundState, part: int, holder: int, senders: list[int]) -> None:
        """Wait for the partial sum of ``part`` from its holder, check whom it sums, add it into ``total``."""
        partial_sum = (await self.transport.collect("sum", [holder], self.timeouts.data, slot=part)).get(holder)
        if partial_sum is None:
            raise SecAggError(f"no partial sum of part {part} from peer {holder}")
        self._require(partial_sum.data["senders"] == senders, f"peer {holder} summed part {part} over another set")
        start, stop = self.parts[part]
        words = self._words("sum", holder, part)
        assert words is not None, "collected just above"
        state.total[start:stop] += words

    # ------------------------------------------------------------------ sending

    async def _send(self, to: int, kind: str, data: dict[str, Any], payload: Any = b"", timeout: float = 0) -> bool:
        """Every message of the protocol leaves through here (tests override it to drop a peer midway)."""
        return await self.transport.send(to, kind, data, payload, timeout)

    async def _broadcast(self, to: Iterable[int], kind: str, make: Callable[[int], dict[str, Any]]) -> None:
        """Send to each peer and wait for every acknowledgement (or failure)."""
        await asyncio.gather(*(self._send(j, kind, make(j)) for j in to if j != self.index))

    def _post(self, to: Iterable[int], kind: str, data: dict[str, Any]) -> list[asyncio.Future[Any]]:
        """Send to each peer in the background: a peer that stalls must not hold up our next phase."""
        return [self.transport.spawn(self._send(j, kind, data)) for j in to if j != self.index]

    async def _offload(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def _phase(self, name: str) -> None:
        """Record when a phase starts; ``stats["phases"]`` holds (name, seconds since the start)."""
        if self.noise is not None:  # DP: a release needs a permit (checked at keys), counted at parts (privacy.py)
            self.noise.at_phase(name)
        now = time.perf_counter()
        if self._started is None:
            self._started = now
        self.stats["phases"].append((name, round(now - self._started, 4)))
        logger.debug(f"group {self.group_id.hex()[:8]} peer {self.index}: {name} at {now - self._started:.3f}s")

    def _require(self, ok: bool, reason: str) -> None:
        if not ok:
            raise SecAggError(f"group {self.group_id.hex()[:8]} round {self.round_no}: {reason}")

    def _words(self, kind: str, sender: int, part: int) -> np.ndarray | None:
        """A received part or partial sum as uint32 words (unpacked from its ``width``-bit wire form)."""
        message = self.transport.received(kind, sender, part)
        return None if message is None else self.layout.from_wire(message.payload, part)

    def _open_shares(self, state: RoundState, j: int, message: Message) -> tuple[bytes, bytes] | None:
        """Peer j's shares for us, if its view of U1 is ours and its box opens to shares bound to this pair."""
        if message.data["view"] != state.u1:
            logger.info(f"peer {j} saw keys from {message.data['view']}, we saw {state.u1}: left out")
            return None
        binding = (self.group_id, self.round_no, j, self.index)
        try:
            return open_shares(state.c_sk, self._keys[j]["c_pk"], message.data["box"], binding)
        except SharingError as e:  # the sender's fault: it is blamed, never us (we stay, and claim without it)
            state.blamed.append(j)
            logger.warning(f"blamed peer {j} ({self.peer_ids[j]}): its shares {e}; left out of U")
            return None

    def _mask_part(self, part: int, state: RoundState) -> None:
        """masked[part] = enc(omega * x) + PRG(b) + sum_j sign * PRG(s_ij), each mask keyed for this part."""
        start, stop = self.parts[part]
        words = state.masked[start:stop]
        seed = hashlib.blake2b(part.to_bytes(4, "little"), key=state.rounding_seed, digest_size=32).digest()
        self.ring.encode_part(words, start, stop, seed)
        add_masks(words, state.b_seed, state.pair_secrets, self.index, self.group_id, self.round_no, part)

    def _candidates(self, part: int, live: set[int]) -> list[int]:
        """Reducers that may hold ``part``: its owner first, then the others in ring order."""
        order = [(part + step) % self.n for step in range(self.n)]
        allowed = live & set(self.state.u2) & set(self.reducers) - self.transport.dead  # u2: never on a blamed peer
        return [h for h in order if h in allowed]

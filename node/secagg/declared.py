"""The DHT side of declared group formation (formation.py): commit, read, reveal, read, partition.

Runs in the averager's process, in place of hivemind's matchmaking, once per attempt of a round; an
attempt that yields no group returns None and hivemind's step tries again (the next slot) until the
round's timeout.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from typing import Any

from hivemind.averaging.group_info import GroupInfo
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

from node.secagg.formation import (
    MIN_SPAN_PATIENCE,
    SECRET_BYTES,
    SITTING_OUT,
    Commitment,
    DeclarationError,
    formation_seed,
    group_id_of,
    open_reveal,
    partition,
    read_commitments,
    seal_commitment,
    seal_reveal,
    slot_of,
    spans,
    split_partition,
)
from node.secagg.kept_group import gathered_cohort, gathered_data, gathered_round
from node.secagg.state import SecAggIdentity
from node.secagg.suspicion import asks_split, excluded, suspects_of

logger = logging.getLogger(__name__)

_ROUNDS_REMEMBERED = 4  # rounds whose withheld reveals are remembered
JOIN_MARGIN = 0.25  # in W: a slot another peer opened is joined while its boundary is at least this far
_SUBKEY = "by:"  # + the declarer's PeerID (a bare PeerID string would be checked as a peer record: dht/validator.py)


class DeclaredFormation:
    """One peer's declared group formation (formation.py's module docstring).

    Args:
        dht: the node's DHT (as the averager's process sees it).
        prefix: the run's averaging prefix; keys are ``{prefix}_form_{round}_{slot}_{commit|reveal}``.
        peer_id: this peer.
        identity: signs our declarations (its key is bound to ``peer_id``).
        window: W, the slot length (aggregation.matchmaking_time).
        min_size: the smallest group (aggregation.min_group_size); target: peers per group where enough declared.
        allowed: PeerIDs whose declarations count (aggregation.allowlist); empty: everyone's.
        patience: slots a cross-cohort ring waits for a second cohort (formation.py's ``span_patience``).
        serializer: hivemind's MSGPackSerializer (the gathered data's format).
    """

    def __init__(
        self,
        *,
        dht: Any,
        prefix: str,
        peer_id: PeerID,
        identity: SecAggIdentity,
        window: float,
        min_size: int,
        target: int,
        allowed: frozenset[PeerID],
        serializer: Any,
        patience: int = MIN_SPAN_PATIENCE,
    ):
        self.dht, self.prefix, self.me, self.identity = dht, prefix, str(peer_id), identity
        self.window, self.min_size, self.target, self.serializer = window, min_size, target, serializer
        self.allowed = frozenset(str(peer) for peer in allowed)
        self.patience = patience
        self.withheld: dict[int, set[str]] = {}  # round -> peers that committed and did not reveal
        self.waited: dict[int, int] = {}  # round -> slots we declined waiting for another cohort (``spans``)
        self.split_groups: deque[bytes] = deque(maxlen=_ROUNDS_REMEMBERED)  # ids of groups formed in a split slot

    async def form(self, data_for_gather: bytes) -> GroupInfo | None:
        """Our group for the round ``data_for_gather`` names, or None (too few declared, or a reveal withheld)."""
        round_no = gathered_round(data_for_gather, self.serializer)
        if round_no is None:
            return None
        slot = await self._slot(round_no)
        boundary, key = slot * self.window, f"{self.prefix}_form_{round_no}_{slot}"
        secret = os.urandom(SECRET_BYTES)
        signer = (self.identity.sign, self.identity.signing_public_key, self.identity.binding)
        waited = self.waited.get(round_no, 0)
        commitment = seal_commitment(self.me, round_no, slot, secret, data_for_gather, signer, waited)
        await self._store(f"{key}_commit", commitment, boundary)
        await _sleep_until(boundary)
        found = read_commitments(await self._read(f"{key}_commit"), round_no, slot, self.allowed)
        skipped = self.withheld.get(round_no, set())
        commitments = {p: c for p, c in found.items() if p not in skipped and self._gathers(c, round_no)}
        if self.me not in commitments:  # our own store may not be visible yet: we know what we declared
            commitments[self.me] = Commitment(self.me, round_no, slot, b"", data_for_gather, b"", waited)
        if len(commitments) < self.min_size:
            logger.info(f"round {round_no} slot {slot}: {len(commitments)} peers declared, fewer than {self.min_size}")
            return None
        if not self._spans(commitments, round_no):
            return None
        await self._store(f"{key}_reveal", seal_reveal(self.me, round_no, slot, secret, self.identity.sign), boundary)
        await _sleep_until(boundary + self.window / 2)
        secrets = self._secrets(await self._read(f"{key}_reveal"), commitments, round_no)
        if secrets is None:
            return None
        secrets[self.me] = secret
        seed = formation_seed(round_no, slot, secrets)
        declared, split = self._members(commitments, round_no, slot)
        if split:  # groups of min_size; too few for two and no suspect left out yet: some peers sit the round out
            groups, resting = split_partition(declared, seed, self.min_size, len(declared) < len(commitments))
        else:
            groups, resting = partition(declared, seed, self.min_size, self.target), []
        if self.me in resting:  # the group without us may tell who poisons
            logger.info(f"round {round_no} slot {slot}: we sit this split round out ({len(declared)} declared)")
            return GroupInfo(SITTING_OUT, (PeerID.from_base58(self.me),), (data_for_gather,))
        for index, members in enumerate(groups):
            if self.me in members:
                gathered = tuple(commitments[peer].gathered for peer in members)
                peers = tuple(PeerID.from_base58(peer) for peer in members)
                logger.info(f"round {round_no} slot {slot}: group {index}, {len(members)} of {len(secrets)} declared")
                if split:  # a split slot: the group runs one round, then everyone mixes again
                    self.split_groups.append(group_id_of(seed, index))
                return GroupInfo(group_id_of(seed, index), peers, gathered)
        return None

    def _members(self, commitments: dict[str, Commitment], round_no: int, slot: int) -> tuple[list[str], bool]:
        """The declared peers the slot partitions (those enough others name as suspects left out), and whether it
        is split into groups of ``min_size`` (a declarer rejected its last group's mean; suspicion.py)."""
        gathered = {peer: gathered_data(c.gathered, self.serializer) for peer, c in commitments.items()}
        for peer, votes in excluded({peer: suspects_of(data) for peer, data in gathered.items()}).items():
            who = "we are" if peer == self.me else f"{peer} is"
            logger.warning(
                f"round {round_no} slot {slot}: {who} left out of the groups: named a suspect by {votes} of the "
                f"{len(commitments)} declared peers (their gates rejected the groups it was in)"
            )
            del gathered[peer]
        split = any(asks_split(data) for data in gathered.values())
        return list(gathered), split

    async def _slot(self, round_no: int) -> int:
        """The slot to declare in: the first whose boundary is at least W/2 away (``slot_of``), or the one before
        it when that is still at least W/4 away and another peer already declared there for this round.

        A fixed grid alone puts two peers ready g apart in different slots with probability about g/W (one of
        them then misses the round); joining a slot someone opened keeps peers ready within W/4 of each other
        together. The W/4 left is the margin clocks and the DHT store have (formation.py). Another peer's
        commitment only moves us to an earlier slot; the groups still come from the seed nobody chose.
        """
        now = get_dht_time()
        later = slot_of(now, self.window)
        nearest = int((now + self.window * JOIN_MARGIN) // self.window) + 1
        if nearest == later:
            return later
        key = f"{self.prefix}_form_{round_no}_{nearest}_commit"
        opened = read_commitments(await self._read(key), round_no, nearest, self.allowed)
        still_open = nearest * self.window - get_dht_time() >= self.window * JOIN_MARGIN  # after the read too
        return nearest if still_open and any(peer != self.me for peer in opened) else later

    def _spans(self, commitments: dict[str, Commitment], round_no: int) -> bool:
        """Whether the slot's peers span two cohorts (formation.py's ``spans``); if not, we count a slot waited."""
        cohorts = [gathered_cohort(c.gathered, self.serializer) for c in commitments.values()]
        if spans(cohorts, (c.waited for c in commitments.values()), self.patience):
            return True
        self.waited[round_no] = self.waited.get(round_no, 0) + 1
        for old in sorted(self.waited)[:-_ROUNDS_REMEMBERED]:
            del self.waited[old]
        logger.info(f"round {round_no}: the {len(commitments)} peers declared are one cohort; waiting a slot for more")
        return False

    def _gathers(self, commitment: Commitment, round_no: int) -> bool:
        """Whether a commitment's gathered data is what a node gathers, for this round (else it is ignored)."""
        try:
            bandwidth, mode, user_bytes = self.serializer.loads(commitment.gathered)
            ok = isinstance(bandwidth, int | float | None) and isinstance(mode, int) and isinstance(user_bytes, bytes)
        except (TypeError, ValueError):
            ok = False
        if not ok or gathered_round(commitment.gathered, self.serializer) != round_no:
            logger.warning(f"ignored {commitment.peer_id[:16]}'s commitment: its gathered data is malformed")
            return False
        return True

    def _secrets(
        self, reveals: dict[str, Any], commitments: dict[str, Commitment], round_no: int
    ) -> dict[str, bytes] | None:
        """Every other committed peer's verified secret; None (and the silent ones remembered) if one is missing."""
        secrets, missing = {}, []
        for peer, commitment in commitments.items():
            if peer == self.me:
                continue
            try:
                secrets[peer] = open_reveal(reveals.get(peer), commitment)
            except DeclarationError as e:
                missing.append(peer)
                logger.warning(f"round {round_no}: {peer[:16]} committed and did not reveal ({e}); left out")
        if missing:
            self.withheld.setdefault(round_no, set()).update(missing)
            for old in sorted(self.withheld)[:-_ROUNDS_REMEMBERED]:
                del self.withheld[old]
            return None
        return secrets

    async def _store(self, key: str, value: bytes, boundary: float) -> None:
        expiration = boundary + 4 * self.window
        await self.dht.store(key, value, expiration_time=expiration, subkey=_SUBKEY + self.me, return_future=True)

    async def _read(self, key: str) -> dict[str, Any]:
        """``{subkey: value}`` stored under ``key`` (values unwrapped from their expirations)."""
        found = await self.dht.get(key, latest=True, return_future=True)
        if found is None or not isinstance(found.value, dict):
            return {}
        entries = found.value.items()
        return {k.removeprefix(_SUBKEY): e.value for k, e in entries if isinstance(k, str) and k.startswith(_SUBKEY)}


async def _sleep_until(when: float) -> None:
    delay = when - get_dht_time()
    if delay > 0:
        await asyncio.sleep(delay)

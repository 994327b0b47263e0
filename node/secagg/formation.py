"""Declared group formation: groups that no peer chooses (``aggregation.formation = "declared"``).

hivemind's matchmaking lets a leader pick its followers, so a leader with Sybils can form a group of
one victim and its Sybils, and a sum over that group, minus the Sybils' own inputs, is the victim's
update. Here no peer picks anyone: every peer ready for a round declares it, and every peer computes
the same partition of the declared peers from a seed that none of them knew when it declared.

Time is cut into slots of ``W`` seconds (``aggregation.matchmaking_time``) on the peers' clocks,
which must agree to well within ``W / 4``. For round ``r``, a peer ready at time ``t``:

1. **commits**: stores, under the key of (r, slot s) with its PeerID as subkey, a signed commitment
   ``H(secret)`` to 32 random bytes, with what it gathers for the group (bandwidth, mode, round); s is
   the first slot boundary at least ``W / 2`` away, or the one before it if that is still at least
   ``W / 4`` away and another peer has already committed there for round r (so that peers ready a
   little apart share a slot: a fixed grid alone splits two peers ready g apart with probability
   about g / W);
2. at the boundary ``s W``, **reads the commitments once**: that set ``V`` is fixed from then on, so a
   commitment stored later (by a peer that has seen others' secrets) is never counted;
3. **reveals**: stores its signed secret under the reveal key of (r, s);
4. at ``s W + W / 2`` reads the reveals. Every member of ``V`` must have revealed a secret matching its
   commitment; one that did not is left out of this round's later slots (a peer that withholds its
   secret to re-draw the partition can do so once per identity), and the slot is tried again.
   Otherwise the seed is ``H(r, s, sorted (PeerID, secret) of V)``; the members of ``V`` are ordered by
   ``H(seed, PeerID)`` and cut into ``len(V) // target`` groups of nearly equal size (``target`` =
   ``max(min_group_size, group_target)``), each at least ``target``; with fewer than
   ``min_group_size`` declared peers there is no group this slot.

The secrets are random and committed before any is revealed, so the seed is uniform to anyone who
commits; an attacker's only choices are which of its identities commit and, once, whether each
reveals. With S Sybils among M declared peers, the chance that a given victim's group of n holds
only Sybils besides it is C(S, n-1) / C(M-1, n-1) (about f^(n-1) for a Sybil fraction f): 2e-4
for f = 0.3, n = 8, and each withheld reveal buys one more draw. An allowlist
(``aggregation.allowlist``) leaves out everyone else's declarations.

What it does not give: peers whose views of ``V`` differ (a commitment stored right at the
boundary, seen by some and not others) derive different seeds and group ids, so that slot fails
for them (no message of one group is taken for another's) and they try the next; a Sybil that
does this every slot delays rounds, it cannot choose a group. Each declaration is bounded in size,
signed by the identity key bound to its PeerID (dht/identity.py), and checked before use; a
malformed one is logged and ignored.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import msgpack

from dht.envelope import check_signature, open_envelope, seal, verify_signature
from dht.wire import WireError, unpack_bounded

logger = logging.getLogger(__name__)

COMMIT_TAG = "zen-formation-commit/v2"
REVEAL_TAG = "zen-formation-reveal/v1"
SEED_TAG = b"zen-formation-seed/v1"
SECRET_BYTES = 32
MAX_DECLARATION_BYTES = 2048  # a commitment or reveal envelope, gathered data included
MAX_GATHERED_BYTES = 1024
MAX_DECLARED = 4096  # declarations read per slot; more are ignored (a flood cannot grow our memory)
GROUP_TARGET = 8  # peers per group where enough have declared (never below min_group_size)
SITTING_OUT = bytes(32)  # the group id of a peer's "group" of itself that sits a split round out (``split_partition``)
MIN_SPAN_PATIENCE = 2  # the fewest slots a cross-cohort ring waits for a second cohort (``span_patience``)
MAX_SPAN_PATIENCE = 8  # ... and the most (24 s at the default 3 s slots)
MAX_WAITED = 255  # the largest ``waited`` a commitment may carry


class DeclarationError(ValueError):
    """A commitment or reveal that is malformed, unsigned, or for another round or slot."""


@dataclass(frozen=True)
class Commitment:
    """A peer's signed declaration that it is ready for ``round_no`` in ``slot``."""

    peer_id: str
    round_no: int
    slot: int
    commit: bytes  # H(secret)
    gathered: bytes  # what matchmaking would gather from it (bandwidth, mode, its round)
    signing_key: bytes  # the key its reveal must verify under
    waited: int = 0  # slots of this round its peer already declined, waiting for another cohort (``spans``)


def slot_of(now: float, window: float) -> int:
    """The slot whose boundary (``slot * window``) is the first at least ``window / 2`` after ``now``."""
    return int((now + window / 2) // window) + 1


def commitment_of(secret: bytes) -> bytes:
    return hashlib.sha256(b"zen-formation-secret/v1" + secret).digest()


def seal_commitment(
    peer_id: str,
    round_no: int,
    slot: int,
    secret: bytes,
    gathered: bytes,
    signer: tuple[Callable[[bytes], bytes], bytes, bytes],
    waited: int = 0,
) -> bytes:
    """Our signed commitment; ``signer`` = (sign, signing key, binding of that key to ``peer_id``); ``waited``: the
    slots of this round we declined waiting for another cohort."""
    sign, signing_key, binding = signer
    body = msgpack.packb(
        [peer_id, round_no, slot, commitment_of(secret), gathered, signing_key, binding, min(waited, MAX_WAITED)],
        use_bin_type=True,
    )
    return seal(COMMIT_TAG, body, sign)


def seal_reveal(peer_id: str, round_no: int, slot: int, secret: bytes, sign: Callable[[bytes], bytes]) -> bytes:
    return seal(REVEAL_TAG, msgpack.packb([peer_id, round_no, slot, secret], use_bin_type=True), sign)


def _unpack(data: Any) -> Any:
    if not isinstance(data, bytes) or len(data) > MAX_DECLARATION_BYTES:
        raise DeclarationError(f"a declaration must be at most {MAX_DECLARATION_BYTES} bytes")
    try:
        return unpack_bounded(data, max_bytes=MAX_DECLARATION_BYTES, max_bin=MAX_DECLARATION_BYTES, max_array=8)
    except WireError as e:
        raise DeclarationError(f"undecodable declaration: {e}") from None


def open_commitment(data: Any, subkey: str, round_no: int, slot: int) -> Commitment:
    """The commitment stored under ``subkey`` for (round_no, slot), checked; DeclarationError if not valid."""
    body, signature = open_envelope(data, COMMIT_TAG, _unpack, DeclarationError, "commitment")
    fields = _unpack(body)
    if not (isinstance(fields, list) and len(fields) == 8):
        raise DeclarationError("a commitment has 8 fields")
    peer_id, their_round, their_slot, commit, gathered, signing_key, binding, waited = fields
    if peer_id != subkey:
        raise DeclarationError(f"a commitment for {peer_id!r} stored under {subkey!r}")
    if (their_round, their_slot) != (round_no, slot):
        raise DeclarationError(f"a commitment for round {their_round} slot {their_slot}, not {round_no}/{slot}")
    if not (_is_bytes(commit, 32) and _is_bytes(signing_key, 32) and _is_bytes(binding, 64)):
        raise DeclarationError("a commitment's hash, signing key or binding has the wrong size")
    if not isinstance(gathered, bytes) or len(gathered) > MAX_GATHERED_BYTES:
        raise DeclarationError(f"a commitment's gathered data must be at most {MAX_GATHERED_BYTES} bytes")
    if not (isinstance(waited, int) and 0 <= waited <= MAX_WAITED):
        raise DeclarationError(f"a commitment's waited count must be an integer in [0, {MAX_WAITED}]")
    check_signature(COMMIT_TAG, body, signature, (peer_id, signing_key, binding), DeclarationError, "commitment")
    return Commitment(peer_id, round_no, slot, commit, gathered, signing_key, waited)


def open_reveal(data: Any, commitment: Commitment) -> bytes:
    """The secret ``commitment``'s peer revealed, checked against its signature and commitment."""
    body, signature = open_envelope(data, REVEAL_TAG, _unpack, DeclarationError, "reveal")
    fields = _unpack(body)
    if not (isinstance(fields, list) and len(fields) == 4):
        raise DeclarationError("a reveal has 4 fields")
    peer_id, their_round, their_slot, secret = fields
    if [peer_id, their_round, their_slot] != [commitment.peer_id, commitment.round_no, commitment.slot]:
        raise DeclarationError("a reveal for another peer, round or slot")
    if not _is_bytes(secret, SECRET_BYTES) or commitment_of(secret) != commitment.commit:
        raise DeclarationError("a revealed secret that does not match its commitment")
    # under the key the commitment bound to the PeerID
    verify_signature(REVEAL_TAG, body, signature, commitment.signing_key, DeclarationError, "reveal")
    return secret


def _is_bytes(value: Any, size: int) -> bool:
    return isinstance(value, bytes) and len(value) == size


def formation_seed(round_no: int, slot: int, secrets: dict[str, bytes]) -> bytes:
    """H(round, slot, sorted (PeerID, secret)): the same for every peer that holds the same reveals."""
    body = msgpack.packb([round_no, slot, sorted(secrets.items())], use_bin_type=True)
    return hashlib.sha256(SEED_TAG + body).digest()


def partition(members: Iterable[str], seed: bytes, min_size: int, target: int = GROUP_TARGET) -> list[list[str]]:
    """The groups of ``members`` under ``seed``: ordered by H(seed, PeerID), cut into len // target groups of
    nearly equal size (each >= target = max(min_size, target)); [] with fewer than ``min_size`` members."""
    ordered = sorted(set(members), key=lambda peer: hashlib.sha256(seed + peer.encode()).digest())
    if len(ordered) < min_size:
        return []
    count = max(1, len(ordered) // max(min_size, target))
    size, extra = divmod(len(ordered), count)
    groups, start = [], 0
    for i in range(count):
        stop = start + size + (1 if i < extra else 0)
        groups.append(ordered[start:stop])
        start = stop
    return groups


def split_partition(
    members: Iterable[str], seed: bytes, min_size: int, found: bool = False
) -> tuple[list[list[str]], list[str]]:
    """A split slot's groups and the peers that sit its round out (suspicion.py): groups of ``min_size`` where
    the slot holds two or more; else one group, of the first ``min_size`` in seed order, and the others train
    alone this round, so that a slot too small for two groups still leaves a poisoner out of some of them.
    ``found``: a suspect is already left out of the slot; then nobody sits out (one group of all)."""
    groups = partition(members, seed, min_size, min_size)
    if len(groups) != 1 or found:
        return groups, []
    return [groups[0][:min_size]], groups[0][min_size:]


def span_patience(window: float, timeout: float) -> int:
    """Slots a cross-cohort ring waits for a second cohort: half the round's ``timeout`` (the other half is left to
    form and average), between ``MIN_SPAN_PATIENCE`` and ``MAX_SPAN_PATIENCE``; the same on every peer of the run
    (both come from its config)."""
    return max(MIN_SPAN_PATIENCE, min(MAX_SPAN_PATIENCE, int(timeout / 2 // window)))


def spans(cohorts: Iterable[tuple[str, int] | None], waited: Iterable[int], patience: int) -> bool:
    """Whether a slot's declared peers may form their groups now: they span two cohorts, or fewer are known to
    exist, or one of them has already waited ``patience`` slots (``span_patience``).

    ``cohorts`` holds each declared peer's (cohort id, cohorts it counts in the run), None for a peer that
    declared none (a run without cohorts, or a ring that is not cross-cohort). The cross-cohort ring of a run
    with cohorts exists to mix them; a slot holding one cohort only (done with its cohort ring a slot before
    the others, and big enough for a group alone) would mix nothing, so its peers wait for the next slot.
    Every member decides from the same commitments, so all of them wait or none does; a peer that lies about
    its cohort can delay a cross-cohort round by ``patience`` slots, or let one form unmixed (as before).
    """
    declared = list(cohorts)
    if any(entry is None or entry[1] < 2 for entry in declared):
        return True
    return len({entry[0] for entry in declared if entry is not None}) >= 2 or max(waited, default=0) >= patience


def group_id_of(seed: bytes, index: int) -> bytes:
    """The id of group ``index`` of the partition under ``seed`` (every member derives the same)."""
    return hashlib.sha256(seed + index.to_bytes(4, "big")).digest()


def read_commitments(
    found: dict[str, Any], round_no: int, slot: int, allowed: frozenset[str] = frozenset()
) -> dict[str, Commitment]:
    """The valid commitments among the DHT's ``{subkey: value}`` (at most MAX_DECLARED, allowlist applied)."""
    commitments = {}
    for subkey, value in sorted(found.items())[:MAX_DECLARED]:
        if allowed and subkey not in allowed:
            continue
        try:
            commitments[subkey] = open_commitment(value, subkey, round_no, slot)
        except DeclarationError as e:
            logger.warning(f"ignored a group-formation commitment stored as {str(subkey)[:64]!r}: {e}")
    return commitments

"""The records of the masked all-reduce: what a peer brings, carries from phase to phase, and gets.

``MaskedAllReduce`` (protocol.py) takes a ``SecAggIdentity`` and ``SecAggTimeouts``, runs the
phases in order over a ``RoundState``, and returns a ``SecAggResult`` or raises ``SecAggError``.
Each phase reads the state's fields that earlier phases set and sets its own, so what a phase
depends on is written here once rather than threaded through locals. Every field is declared
with its default, so a failed round leaves a state that is simply incomplete.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from nacl.public import PrivateKey

from node.secagg.messages import MAX_GROUP


class SecAggError(Exception):
    """The masked all-reduce of one group failed; nothing from it may be applied."""


class SumRefused(SecAggError):
    """The group's unmasked sum is outside what honest contributors can produce (node/secagg/bounds.py): every
    member holds the same sum and refuses it the same way, and a retry in this round would meet the same
    contributor, so the round ends here for the group instead of retrying until its timeout."""


REFUSED = "refused"  # the key of a step's result that ends with a refused sum (a PeerID is never this string)
MAX_REFUSAL = 300  # characters of the refusal kept in that result
REFUSED_GROUP = "refused_group"  # ... and the key of the refused group's PeerIDs (its members' suspicion.py verdict)
SAT_OUT = "sat_out"  # the key of a step's result for a peer that sat a split round out (formation.SITTING_OUT)


def refused_group(gathered: Any) -> list[str]:
    """The PeerIDs of the group whose sum a step's result refused ([] if it names none)."""
    peers = gathered.get(REFUSED_GROUP) if isinstance(gathered, dict) else None
    return [p for p in peers if isinstance(p, str)] if isinstance(peers, list) else []


def refusal_of(gathered: Any) -> str | None:
    """Why a step's result is a refused sum (``SumRefused``), or None if it is a group's gathered data."""
    reason = gathered.get(REFUSED) if isinstance(gathered, dict) else None
    return reason if isinstance(reason, str) else None


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


def _seed() -> bytes:
    return os.urandom(32)


@dataclass
class RoundState:
    """One peer's view of one round, filled in phase order (keys, shares, parts, claims, agree, reveal, sums)."""

    # keys: fresh per round, never reused
    c_sk: PrivateKey = field(default_factory=PrivateKey.generate)  # boxes the shares we send and receive
    s_sk: PrivateKey = field(default_factory=PrivateKey.generate)  # agrees one pairwise mask secret per peer
    b_seed: bytes = field(default_factory=_seed)  # seeds our self mask; only its commitment is sent
    u1: list[int] = field(default_factory=list)  # U1: peers whose keys arrived verified, us included
    # shares
    held: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # (s_sk, b) shares we hold, by owner
    u2: list[int] = field(default_factory=list)  # U2: peers whose shares opened consistently; our maskset
    blamed: list[int] = field(default_factory=list)  # senders whose box failed to open for us (left out of U2)
    # parts
    masked: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint32))  # our masked ring vector
    pair_secrets: dict[int, bytes] = field(default_factory=dict)  # X25519 secret shared with each peer of U2
    rounding_seed: bytes = field(default_factory=_seed)  # seeds the stochastic rounding of our encoding
    holders: list[int] = field(default_factory=list)  # part -> the peer that acknowledged it (-1: none)
    stored: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)  # (part, sender) -> words we hold
    # claims
    live: set[int] = field(default_factory=set)  # peers that answered the last claims, us included
    claims: dict[int, dict[str, Any]] = field(default_factory=dict)  # their last claim (holders, maskset)
    # agree
    u: list[int] = field(default_factory=list)  # U: the contributors, confirmed by the group
    designation: list[list[int]] = field(default_factory=list)  # [part, sender, holder] for each part of U
    dropped: list[int] = field(default_factory=list)  # peers a contributor masked with that are not in U
    digest: bytes = b""  # what the decode depends on (consistency.py), signed by at least t peers with U
    # reveal
    seeds: dict[int, bytes] = field(default_factory=dict)  # the rebuilt self-mask seed of each contributor
    dropout_pairs: dict[tuple[int, int], bytes] = field(default_factory=dict)  # (j in U, dropout d) -> s_jd
    # peers named for a share that did not fit its rebuilt secret: the revealer of a bad share, or the owner
    # whose own box to us held one (a revealer may also have been dealt a bad share by its owner)
    bad_shares: list[int] = field(default_factory=list)
    revealing: asyncio.Future[Any] | None = None  # our reveals, still in flight while sums go out
    # sums
    total: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint32))  # the group's unmasked sum


@dataclass(frozen=True)
class Contributors:
    """The contributor set U that ``derive_contributors`` finds, and how much of it counts."""

    members: list[int]  # U, sorted
    designation: list[list[int]]  # [part, sender, holder] for each part of U
    counted: list[int]  # U without the peers that left a live peer out of their maskset (see below)


def derive_contributors(claims: dict[int, dict[str, Any]], live: set[int], reducers: list[int]) -> Contributors:
    """U from the live peers' claims: every part on a live holder, and no live peer left it out of its maskset.

    A peer i whose maskset lacks a live peer j blames j (j's box did not open for i, or j's view of
    the keys differed): j is never in U, whoever is right. Nobody else can tell an honest blame from a
    false one, so i may stay in U (it masked with all of U) but does not count toward the minimum:
    colluders who blame honest peers to isolate a victim only remove themselves from the count, so
    a U of the victim and the colluders never counts t peers. Every live peer derives U from the
    same claims, so all derive the same U (the consistency step checks it).
    """
    blamed = {j for i, claim in claims.items() for j in claims if j != i and j not in claim["maskset"]}
    blamers = {i for i, claim in claims.items() if any(j != i and j not in claim["maskset"] for j in claims)}
    members = sorted(
        j
        for j, claim in claims.items()
        if j not in blamed and j in claim["maskset"] and all(claim["holders"][k] in live for k in reducers)
    )
    designation = [[k, j, claims[j]["holders"][k]] for k in reducers for j in members]
    return Contributors(members, designation, [j for j in members if j not in blamers])


def check_group(n: int, part_sizes: list[int], vector: np.ndarray) -> None:
    """Refuse a group too small to hide its inputs, or inputs not shaped for it."""
    if not 3 <= n <= MAX_GROUP:
        raise SecAggError(
            f"secure aggregation needs a group of 3 to {MAX_GROUP} peers, got {n}: "
            "a sum over two peers reveals each input to the other"
        )
    if len(part_sizes) != n or vector.dtype != np.float32 or vector.ndim != 1:
        raise ValueError("part_sizes needs one entry per peer and vector a flat float32 array")

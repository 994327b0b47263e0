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
    # reveal
    dropped: list[int] = field(default_factory=list)  # peers a contributor masked with that are not in U
    seeds: dict[int, bytes] = field(default_factory=dict)  # the rebuilt self-mask seed of each contributor
    dropout_pairs: dict[tuple[int, int], bytes] = field(default_factory=dict)  # (j in U, dropout d) -> s_jd
    revealing: asyncio.Future[Any] | None = None  # our reveals, still in flight while sums go out
    # sums
    total: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint32))  # the group's unmasked sum


def derive_contributors(
    claims: dict[int, dict[str, Any]], live: set[int], reducers: list[int]
) -> tuple[list[int], list[list[int]]]:
    """U (every part on a live holder, masks consistent) and [part, sender, holder] for each part of U.

    Every live peer derives U from the same claims, so all derive the same U (the agree phase checks it).
    """
    u = {
        j for j, claim in claims.items() if all(claim["holders"][k] in live for k in reducers) and j in claim["maskset"]
    }
    while True:  # a contributor must have masked with every other contributor, and vice versa
        broken = sorted(j for j in u if not u <= set(claims[j]["maskset"]))
        if not broken:
            break
        u.discard(broken[-1])
    members = sorted(u)
    designation = [[k, j, claims[j]["holders"][k]] for k in reducers for j in members]
    return members, designation

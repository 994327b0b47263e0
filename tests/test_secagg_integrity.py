"""What a deviating peer can do to the result of the masked all-reduce, and what every honest peer does about it.

Issue 14 (denial of service): a low-order X25519 key, a lying revealer. Issue 15 item 1 (bounded
influence): a forged weight word. Real peers on 127.0.0.1 and real crypto for the rounds; the
primitives underneath (subset reconstruction, the decode-side range check) are pinned directly.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from deviant_node import forging
from nacl.public import PrivateKey
from secagg_harness import (
    LOW_ORDER_POINT,
    MaliciousAllReduce,
    SecAggSwarm,
    aggregate_together,
    assert_same_or_none,
    deviating,
    module_swarm,
    off_by_one,
    random_inputs,
    results_of,
)

from node.aggregation.base import AloneThisRound
from node.aggregation.secure import SecureAggregator
from node.config import AggregationConfig, CompressionConfig
from node.secagg.bounds import InfluenceError, check_group_sum
from node.secagg.fixed_point import WEIGHT_FLOOR, FixedPointCodec
from node.secagg.masking import MaskError, pair_secret
from node.secagg.messages import Message, MessageError, parse_header
from node.secagg.privacy import NoiseShare
from node.secagg.protocol import MaskedAllReduce, SecAggError
from node.secagg.ring import RingVector
from node.secagg.shamir import split_secret
from node.secagg.sharing import SharingError, box_shares, commit, rebuild_secret
from node.secagg.state import SumRefused

NUMEL = 1501


swarm = module_swarm("integrity", 5)  # five real P2P peers shared by the module's tests


def inputs(n: int, seed: int, scale: float = 0.3) -> tuple[list[np.ndarray], list[float]]:
    return random_inputs(n, seed, NUMEL, scale)


# ---------------------------------------------------------------------------- reconstruction from other subsets


def b_keys(seed: bytes) -> dict[str, bytes]:
    return {"b_commit": commit(seed)}


@pytest.mark.parametrize(("n", "bad"), [(5, [1]), (5, [3]), (9, [1, 2]), (32, [3]), (32, [1, 17])])
def test_a_secret_rebuilds_from_another_subset_and_names_the_bad_shares(n: int, bad: list[int]) -> None:
    """Bad shares among the lowest t: another t-subset rebuilds the committed secret, and each bad x is named."""
    seed, threshold = os.urandom(32), n // 2 + 1
    shares = {x + 1: share for x, share in enumerate(split_secret(seed, threshold, n))}
    for x in bad:
        shares[x] = off_by_one(shares[x])

    rebuilt = rebuild_secret(shares, threshold, "b", b_keys(seed))

    assert rebuilt.secret == seed
    assert rebuilt.bad == bad and rebuilt.sure


def test_a_bad_share_outside_the_lowest_t_costs_nothing_and_is_not_checked() -> None:
    """The honest fast path: the lowest t shares rebuild the secret at the first try; the others are not read."""
    seed = os.urandom(32)
    shares = {x + 1: share for x, share in enumerate(split_secret(seed, 3, 5))}
    shares[5] = off_by_one(shares[5])

    rebuilt = rebuild_secret(shares, 3, "b", b_keys(seed))

    assert rebuilt.secret == seed
    assert rebuilt.bad == [] and rebuilt.sure


def test_bad_shares_past_the_decoding_radius_give_the_secret_but_name_nobody() -> None:
    """Two bad of eight (t = 5): the committed secret still rebuilds, but which shares are bad is not certain."""
    seed = os.urandom(32)
    shares = {x + 1: share for x, share in enumerate(split_secret(seed, 5, 8))}
    for x in (1, 2):
        shares[x] = off_by_one(shares[x])

    rebuilt = rebuild_secret(shares, 5, "b", b_keys(seed))

    assert rebuilt.secret == seed
    assert rebuilt.bad == [] and not rebuilt.sure


def test_an_s_key_rebuilds_past_a_bad_share_checked_against_its_public_key() -> None:
    """The mask-agreement key of a dropout: checked against its s_pk, rebuilt past one bad share."""
    s_sk = PrivateKey.generate()
    shares = {x + 1: share for x, share in enumerate(split_secret(bytes(s_sk), 3, 5))}
    shares[2] = off_by_one(shares[2])

    rebuilt = rebuild_secret(shares, 3, "s", {"s_pk": bytes(s_sk.public_key)})

    assert rebuilt.secret == bytes(s_sk)
    assert rebuilt.bad == [2]


def test_too_many_bad_shares_fail_within_the_subset_bound() -> None:
    """More bad shares than the others can outvote: a SharingError (a SecAggError) after at most the bounded tries."""
    seed = os.urandom(32)
    shares = {x + 1: share for x, share in enumerate(split_secret(seed, 17, 32))}
    for x in range(1, 17):  # 16 of 32 replaced by random field elements: no 17 good shares
        shares[x] = secrets.randbelow(1 << 520).to_bytes(66, "big")

    started = time.perf_counter()
    with pytest.raises(SharingError, match="from any of 600 subsets") as caught:
        rebuild_secret(shares, 17, "b", b_keys(seed))

    assert isinstance(caught.value, SecAggError)
    assert time.perf_counter() - started < 30  # a hang guard: 600 tries take well under a second


# ---------------------------------------------------------------------------- crypto errors are SecAggErrors


def test_low_order_keys_raise_secagg_errors_never_runtime_errors() -> None:
    """Agreement and boxing with a low-order point fail as SecAggError subclasses (nacl raises RuntimeError)."""
    own = PrivateKey.generate()
    with pytest.raises(MaskError) as agreement:
        pair_secret(bytes(own), LOW_ORDER_POINT)
    with pytest.raises(SharingError) as boxing:
        box_shares(own, bytes(32), (b"g", 1, 0, 1), bytes(66), bytes(66))

    assert isinstance(agreement.value, SecAggError) and isinstance(boxing.value, SecAggError)


def test_a_keys_message_with_a_low_order_key_is_refused_when_parsed() -> None:
    """A received keys advert with a low-order c or s key is malformed input: MessageError at parsing."""
    good = bytes(PrivateKey.generate().public_key)
    for c_pk, s_pk in ((LOW_ORDER_POINT, good), (good, bytes(32))):
        data = {
            "c_pk": c_pk,
            "s_pk": s_pk,
            "b_commit": bytes(32),
            "signing_pk": bytes(32),
            "binding": bytes(64),
            "bound_exp": -128,
        }
        header = Message("keys", b"g" * 32, 1, 0, 1, data).seal(lambda body: bytes(64))

        with pytest.raises(MessageError, match="low-order"):
            parse_header(header)


@pytest.mark.parametrize("targets", [(0, 2, 3, 4), (3,)])
def test_a_low_order_key_from_one_peer_ends_every_honest_peer_the_same_way(
    swarm: SecAggSwarm, targets: tuple[int, ...]
) -> None:
    """Low-order keys to every honest peer, or to one: the same result or a SecAggError, never another exception."""
    n, attacker, honest = 5, 1, [0, 2, 3, 4]
    vectors, weights = inputs(n, seed=7)
    sessions = swarm.sessions(vectors, weights, classes={attacker: deviating("LowOrder", low_order_keys_to=targets)})

    outcomes = swarm.run(sessions)

    results = assert_same_or_none(outcomes, honest)
    if len(targets) == len(honest):  # nobody honest took its keys: the others average without it
        assert len(results) == len(honest)
        assert attacker not in results[0].contributors


# ---------------------------------------------------------------------------- a lying revealer


class FirstLiar(MaliciousAllReduce):
    """Reveals off-by-one shares of every seed, and opens ``revealed`` once every peer acknowledged them."""

    corrupt_reveal = True
    revealed: asyncio.Event
    acknowledged = 0

    async def _send(self, to: int, kind: str, data: dict[str, Any], payload: Any = b"", timeout: float = 0) -> bool:
        delivered = await super()._send(to, kind, data, payload, timeout)
        if kind == "reveal":
            self.acknowledged += 1
            if self.acknowledged == self.n - 1:
                self.revealed.set()
        return delivered


class AfterTheLiar(MaskedAllReduce):
    """An honest peer whose reveals leave only once the liar's are in every inbox (so every peer sees them first)."""

    revealed: asyncio.Event

    async def _send(self, to: int, kind: str, data: dict[str, Any], payload: Any = b"", timeout: float = 0) -> bool:
        if kind == "reveal":
            await asyncio.wait_for(self.revealed.wait(), timeout=30)
        return await super()._send(to, kind, data, payload, timeout)


def test_a_corrupted_reveal_still_gives_every_honest_peer_the_same_result(swarm: SecAggSwarm) -> None:
    """One peer reveals off-by-one shares of every seed, first: every honest peer rebuilds past them and names it."""
    n, liar, honest = 5, 2, [0, 1, 3, 4]
    vectors, weights = inputs(n, seed=11)
    gate = swarm.call(make_event())
    classes: dict[int, type[MaskedAllReduce]] = {
        i: type(f"Peer{i}", (FirstLiar if i == liar else AfterTheLiar,), {"revealed": gate}) for i in range(n)
    }
    sessions = swarm.sessions(vectors, weights, classes=classes)

    outcomes = swarm.run(sessions)

    results = results_of(outcomes, honest)
    assert_same_or_none(outcomes, honest)
    assert results[0].contributors == tuple(range(n))
    for i in honest:
        assert set(sessions[i].state.bad_shares) == {liar}, f"peer {i} named {sessions[i].state.bad_shares}"


async def make_event() -> asyncio.Event:
    return asyncio.Event()


# ---------------------------------------------------------------------------- bounded influence at decode


def honest_words(n: int, weights: list[float], bound: float = 1.0) -> int:
    codec = FixedPointCodec(group_size=n, bound=bound)
    return sum(codec.encode_weight(w) for w in weights)


@pytest.mark.parametrize("forge", ["tiny", "at the floor", "beyond |U|"])
def test_a_forged_weight_word_is_rejected_by_every_member(swarm: SecAggSwarm, forge: str) -> None:
    """A weight word making the weight sum tiny (the mean explodes), floor-sized, or above |U|: no member decodes."""
    n, attacker, honest = 4, 3, [0, 1, 2]
    vectors, weights = inputs(n, seed=13)
    codec = FixedPointCodec(group_size=n, bound=1.0)
    others = honest_words(n, [weights[i] for i in honest])
    word = {
        "tiny": -others + 1,  # the attack: the weight sum decodes to 1 / weight_scale
        "at the floor": n * codec.encode_weight(WEIGHT_FLOOR) - others,  # passes the weight check, not the values'
        "beyond |U|": n * codec.encode_weight(1.0) - others + 1,
    }[forge]
    sessions = swarm.sessions(vectors, weights, classes={attacker: deviating("Forger", weight_word=word)})

    outcomes = swarm.run(sessions)

    for i in honest:
        assert isinstance(outcomes[i], SumRefused), f"honest peer {i} ended with {outcomes[i]!r}"
        assert "weight sum" in str(outcomes[i]) or "coordinate of its mean" in str(outcomes[i])


def test_a_refused_sum_ends_the_round_at_once_instead_of_retrying_until_the_timeout(
    swarm_factory: Callable[..., list[Any]],
) -> None:
    """Three real secure aggregators, one of whose averager (forked while the patch stood) forges its weight word:
    every retry of the round would meet it again, so each honest member ends the round with the refusal, raised as
    AloneThisRound: the trainer trains alone at once (before: hivemind retried until the round's timeout)."""
    peers = swarm_factory(3)
    config = AggregationConfig(min_group_size=3, matchmaking_time=1.0, timeout=60.0, formation="declared")
    template = [torch.zeros(40)]
    encode_part = RingVector.encode_part
    RingVector.encode_part = forging(encode_part)  # type: ignore[method-assign]
    try:  # the averager's process forks here and keeps the patch
        forger = SecureAggregator(peers[0].dht, "refused", template, config, peers[0].identity, weight_bound=16.0)
    finally:
        RingVector.encode_part = encode_part  # type: ignore[method-assign]
    honest = [SecureAggregator(p.dht, "refused", template, config, p.identity, weight_bound=16.0) for p in peers[1:]]
    try:
        outcomes = aggregate_together([forger, *honest], 1, [[torch.full((40,), 0.1)]] * 3, [8.0] * 3, True)
    finally:
        for aggregator in [forger, *honest]:
            aggregator.shutdown()
    for outcome in outcomes[1:]:
        assert isinstance(outcome, AloneThisRound) and "weight sum" in str(outcome), outcome


def test_honest_weights_below_the_floor_are_never_rejected(swarm: SecAggSwarm) -> None:
    """Peers with almost no samples count as the floor: the round decodes, within the clip bound."""
    n = 4
    vectors, _ = inputs(n, seed=17)
    weights = [1e-6, 1e-4, WEIGHT_FLOOR, 1e-9]

    outcomes = swarm.run(swarm.sessions(vectors, weights))

    results = results_of(outcomes, list(range(n)))
    assert_same_or_none(outcomes, list(range(n)))
    assert results[0].weight_sum == pytest.approx(n * WEIGHT_FLOOR, rel=1e-3)
    assert np.abs(results[0].mean).max() <= 1.0 + 1e-3


@pytest.mark.parametrize("bits", [32, 8, 4])
def test_honest_sums_at_the_extremes_pass_the_range_check(bits: int) -> None:
    """32 peers at +-B (weight 1, and weight at the floor) pass; one more step on one coordinate does not."""
    codec = FixedPointCodec(group_size=32, bound=2.0, bits=bits)
    for omega in (1.0, WEIGHT_FLOOR):
        for sign in (1.0, -1.0):
            encoded = np.empty(16, np.uint32)
            total = np.zeros(17, np.uint32)
            for _ in range(32):
                codec.encode_into(np.full(16, sign * 5.0, np.float32), omega, encoded)
                total[:-1] += encoded
                total[-1] += np.uint32(codec.encode_weight(omega))

            check_group_sum(total, codec, 32, None)

    forged = total.copy()  # the last sum: weight at the floor; one coordinate twice what 32 such encodings reach
    forged[0] = np.uint32(int(2 * 32 * WEIGHT_FLOOR * codec.bound * codec.scale) + 100)
    with pytest.raises(InfluenceError, match="coordinate of its mean"):
        check_group_sum(forged, FixedPointCodec(group_size=32, bound=2.0, bits=bits), 32, None)


def test_the_range_check_leaves_room_for_the_dp_noise() -> None:
    """Under DP the value limit grows by NOISE_SIGMAS standard deviations of the noise over U."""
    codec, share = (
        FixedPointCodec(group_size=4, bound=6.0),
        NoiseShare(noise_multiplier=1.0, clip_norm=0.5, max_dropouts=1),
    )
    total = np.zeros(101, np.uint32)
    total[-1] = np.uint32(4 * codec.encode_weight(0.25))  # a weight sum of 1
    noise_std = share.std(4) * codec.scale * 2  # four shares' noise in the sum, in ring units
    total[:-1] = np.uint32(int(codec.bound * codec.scale + 5 * noise_std))  # at B plus five sigmas of noise

    with pytest.raises(InfluenceError):
        check_group_sum(total, codec, 4, None)
    check_group_sum(total, codec, 4, share)


def test_low_bit_compression_keeps_the_weight_check() -> None:
    """With 8-bit values the weight word keeps its 32-bit code, and a forged one is still refused."""
    codec = FixedPointCodec(group_size=4, bound=1.0, bits=CompressionConfig(bits=8).bits)
    total = np.zeros(11, np.uint32)
    total[-1] = np.uint32(1)

    with pytest.raises(InfluenceError, match="weight sum"):
        check_group_sum(total, codec, 4, None)

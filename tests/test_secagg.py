"""The masked all-reduce between real libp2p peers on 127.0.0.1: exactness, privacy, dropouts, forgeries."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from nacl.signing import SigningKey
from scipy import stats
from secagg_harness import (
    TEST_TIMEOUTS,
    DroppingAllReduce,
    SecAggSwarm,
    contributors_mean,
    forged,
    header_of,
    results_of,
)

from node.secagg.fixed_point import FixedPointCodec
from node.secagg.masking import apply_mask, pair_mask_key, pair_secret, pair_sign
from node.secagg.protocol import MaskedAllReduce, SecAggError, SecAggResult
from node.secagg.shamir import combine_secret
from node.secagg.state import SecAggTimeouts

NUMEL = 3001  # elements per update (+1 weight word: parts of unequal size)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecAggSwarm]:
    """Eight real P2P peers shared by the module's tests (each test runs its own group)."""
    peers = SecAggSwarm(Path(tmp_path_factory.mktemp("secagg")), size=8)
    try:
        yield peers
    finally:
        peers.close()


def random_inputs(n: int, seed: int, scale: float = 0.3) -> tuple[list[np.ndarray], list[float]]:
    rng = np.random.default_rng(seed)
    vectors = [(rng.standard_normal(NUMEL) * scale).astype(np.float32) for _ in range(n)]
    weights = [float(w) for w in rng.uniform(0.2, 1.0, n)]
    return vectors, weights


def check_mean(result: SecAggResult, vectors: list[np.ndarray], weights: list[float], members: list[int]) -> None:
    """The result is the weighted mean over ``members`` within the codec's stated quantization bound."""
    exact = contributors_mean(vectors, weights, members, bound=1.0)
    codec = FixedPointCodec(group_size=len(vectors), bound=1.0)
    bound = codec.quantization_bound(sum(weights[j] for j in members), float(np.abs(exact).max()))
    assert list(result.contributors) == members
    assert np.abs(result.mean.astype(np.float64) - exact).max() <= bound


def test_masks_cancel_exactly_on_zero_inputs(swarm: SecAggSwarm) -> None:
    """With every input zero the masks cancel to an exactly zero mean, on every peer."""
    vectors = [np.zeros(NUMEL, np.float32) for _ in range(4)]

    outcomes = swarm.run(swarm.sessions(vectors))

    for result in results_of(outcomes, [0, 1, 2, 3]):
        assert result.contributors == (0, 1, 2, 3)
        assert np.count_nonzero(result.mean) == 0
        assert result.weight_sum == pytest.approx(4.0, abs=1e-6)


@pytest.mark.parametrize("n", [3, 5, 8])
def test_result_is_the_weighted_mean_within_the_quantization_bound(swarm: SecAggSwarm, n: int) -> None:
    """Random inputs and weights: every peer gets the same bits, within the bound of the plain weighted mean."""
    vectors, weights = random_inputs(n, seed=n)

    outcomes = swarm.run(swarm.sessions(vectors, weights))

    results = results_of(outcomes, list(range(n)))
    for result in results:
        check_mean(result, vectors, weights, list(range(n)))
        assert np.array_equal(result.mean, results[0].mean)


def test_a_group_of_two_is_refused(swarm: SecAggSwarm) -> None:
    """Secure mode refuses two peers: their sum would reveal each input to the other."""
    with pytest.raises(SecAggError, match="a sum over two peers reveals"):
        swarm.sessions([np.zeros(8, np.float32)] * 2)


def received_parts(session: MaskedAllReduce, sender: int) -> np.ndarray:
    assert session.view is not None
    parts = [m.payload for m in session.view if m.kind == "part" and m.sender == sender]
    assert parts, f"peer {session.index} recorded no part from peer {sender}"
    return np.concatenate([np.asarray(p, dtype=np.uint32).copy() for p in parts])


def test_reducer_view_is_uniform_and_independent_of_the_input(swarm: SecAggSwarm) -> None:
    """What a reducer receives is uniform on Z_2^32, and does not shift when a peer's input changes."""
    samples: dict[str, list[np.ndarray]] = {"zeros": [], "large": []}
    for run in range(3):
        for label, value in (("zeros", 0.0), ("large", 0.9)):
            vectors = [np.full(NUMEL, value, np.float32)] + random_inputs(2, seed=run)[0]
            sessions = swarm.sessions(vectors, record_view=True)
            results_of(swarm.run(sessions), [0, 1, 2])
            samples[label].append(received_parts(sessions[1], sender=0))
    zeros, large = np.concatenate(samples["zeros"]), np.concatenate(samples["large"])

    for words in (zeros, large):
        counts = np.bincount(words >> 24, minlength=256)  # top byte: 256 equiprobable cells if uniform
        assert stats.chisquare(counts).pvalue > 1e-4
    assert stats.ks_2samp(zeros, large).pvalue > 1e-4
    control = (np.full(NUMEL, 0.9, np.float32) * FixedPointCodec(3, 1.0).scale).astype(np.uint32)
    assert stats.ks_2samp(zeros, control).pvalue < 1e-10  # the test can tell unmasked values apart


DROP_PHASES = ["parts", "mid-parts", "decode"]
# Under load (CI's 2 shared cores) peer 0 once missed the others' shares inside the 5 s message window and
# blamed both ("only 0 unblamed contributors in U"). A drop before the sums is noticed by the data timeout
# and never waits out a message timeout, so these rounds get a longer one at no cost; a drop at "decode"
# is waited for once in the confirmation (a message timeout), so it keeps the harness's 5 s.
PATIENT = SecAggTimeouts(message=15.0, data=20.0)


def drop_timeouts(phase: str) -> SecAggTimeouts:
    return TEST_TIMEOUTS if phase == "decode" else PATIENT


@pytest.mark.parametrize("phase", DROP_PHASES)
@pytest.mark.parametrize(("n", "dropped"), [(4, [2]), (8, [1, 4, 6])])
def test_survivors_get_the_mean_over_u_when_peers_drop(
    swarm: SecAggSwarm, n: int, dropped: list[int], phase: str
) -> None:
    """1 of 4, and floor((n-1)/2) of 8 peers leave at each phase; the others agree on U and get its mean."""
    vectors, weights = random_inputs(n, seed=len(dropped) * 10 + DROP_PHASES.index(phase))
    classes: dict[int, type[MaskedAllReduce]] = {}
    for j in dropped:
        classes[j] = type(f"Drop{j}", (DroppingAllReduce,), {"drop_at": phase})
    survivors = [i for i in range(n) if i not in dropped]

    sessions = swarm.sessions(vectors, weights, classes=classes, record_view=True, timeouts=drop_timeouts(phase))
    outcomes = swarm.run(sessions)

    results = results_of(outcomes, survivors)
    members = list(results[0].contributors)
    expected_members = list(range(n)) if phase == "decode" else survivors  # at "decode" their inputs were in
    assert members == expected_members
    for result in results:
        check_mean(result, vectors, weights, members)
        assert np.array_equal(result.mean, results[0].mean)


def test_no_single_view_reconstructs_a_dropped_peers_input(swarm: SecAggSwarm) -> None:
    """A reducer holding a dropout's part learns its mask key, never its self-mask seed: the part stays masked."""
    n, dropper, reducer = 4, 3, 0
    vectors, weights = random_inputs(n, seed=99, scale=0.5)
    classes: dict[int, type[MaskedAllReduce]] = {dropper: type("Drop", (DroppingAllReduce,), {"drop_at": "mid-parts"})}
    sessions = swarm.sessions(vectors, weights, classes=classes, record_view=True, timeouts=PATIENT)
    outcomes = swarm.run(sessions)
    results_of(outcomes, [0, 1, 2])
    views = {i: sessions[i].view or [] for i in range(n)}
    threshold = sessions[0].threshold

    # no view ever holds t shares of both secrets of one peer
    for i in range(3):
        for j in range(n):
            if i == j:
                continue
            reveals = [m for m in views[i] if m.kind == "reveal"]
            b_count = 1 + sum(j in m.data["b"] for m in reveals)
            s_count = 1 + sum(j in m.data["s"] for m in reveals)
            assert b_count < threshold or s_count < threshold, f"peer {i} could rebuild both secrets of {j}"

    # the reducer that holds the dropout's part strips every mask it can and still sees noise
    part_messages = [m for m in views[reducer] if m.kind == "part" and m.sender == dropper]
    assert part_messages, "the dropout sent its first part to this reducer"
    message = part_messages[0]
    part = message.data["part"]
    s_shares = {reducer + 1: sessions[reducer].state.held[dropper][0]}
    for m in views[reducer]:
        if m.kind == "reveal" and dropper in m.data["s"]:
            s_shares[m.sender + 1] = m.data["s"][dropper]
    secret = combine_secret(dict(list(s_shares.items())[:threshold]))
    keys = sessions[reducer]._keys
    residual = np.asarray(message.payload, dtype=np.uint32).copy()
    for j in message.data["maskset"]:
        if j != dropper:
            shared = pair_secret(secret, keys[j]["s_pk"])
            key = pair_mask_key(shared, message.group, message.round, part, min(j, dropper), max(j, dropper))
            apply_mask(residual, key, -pair_sign(dropper, j))
    start, stop = sessions[reducer].parts[part]
    codec = FixedPointCodec(n, 1.0)
    encoded = np.round(np.clip(vectors[dropper][start:stop].astype(np.float64), -1, 1) * weights[dropper] * codec.scale)
    distance = np.abs(residual[: encoded.size].view(np.int32).astype(np.int64) - encoded.astype(np.int64))
    assert np.mean(distance < 1 << 20) < 0.01  # what is left is masked by the self mask

    # control: with the self-mask seed (which no single view holds), the input would come out
    b_shares = {i + 1: sessions[i].state.held[dropper][1] for i in range(threshold)}
    seed = combine_secret(b_shares)
    from node.secagg.masking import self_mask_key

    apply_mask(residual, self_mask_key(seed, message.group, message.round, part), -1)
    distance = np.abs(residual[: encoded.size].view(np.int32).astype(np.int64) - encoded.astype(np.int64))
    assert distance.max() <= 1


def test_forged_replayed_oversized_and_misaddressed_messages_are_refused(swarm: SecAggSwarm) -> None:
    """Each bad message is refused with its reason, and the honest round still completes."""
    earlier = swarm.sessions(random_inputs(3, seed=5)[0], round_no=6, record_view=True)
    results_of(swarm.run(earlier), [0, 1, 2])
    recorded = next(m for m in earlier[0].view or [] if m.kind == "claim" and m.sender == 1)
    vectors, weights = random_inputs(3, seed=6)
    sessions = swarm.sessions(vectors, weights, round_no=7)
    current = sessions[0].group_id
    stranger = SigningKey.generate()

    replies = {
        "replayed": swarm.send_raw(1, 0, header_of(recorded)),
        "forged": swarm.send_raw(1, 0, forged(recorded, lambda b: stranger.sign(b).signature, group=current, round=7)),
        "wrong group": swarm.send_raw(1, 0, forged(recorded, swarm.identities[1].sign, group=b"x" * 32, round=7)),
        "oversized": swarm.send_raw(1, 0, b"\x00" * (64 * 1024 + 1)),
        "impostor": swarm.send_raw(5, 0, forged(recorded, swarm.identities[5].sign, group=current, round=7)),
    }
    outcomes = swarm.run(sessions)

    assert not any(ok for ok, _ in replies.values())
    assert "finished" in replies["replayed"][1] or "wrong group" in replies["replayed"][1]
    assert "keys" in replies["forged"][1] or "signature" in replies["forged"][1]
    assert "wrong group" in replies["wrong group"][1]
    assert "oversized" in replies["oversized"][1] or "header" in replies["oversized"][1]
    assert "not the stream's peer" in replies["impostor"][1]
    for result in results_of(outcomes, [0, 1, 2]):
        check_mean(result, vectors, weights, [0, 1, 2])


def test_a_forged_signature_mid_round_is_refused(swarm: SecAggSwarm) -> None:
    """Once a peer's key is known, a message in its name signed by another key is refused for the signature."""
    vectors, weights = random_inputs(3, seed=8)
    sessions = swarm.sessions(vectors, weights, round_no=9, record_view=True)
    results_of(swarm.run(sessions), [0, 1, 2])
    keys_message = next(m for m in sessions[0].view or [] if m.kind == "keys" and m.sender == 1)
    again = swarm.sessions(vectors, weights, round_no=9, group_id=sessions[0].group_id)
    again[0].deliver(keys_message)  # peer 1's verified key is known to peer 0
    stranger = SigningKey.generate()
    claim = next(m for m in sessions[0].view or [] if m.kind == "claim" and m.sender == 1)

    ok, reason = swarm.send_raw(1, 0, forged(claim, lambda b: stranger.sign(b).signature, data=dict(claim.data)))

    for endpoint, session in zip(swarm.endpoints, again, strict=False):
        endpoint.unregister(session)
    assert not ok and "bad signature" in reason


def test_a_tampered_payload_is_refused(swarm: SecAggSwarm) -> None:
    """A part whose bytes differ from its signed digest is refused."""
    vectors, weights = random_inputs(3, seed=10)
    sessions = swarm.sessions(vectors, weights, round_no=11, record_view=True)
    results_of(swarm.run(sessions), [0, 1, 2])
    part = next(m for m in sessions[0].view or [] if m.kind == "part")
    again = swarm.sessions(vectors, weights, round_no=11, group_id=sessions[0].group_id)
    keys = next(m for m in sessions[0].view or [] if m.kind == "keys" and m.sender == part.sender)
    again[0].deliver(keys)
    payload = bytearray(np.asarray(part.payload, dtype=np.uint32).tobytes())
    payload[0] ^= 1

    ok, reason = swarm.send_raw(part.sender, 0, header_of(part), bytes(payload))

    for endpoint, session in zip(swarm.endpoints, again, strict=False):
        endpoint.unregister(session)
    assert not ok and "digest" in reason

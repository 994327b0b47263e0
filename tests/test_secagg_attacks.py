"""Colluding peers that deviate from the masked all-reduce on purpose (real peers on 127.0.0.1, real crypto).

Each test runs one attack from issue 14 and pins what must hold whatever the colluders do: the
victim's input cannot be recovered (the test tries the subtraction and it fails, or the round ends
before any reveal), no honest peer's two secrets both reach the colluders, and every honest peer
ends with the same result or none.
"""

from __future__ import annotations

import numpy as np
import pytest
from secagg_harness import (
    DroppingAllReduce,
    SecAggSwarm,
    assert_same_or_none,
    colluders_can_unmask,
    deviating,
    module_swarm,
    random_inputs,
)

from node.config import CompressionConfig
from node.secagg.fixed_point import FixedPointCodec
from node.secagg.privacy import NoiseShare
from node.secagg.protocol import MaskedAllReduce, SecAggError, SecAggResult

NUMEL = 2001


swarm = module_swarm("attacks", 5)  # five real P2P peers shared by the module's tests


def inputs(n: int, seed: int, scale: float = 0.3) -> tuple[list[np.ndarray], list[float]]:
    return random_inputs(n, seed, NUMEL, scale)


def recovered_input(
    result: SecAggResult, vectors: list[np.ndarray], weights: list[float], colluders: list[int]
) -> np.ndarray:
    """What colluders get for the rest of U: the sum minus their own weighted inputs."""
    total = result.mean.astype(np.float64) * result.weight_sum
    for m in colluders:
        if m in result.contributors:
            total -= weights[m] * np.clip(vectors[m].astype(np.float64), -1, 1)
    return total


def revealed_anything(sessions: list[MaskedAllReduce], honest: list[int]) -> bool:
    return any(m.kind == "reveal" and m.sender in honest for s in sessions for m in s.view or [])


@pytest.mark.parametrize(("n", "honest"), [(5, [3, 4]), (4, [3])])
def test_colluders_below_the_threshold_cannot_unmask_a_chosen_peer(
    swarm: SecAggSwarm, n: int, honest: list[int]
) -> None:
    """Bad boxes to the honest peers and a claimed maskset {colluders, victim} do not isolate the victim."""
    victim, colluders = 0, [1, 2]
    vectors, weights = inputs(n, seed=n)
    attacker = deviating("Isolate", bad_box_to=tuple(honest), claim_maskset=(victim, *colluders))
    sessions = swarm.sessions(vectors, weights, classes=dict.fromkeys(colluders, attacker), record_view=True)

    outcomes = swarm.run(sessions)

    exact = weights[victim] * np.clip(vectors[victim].astype(np.float64), -1, 1)
    tolerance = 4 * n / FixedPointCodec(n, 1.0).scale
    for m in colluders:
        outcome = outcomes[m]
        if isinstance(outcome, SecAggResult):
            leaked = recovered_input(outcome, vectors, weights, colluders)
            assert np.abs(leaked - exact).max() > 100 * tolerance, f"colluder {m} recovered the victim's input"
    assert not colluders_can_unmask(sessions, colluders, [victim, *honest])
    assert_same_or_none(outcomes, [victim, *honest])
    if not any(isinstance(outcomes[i], SecAggResult) for i in [victim, *honest]):
        assert not revealed_anything(sessions, [victim, *honest]), "the round failed after honest peers revealed"
    for i in honest:  # the receivers of the bad boxes blame the senders, by PeerID
        assert set(sessions[i].state.blamed) >= set(colluders)


def test_a_bad_box_from_one_peer_is_blamed_on_its_sender(swarm: SecAggSwarm) -> None:
    """One peer's bad box to one honest peer: the others finish, and the receiver blames the sender."""
    n, sender, receiver = 5, 4, 1
    vectors, weights = inputs(n, seed=21)
    sessions = swarm.sessions(vectors, weights, classes={sender: deviating("BadBox", bad_box_to=(receiver,))})

    outcomes = swarm.run(sessions)

    assert sender in sessions[receiver].state.blamed
    assert_same_or_none(outcomes, [0, 1, 2, 3])
    assert all(isinstance(outcomes[i], SecAggResult) for i in [0, 1, 2, 3])
    result = outcomes[0]
    assert isinstance(result, SecAggResult)
    assert sender not in result.contributors


def test_equivocating_claims_never_reveal_for_two_contributor_sets(swarm: SecAggSwarm) -> None:
    """A colluder claims different masksets to different honest peers: no two honest peers reveal for different U."""
    n, colluders, honest = 5, [1, 2], [0, 3, 4]
    vectors, weights = inputs(n, seed=31)
    split = {3: (0, 1, 2, 4), 4: (0, 1, 2, 3)}  # to peer 3: "I did not mask with 3"; to 4: "not with 4"
    attacker = deviating("Equivocate", claim_to=split)
    sessions = swarm.sessions(vectors, weights, classes={1: attacker, 2: attacker}, record_view=True)

    outcomes = swarm.run(sessions)

    revealed_for = {tuple(sessions[i].state.u) for i in honest if "reveal" in dict(sessions[i].stats["phases"])}
    assert len(revealed_for) <= 1, f"honest peers revealed for different contributor sets {revealed_for}"
    assert not colluders_can_unmask(sessions, colluders, honest)
    assert_same_or_none(outcomes, honest)
    # the targets abort with their evidence, which proves both colluders signed two claims: nobody reveals
    assert not revealed_anything(sessions, honest), "an honest peer revealed while the targets aborted"
    assert named_by(sessions, honest) == set(colluders)


def named_by(sessions: list[MaskedAllReduce], honest: list[int]) -> set[int]:
    """The peers the honest sessions proved to have equivocated."""
    return {j for i in honest for j in sessions[i].agreement.proven}


def test_an_equivocated_code_bound_aborts_before_any_reveal(swarm: SecAggSwarm) -> None:
    """A colluder proposes different code bounds to different peers: honest peers never decode different means."""
    n, honest = 4, [0, 2, 3]
    vectors, weights = inputs(n, seed=41, scale=0.01)
    attacker = deviating("TwoBounds", bound_exp_to={2: -1})  # 0.5 to peer 2; the others agree on about 0.03
    sessions = swarm.sessions(
        vectors,
        weights,
        classes={1: attacker},
        compression=CompressionConfig(bits=8),
        adaptive_bound=True,
        record_view=True,
    )

    outcomes = swarm.run(sessions)

    assert_same_or_none(outcomes, honest)
    assert not any(isinstance(outcomes[i], SecAggResult) for i in honest)
    assert not revealed_anything(sessions, honest)
    assert named_by(sessions, honest) == {1}  # the liar alone, proven by its two signed keys messages
    for i in honest:  # no honest peer's error names another honest peer
        assert not any(str(swarm.p2ps[j].peer_id) in str(outcomes[i]) for j in honest), outcomes[i]


def test_a_contributor_set_below_the_noise_sizing_aborts_before_reveal(swarm: SecAggSwarm) -> None:
    """DP shares sized for n - max_dropouts: a U smaller than that (two of five gone) never reaches reveal."""
    n, share = 5, NoiseShare(noise_multiplier=0.5, clip_norm=0.5, max_dropouts=1)
    vectors, weights = inputs(n, seed=51)
    gone = type("Gone", (DroppingAllReduce,), {"drop_at": "parts"})  # leaves after sharing its secrets
    sessions = swarm.sessions(vectors, weights, bound=2.0, record_view=True, classes={3: gone, 4: gone})
    for session in sessions:  # U = {0, 1, 2}: three of the four shares the noise was sized for
        session.noise = share

    outcomes = swarm.run(sessions)

    assert share.contributors_needed(n) == 4
    assert all(isinstance(outcomes[i], SecAggError) for i in (0, 1, 2))
    assert "noise" in str(outcomes[0])
    assert not revealed_anything(sessions, [0, 1, 2])

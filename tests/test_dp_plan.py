"""A sigma derived from target_epsilon makes exactly its planned releases (or steps), and never spends above it.

User level: sigma is calibrated over ``planned_releases`` (R, or R + R // global_every with cohorts) for the
multiplier the accountant charges (``accounted_multiplier``: sigma shrunk by the ring's rounding), so the budget
permits every planned release and refuses the next. Calibrating sigma itself left the accountant's multiplier a
hair smaller and stopped one release short (epsilon 8 over 10 rounds: 9 releases, issues 16 and 18). The rings
here are stand-ins that go through the masked all-reduce's DP hooks; record level runs the trainer's phases
with a stand-in DP-SGD step (the accountant and its plan are real).
"""

from __future__ import annotations

import pytest
import torch
from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent
from dp_accounting.pld import pld_privacy_accountant

from node.config import ConfigError, RunConfig, load_node_config
from node.data import generate_corpus
from node.model import build_model
from node.secagg.privacy import VALUE_DISCRETIZATION, NoiseShare, ReleaseRefused, calibrate_noise_multiplier
from node.training.privacy import (
    TrainerPrivacy,
    accounted_multiplier,
    planned_releases,
    setup_privacy,
    user_noise_multiplier,
)

DELTA = 1e-5
DEFAULT_PARAMETERS = 120_576  # the default model (ModelConfig())


def user_run(rounds: int, every: int, group: int, dropouts: int, epsilon: float, bits: int = 32) -> RunConfig:
    """A user-level DP run whose sigma is derived from ``epsilon`` over ``rounds`` (cohorts when ``every``)."""
    overrides: dict[str, object] = {
        "run.privacy.enabled": True,
        "run.privacy.level": "user",
        "run.privacy.target_epsilon": epsilon,
        "run.privacy.planned_rounds": rounds,
        "run.privacy.max_dropouts": dropouts,
        "run.privacy.allow_noisy": True,
        "run.aggregation.min_group_size": group,
        "run.compression.bits": bits,
    }
    if every:
        overrides |= {"run.cohorts.enabled": True, "run.cohorts.global_every": every}
    return load_node_config(None, overrides).run


def release_rounds(privacy: TrainerPrivacy, noise: NoiseShare, every: int, rounds: int) -> list[int]:
    """The trainer's rounds as far as DP goes (launch: clip and permit; each ring that runs takes its release
    at the masked all-reduce's hooks; landed: count): the releases counted at each round."""
    counted = []
    for round_no in range(1, rounds + 1):
        before = privacy.spent
        if privacy.launch([torch.full((4,), 0.1)]):
            rings = [0, 1] if every and round_no % every == 0 else [0]
            for ring in rings:
                share = NoiseShare(noise.noise_multiplier, noise.clip_norm, noise.max_dropouts, noise.ledger, ring)
                try:
                    share.at_phase("keys")
                    share.at_phase("parts")
                except ReleaseRefused:
                    pass
        privacy.landed()
        counted.append(privacy.spent - before)
    return counted


CASES = [  # rounds, global_every (0: no cohorts), min_group_size, max_dropouts, target epsilon, parameters, bits
    pytest.param(10, 0, 3, 1, 8.0, DEFAULT_PARAMETERS, 32, id="issue-eps8-10-rounds"),
    pytest.param(20, 0, 8, 3, 2.0, 5_000, 32, id="eps2-20-rounds-t3"),
    pytest.param(10, 2, 3, 0, 8.0, DEFAULT_PARAMETERS, 32, id="cohorts-every2-t0"),
    pytest.param(7, 3, 5, 2, 4.0, DEFAULT_PARAMETERS, 32, id="cohorts-every3-uneven"),
    pytest.param(6, 1, 4, 1, 8.0, DEFAULT_PARAMETERS, 16, id="cohorts-every1-16bit"),
]


@pytest.mark.parametrize(("rounds", "every", "group", "dropouts", "epsilon", "dimension", "bits"), CASES)
def test_a_derived_sigma_permits_exactly_its_planned_releases(
    rounds: int, every: int, group: int, dropouts: int, epsilon: float, dimension: int, bits: int
) -> None:
    """Every planned release is made (R, or R + R // global_every with cohorts), epsilon stays within the
    target, and the next release is refused: nothing more leaves in the two rounds after the plan."""
    # Prepare
    run = user_run(rounds, every, group, dropouts, epsilon, bits)
    noise, accountant = setup_privacy(run, dimension, 0.0)
    privacy = TrainerPrivacy("user", epsilon, run.privacy.clip_norm, user=(noise, accountant))
    planned = planned_releases(run)

    # Execute
    counted = release_rounds(privacy, noise, every, rounds + 2)

    # Assert
    plan = [2 if every and r % every == 0 else 1 for r in range(1, rounds + 1)]
    assert counted[:rounds] == plan and sum(plan) == planned
    assert counted[rounds:] == [0, 0] and privacy.budget_spent
    assert accountant.rounds == planned and accountant.epsilon() <= epsilon < accountant.epsilon(planned + 1)


@pytest.mark.parametrize(("rounds", "every", "group", "dropouts", "epsilon", "dimension", "bits"), CASES[:4:3])
def test_the_accountants_epsilon_is_dp_accountings_for_the_same_events(
    rounds: int, every: int, group: int, dropouts: int, epsilon: float, dimension: int, bits: int
) -> None:
    """After the planned releases, the accountant's epsilon is dp-accounting's PLD epsilon for as many Gaussian
    mechanisms at the multiplier it charges, and that multiplier is the one calibrated for the plan (not less)."""
    # Prepare
    run = user_run(rounds, every, group, dropouts, epsilon, bits)
    noise, accountant = setup_privacy(run, dimension, 0.0)
    planned = planned_releases(run)
    privacy = TrainerPrivacy("user", epsilon, run.privacy.clip_norm, user=(noise, accountant))
    release_rounds(privacy, noise, every, rounds)

    # Execute
    direct = pld_privacy_accountant.PLDAccountant(value_discretization_interval=VALUE_DISCRETIZATION)
    direct.compose(GaussianDpEvent(accountant.noise_multiplier), planned)

    # Assert
    assert accountant.rounds == planned
    assert accountant.epsilon() == direct.get_epsilon(DELTA) <= epsilon
    assert accountant.noise_multiplier == accounted_multiplier(run, dimension, noise.noise_multiplier)
    assert accountant.noise_multiplier >= calibrate_noise_multiplier(epsilon, DELTA, planned)
    assert accountant.noise_multiplier < noise.noise_multiplier  # the ring's rounding is charged, not ignored


def test_a_low_bit_code_whose_rounding_outweighs_any_sigma_is_refused() -> None:
    """8-bit compression caps the accounted multiplier far below what epsilon 8 over 10 rounds needs: the run is
    refused in one line naming the fields, rather than starting with a budget that permits no release."""
    # Prepare
    run = user_run(10, 0, 3, 1, 8.0, bits=8)

    # Execute
    with pytest.raises(ConfigError) as refused:
        user_noise_multiplier(run, DEFAULT_PARAMETERS)

    # Assert
    message = str(refused.value)
    assert "\n" not in message and "compression.bits = 8" in message
    assert "raise compression.bits" in message and "privacy.planned_rounds" in message


def test_an_explicit_noise_multiplier_is_kept() -> None:
    """A run that sets privacy.noise_multiplier gets that sigma; only a derived one is calibrated."""
    # Prepare
    overrides = {"run.privacy.enabled": True, "run.privacy.level": "user", "run.privacy.noise_multiplier": 1.5}

    # Execute
    sigma = user_noise_multiplier(load_node_config(None, overrides).run, DEFAULT_PARAMETERS)

    # Assert
    assert sigma == 1.5


class StandInStep:
    """A DP-SGD step that trains nothing: the phases and the accountant are what is tested."""

    def __call__(self) -> float:
        return 0.0


@pytest.mark.parametrize(("rounds", "inner_steps", "batch_size"), [(3, 4, 4), (5, 2, 8), (2, 7, 2)])
def test_a_derived_record_sigma_permits_exactly_its_planned_steps(
    rounds: int, inner_steps: int, batch_size: int
) -> None:
    """Record level: planned_rounds x inner_steps DP-SGD steps are counted, every planned round sends, epsilon
    stays within the target, and the round after the plan neither counts a step nor sends."""
    # Prepare
    overrides = {
        "run.privacy.enabled": True,
        "run.privacy.target_epsilon": 3.0,
        "run.privacy.planned_rounds": rounds,
        "run.train.inner_steps": inner_steps,
        "run.model.d_model": 32,
        "run.model.context": 16,
    }
    node = load_node_config(None, overrides)
    model = build_model(node.run.model, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    privacy = TrainerPrivacy.create(node, model, optimizer, generate_corpus(8_000, seed=1), batch_size)
    assert privacy.dpsgd is not None and privacy.steps is not None
    privacy.dpsgd = StandInStep()  # type: ignore[assignment]
    step = privacy.inner_step
    assert step is not None
    accountant = privacy.steps

    # Execute
    counted, sent = [], []
    for _ in range(rounds + 1):
        before = accountant.steps
        for _ in range(privacy.phase_steps(inner_steps)):
            step()
        sent.append(privacy.launch([torch.ones(3)]))
        counted.append(accountant.steps - before)

    # Assert
    assert counted == [inner_steps] * rounds + [0] and sent == [True] * rounds + [False]
    direct = pld_privacy_accountant.PLDAccountant(value_discretization_interval=VALUE_DISCRETIZATION)
    sampled = PoissonSampledDpEvent(accountant.sample_rate, GaussianDpEvent(accountant.noise_multiplier))
    direct.compose(sampled, rounds * inner_steps)
    assert accountant.epsilon() == direct.get_epsilon(DELTA) <= 3.0 < accountant.epsilon(rounds * inner_steps + 1)

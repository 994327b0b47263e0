"""User-level differential privacy: the noise the aggregate carries, the accountant, and stopping at the budget.

Record-level DP-SGD is tested in test_dpsgd.py; counting every release in test_dp_accounting.py.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from helpers import NodeProcess, write_run_config
from secagg_harness import DroppingAllReduce, SecAggSwarm, results_of

from node.config import ConfigError, load_node_config
from node.secagg.privacy import (
    VALUE_DISCRETIZATION,
    NoiseShare,
    PrivacyAccountant,
    calibrate_noise_multiplier,
    gaussian_rounds,
    pld_epsilon,
)
from node.secagg.protocol import MaskedAllReduce

NUMEL = 4000


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecAggSwarm]:
    peers = SecAggSwarm(Path(tmp_path_factory.mktemp("dp")), size=4)
    try:
        yield peers
    finally:
        peers.close()


def aggregate_noise(
    swarm: SecAggSwarm, share: NoiseShare, rounds: int, dropped: list[int], skipping: tuple[int, ...] = ()
) -> np.ndarray:
    """The noise in the group's sum (value units) over ``rounds`` rounds of zero inputs; the ``skipping`` peers
    deviate: they add no noise share of their own."""
    samples = []
    classes: dict[int, type[MaskedAllReduce]] = {
        j: type(f"Drop{j}", (DroppingAllReduce,), {"drop_at": "parts"}) for j in dropped
    }
    bound = share.clip_norm * (1 + 10 * share.noise_multiplier)
    for _ in range(rounds):
        sessions = swarm.sessions([np.zeros(NUMEL, np.float32)] * 4, bound=bound, classes=classes)
        for session in sessions:
            session.noise = None if session.index in skipping else share
        survivors = [i for i in range(4) if i not in dropped]
        result = results_of(swarm.run(sessions), survivors)[0]
        samples.append(result.mean.astype(np.float64) * result.weight_sum)  # mean * sum(omega) = the sum
    return np.concatenate(samples)


@pytest.mark.parametrize(("dropped", "skipping"), [([], ()), ([2], ()), ([], (3,))])
def test_aggregate_noise_has_the_configured_std(swarm: SecAggSwarm, dropped: list[int], skipping: tuple) -> None:
    """Zero inputs: the sum's noise has std sigma*C with t peers missing, sqrt(n/(n-t)) times that with none.

    A colluder that skips its own noise share (issue 14's "skipped noise") counts like a dropout: the
    honest shares alone still carry sigma*C, so what the colluder sees of the others stays as noisy as the
    accountant records (it would be sqrt(3/4) of that were the shares sized for n)."""
    share = NoiseShare(noise_multiplier=0.8, clip_norm=0.5, max_dropouts=1)
    configured = share.noise_multiplier * share.clip_norm

    noise = aggregate_noise(swarm, share, rounds=4, dropped=dropped, skipping=skipping)

    contributing = 4 - len(dropped) - len(skipping)
    expected = configured * math.sqrt(contributing / (4 - share.max_dropouts))
    assert abs(noise.mean()) < 4 * expected / math.sqrt(noise.size)
    assert noise.std() == pytest.approx(expected, rel=0.04)  # 16000 samples: std error about 0.6%


def test_epsilon_equals_dp_accounting() -> None:
    """The node's epsilon is dp-accounting's PLD epsilon for the rounds it contributed; RDP agrees roughly."""
    accountant = PrivacyAccountant(noise_multiplier=1.3, delta=1e-5, budget=math.inf)
    for _ in range(12):
        accountant.record()

    direct = pld_privacy_accountant.PLDAccountant(value_discretization_interval=VALUE_DISCRETIZATION)
    direct.compose(gaussian_rounds(1.3, 12))
    rdp = rdp_privacy_accountant.RdpAccountant()
    rdp.compose(gaussian_rounds(1.3, 12))

    assert accountant.epsilon() == direct.get_epsilon(1e-5)
    assert accountant.epsilon() <= rdp.get_epsilon(1e-5) <= 1.3 * accountant.epsilon()
    assert accountant.rdp_epsilon() == pytest.approx(rdp.get_epsilon(1e-5))


def test_budget_admits_exactly_the_rounds_that_fit() -> None:
    """can_contribute turns false exactly when one more round would exceed the budget."""
    budget = (pld_epsilon(2.0, 3, 1e-5) + pld_epsilon(2.0, 4, 1e-5)) / 2
    accountant = PrivacyAccountant(noise_multiplier=2.0, delta=1e-5, budget=budget)
    allowed = 0
    while accountant.can_contribute():
        accountant.record()
        allowed += 1
    assert allowed == 3 and accountant.epsilon() <= budget


def test_calibration_meets_the_target() -> None:
    """The derived multiplier spends the target epsilon over the planned rounds, and not much less."""
    sigma = calibrate_noise_multiplier(8.0, 1e-5, 20)
    assert pld_epsilon(sigma, 20, 1e-5) <= 8.0
    assert pld_epsilon(sigma * 0.98, 20, 1e-5) > 8.0 * 0.98


def test_privacy_config_is_checked() -> None:
    """Privacy without secure aggregation, or without noise or a target, is refused with the fix."""
    with pytest.raises(ConfigError, match=r"privacy needs aggregation\.mode = 'secure'"):
        load_node_config(None, {"run.privacy.enabled": True, "run.privacy.noise_multiplier": 1.0,
                                "run.aggregation.mode": "plain", "run.aggregation.min_group_size": 2})  # fmt: skip
    with pytest.raises(ConfigError, match=r"noise_multiplier > 0 or a privacy\.target_epsilon"):
        load_node_config(None, {"run.privacy.enabled": True})
    with pytest.raises(ConfigError, match=r"privacy\.level must be 'record' .* or 'user'"):
        load_node_config(None, {"run.privacy.level": "batch"})
    assert (
        load_node_config(None, {"run.privacy.enabled": True, "run.privacy.target_epsilon": 8.0}).run.privacy.level
        == "record"
    )


@pytest.mark.slow
def test_a_node_stops_contributing_at_its_budget(tmp_path: Path, bootstrap_maddr: str) -> None:
    """A node whose budget admits 2 rounds trains locally from round 3; the other three still form groups."""
    config = write_run_config(
        tmp_path / "run.toml",
        train={"inner_steps": 4},
        aggregation={"timeout": 30.0},
        privacy={
            "enabled": True,
            "level": "user",
            "noise_multiplier": 2.0,
            "clip_norm": 1.0,
            "delta": 1e-5,
            "allow_noisy": True,
        },  # 4 users: far below the population floor, on purpose
    )
    budget = (pld_epsilon(2.0, 2, 1e-5) + pld_epsilon(2.0, 3, 1e-5)) / 2
    data = [bytes([65 + i]) * 20_000 for i in range(4)]

    extra = [["--epsilon-budget", str(budget)]] + [[]] * 3
    common = ["--rounds", "4", "--min-peers", "4"]
    nodes = [NodeProcess(tmp_path, f"n{i}", config, bootstrap_maddr, data[i], *common, *extra[i]) for i in range(4)]
    codes = [node.wait(300) for node in nodes]
    outputs = [node.output() for node in nodes]
    for node in nodes:
        node.stop()

    assert codes == [0, 0, 0, 0], outputs[0][-3000:]
    reports = [
        [json.loads(line) for line in (tmp_path / f"n{i}" / "work" / "report.jsonl").read_text().splitlines()]
        for i in range(4)
    ]
    modes = [[r["mode"] for r in rows if r["round"] > 0] for rows in reports]
    assert modes[0] == ["group", "group", "local", "local"]
    assert all(m == ["group"] * 4 for m in modes[1:])
    assert all(r["group_size"] == 3 for rows in reports[1:] for r in rows if r["round"] >= 3)
    spent = [r["epsilon"] for r in reports[0] if r["round"] > 0]
    assert spent[-1] == pytest.approx(pld_epsilon(2.0, 2, 1e-5), rel=1e-3) and spent[-1] <= budget
    assert "privacy budget spent" in outputs[0]

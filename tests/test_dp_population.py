"""User-level DP and the population it needs: the noise on a group's mean, its floor, and the refusal below it.

The formula (node/secagg/privacy.py, ``mean_noise_ratio``): ``n`` peers each add a share of std
``sigma * C / sqrt(n - t)``, so the group's mean carries ``sigma * C * sqrt(n / (n - t)) / n`` per
coordinate, of norm ``sqrt(d)`` times that, against clipped updates of norm <= C. The floor
(``group_size_floor``) is the smallest ``n`` with ratio <= 1, about ``sigma * sqrt(d)``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from node.aggregation.secure import ring_bound
from node.cli import main
from node.config import ConfigError, RunConfig, load_node_config
from node.data import generate_corpus
from node.secagg.fixed_point import FixedPointCodec
from node.secagg.parts import Workspace
from node.secagg.privacy import NoiseShare, group_size_floor, mean_noise_ratio
from node.secagg.ring import RingVector
from node.training.privacy import check_user_population, setup_privacy

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PARAMETERS = 120_576  # the default model (ModelConfig())


def user_run(**privacy: object) -> RunConfig:
    overrides = {f"run.privacy.{key}": value for key, value in privacy.items()}
    return load_node_config(None, {"run.privacy.enabled": True, "run.privacy.level": "user", **overrides}).run


def test_a_group_below_the_floor_is_refused_in_one_line() -> None:
    """epsilon 8 over 100 rounds, groups of 3 and the default model: refused, naming the fields and the fixes."""
    run = user_run(target_epsilon=8.0, delta=1e-5, planned_rounds=100)
    with pytest.raises(ConfigError) as refused:
        setup_privacy(run, DEFAULT_PARAMETERS, 0.0)  # the start-up path: sigma derived, then checked
    message = str(refused.value)
    assert "\n" not in message
    for named in (
        "aggregation.min_group_size = 3",
        "privacy.level = 'record'",
        "privacy.target_epsilon",
        "privacy.allow_noisy = true",
        "from 2086 peers",  # sigma calibrated for the accounted multiplier (privacy.py user_noise_multiplier)
    ):
        assert named in message, message
    assert "raise aggregation.min_group_size" not in message  # the floor is beyond the 32 a group may hold


def test_allow_noisy_starts_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    run = user_run(noise_multiplier=6.0, allow_noisy=True)
    with caplog.at_level(logging.WARNING, logger="node.training.privacy"):
        ratio = check_user_population(run, DEFAULT_PARAMETERS, 6.0)
    assert ratio == pytest.approx(6.0 * math.sqrt(DEFAULT_PARAMETERS * 3 / 2) / 3)
    assert f"{ratio:.3g}x the clipped update" in caplog.text and "allow_noisy" in caplog.text


def test_the_floor_within_reach_names_the_group_size_to_set() -> None:
    """A small model whose floor fits a group: the fix names the group size; at it, the run starts."""
    run = user_run(noise_multiplier=1.0)
    floor = group_size_floor(1.0, 200, 1)
    assert floor == math.ceil(0.5 + math.sqrt(0.25 + 200)) == 15
    with pytest.raises(ConfigError, match=rf"raise aggregation\.min_group_size to >= {floor}.*noise_multiplier"):
        check_user_population(run, 200, 1.0)
    bigger = load_node_config(
        None,
        {
            "run.privacy.enabled": True,
            "run.privacy.level": "user",
            "run.privacy.noise_multiplier": 1.0,
            "run.aggregation.min_group_size": floor,
        },
    ).run
    assert check_user_population(bigger, 200, 1.0) <= 1.0


@pytest.mark.parametrize("dropouts", [0, 1, 3])
def test_the_floor_is_the_smallest_group_at_ratio_one(dropouts: int) -> None:
    for sigma in (0.5, 1.0, 6.0, 37.3):
        for dimension in (1, 10, 1000, DEFAULT_PARAMETERS):
            n = group_size_floor(sigma, dimension, dropouts)
            assert mean_noise_ratio(sigma, dimension, n, dropouts) <= 1.0
            assert n == 1 or mean_noise_ratio(sigma, dimension, n - 1, dropouts) > 1.0
            assert abs(n - sigma * math.sqrt(dimension)) <= dropouts / 2 + 1.5


def ring_mean_noise(share: NoiseShare, group_size: int, contributors: int, dimension: int) -> np.ndarray:
    """The decoded mean of ``contributors`` of a group of ``group_size`` all sending zeros with their noise shares."""
    run = RunConfig()
    codec = FixedPointCodec(group_size, ring_bound(run.aggregation, share))
    total = np.zeros(dimension + 1, np.uint32)
    vector = np.zeros(dimension, np.float32)
    for _ in range(contributors):
        ring = RingVector(
            vector=vector,
            omega=1.0,
            codec=codec,
            selected=None,
            workspace=Workspace(),
            out=np.zeros(dimension, np.float32),
            residual=None,
            noise=share,
        )
        words = np.zeros(dimension + 1, np.uint32)
        ring.encode_part(words, 0, dimension + 1, os.urandom(32))
        total += words  # the masks cancel in the ring; what is left is this sum
    out = np.zeros(dimension, np.float32)
    decoder = RingVector(
        vector=vector, omega=1.0, codec=codec, selected=None, workspace=Workspace(), out=out, residual=None, noise=None
    )
    assert decoder.decode(total) == pytest.approx(contributors, rel=1e-6)
    return out.astype(np.float64)


@pytest.mark.parametrize("group_size", [3, 8])
def test_the_ratio_matches_the_noise_the_ring_adds(group_size: int) -> None:
    """The actual shares of n peers, encoded and decoded as the ring does: the mean's noise norm over C."""
    sigma, clip, dropouts, dimension = 2.0, 1.5, 1, 40_000
    share = NoiseShare(sigma, clip, dropouts)
    measured = float(np.linalg.norm(ring_mean_noise(share, group_size, group_size, dimension))) / clip
    expected = mean_noise_ratio(sigma, dimension, group_size, dropouts)
    assert measured == pytest.approx(expected, rel=0.03)
    assert expected == pytest.approx(
        sigma * math.sqrt(dimension) * math.sqrt(group_size / (group_size - 1)) / group_size
    )
    # U = n - t contributors (the fewest a round accepts): sigma * C in all, over n - t
    fewest = share.contributors_needed(group_size)
    measured = float(np.linalg.norm(ring_mean_noise(share, group_size, fewest, dimension))) / clip
    assert measured == pytest.approx(sigma * math.sqrt(dimension) / fewest, rel=0.03)


def test_the_population_benchmark_runs_small(tmp_path: Path) -> None:
    """benchmarks/privacy.py --population-only with two tiny K: the field, its per-K losses and a verdict."""
    data = tmp_path / "text.txt"
    data.write_bytes(generate_corpus(200_000, seed=3))
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "privacy.py"),
        "--population-only",
        "--json",
        "--population-ks",
        "2,4",
        "--population-rounds",
        "2",
        "--population-inner-steps",
        "2",
        "--population-windows",
        "4",
        "--population-data",
        str(data),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    population = json.loads(done.stdout.strip().splitlines()[-1])["user_dp_population"]
    assert [row["k"] for row in population["per_k"]] == [2, 4][: len(population["per_k"])]
    for row in population["per_k"]:
        assert math.isfinite(row["val_loss_dp"]) and math.isfinite(row["val_loss_no_dp"])
        assert row["loss_ratio"] == pytest.approx(row["val_loss_dp"] / row["val_loss_no_dp"], rel=1e-3)
    last = population["per_k"][-1]
    assert population["largest_tried"] == last["k"] and population["largest_ratio"] == last["loss_ratio"]
    assert population["k"] is None or population["k"] == last["k"]
    assert population["epsilon"] == 8.0 and population["rounds"] == 2 and population["parameters"] == 120_576


def test_join_below_the_floor_is_refused_before_any_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`zen-node join` with user-level DP below the floor: one line, exit 2, no identity folder, no workdir."""
    # Prepare
    config = tmp_path / "run.toml"
    config.write_text("[run.privacy]\nenabled = true\nlevel = 'user'\nnoise_multiplier = 6.0\n")  # no calibration
    data = tmp_path / "data.txt"
    data.write_bytes(generate_corpus(20_000, seed=1))
    identity, workdir = tmp_path / "id", tmp_path / "work"

    # Execute
    code = main(["join", "--config", str(config), "--data", str(data), "--identity", str(identity),
                 "--workdir", str(workdir), "--host-maddrs", "/ip4/127.0.0.1/tcp/0"])  # fmt: skip

    # Assert
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("zen-node: error: privacy.level = 'user'"), lines
    assert f"from {group_size_floor(6.0, DEFAULT_PARAMETERS, 1)} peers" in lines[0]
    assert "privacy.level = 'record'" in lines[0] and "lower privacy.noise_multiplier" in lines[0]
    assert not identity.exists() and not workdir.exists()

"""benchmarks/privacy.py --record-sweep: the in-process simulation of the record-level demo swarm that chose
DP-SGD's batch and lr scales (BENCHMARKS.md, "Differential privacy")."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sweep(*flags: str) -> list[dict[str, object]]:
    command = [sys.executable, str(ROOT / "benchmarks" / "privacy.py"), "--record-sweep", "--sweep-peers", "3"]
    command += ["--rounds", "1", "--inner-steps", "2", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.strip().splitlines()]


def test_the_record_sweep_prints_a_point_per_setting() -> None:
    """One JSON line per (clip, batch, lr, seed), sigma calibrated for each batch's sampling rate; no DP too."""
    # Execute
    private = sweep("--sweep-batches", "8,32", "--sweep-lrs", "0.003,0.01")
    plain = sweep("--sweep-no-dp")

    # Assert
    assert [(p["expected_batch"], p["inner_lr"]) for p in private] == [(8, 0.003), (8, 0.01), (32, 0.003), (32, 0.01)]
    assert all(p["dp"] and p["peers"] == 3 and math.isfinite(float(p["val_loss"])) for p in private)  # type: ignore[arg-type]
    sigmas = [float(p["noise_multiplier"]) for p in private]  # type: ignore[arg-type]
    assert (
        sigmas[0] == sigmas[1] < sigmas[2] == sigmas[3]
    )  # a bigger batch samples more: more noise for the same epsilon
    assert len(plain) == 1 and not plain[0]["dp"] and plain[0]["noise_multiplier"] == 0.0

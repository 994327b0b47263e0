"""The overlapped outer loop with real node processes on 127.0.0.1: a slow peer sends fewer samples
and nobody waits for it; the efficiency benchmark runs end to end."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
import torch
from helpers import REPO_ROOT, NodeProcess, write_run_config

from node.capacity import activation_bytes, fit_batch_size
from node.config import ModelConfig
from node.data import generate_corpus


class Throttle:
    """Slows a process down from outside, like a weaker machine: SIGSTOP and SIGCONT in turn."""

    def __init__(self, pid: int, stopped: float = 0.06, running: float = 0.02):
        self.pid, self.stopped, self.running = pid, stopped, running
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._done.is_set():
                os.kill(self.pid, signal.SIGSTOP)
                self._done.wait(self.stopped)
                os.kill(self.pid, signal.SIGCONT)
                self._done.wait(self.running)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=5)
        try:
            os.kill(self.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_a_slow_peer_sends_fewer_samples_and_nobody_waits_for_it(tmp_path: Path, bootstrap_maddr: str) -> None:
    rounds, round_seconds = 4, 4.0
    config = write_run_config(
        tmp_path / "run.toml",
        run_id="overlap",
        train={"inner_steps": 100000, "round_seconds": round_seconds, "overlap": True},
        aggregation={"matchmaking_time": 1.0, "timeout": 30.0},
        compression={"bits": 8, "fraction": 0.5},
    )
    corpus = generate_corpus(3 * 20_000, seed=11)
    nodes = NodeProcess.on_slices(
        tmp_path, config, bootstrap_maddr, corpus, 3, "--rounds", str(rounds), "--min-peers", "3"
    )
    throttle = Throttle(nodes[2].process.pid)  # the trainer process only: its DHT and averager keep pace
    try:
        for node in nodes:
            assert node.wait(timeout=180) == 0, node.output()[-3000:]
    finally:
        throttle.stop()
        for node in nodes:
            node.stop()

    trained = [[r for r in node.reports() if r["mode"] not in ("initial", "loaded")] for node in nodes]
    assert all(len(t) == rounds for t in trained)
    assert all(r["mode"] == "group" and r["group_size"] == 3 for t in trained for r in t)
    samples = [sum(r["samples"] for r in t) for t in trained]
    # every round's inner steps end after round_seconds: the throttled peer gets through fewer of them
    assert samples[2] < 0.6 * min(samples[:2]), samples
    for t in trained[:2]:
        # the fast peers train while their rounds aggregate: the rounds before the last one (which only
        # waits for its own aggregation) spend most of their wall time in inner steps
        assert min(r["utilization"] for r in t[:-1]) >= 0.6, [r["utilization"] for r in t]
        assert all(r["bytes_sent"] > 0 for r in t)
    # the slow peer's rounds are no longer than round_seconds plus aggregation, not stretched by its pace
    assert max(r["seconds"] for r in trained[2][1:-1]) < 2 * round_seconds + 10


@pytest.mark.slow
def test_efficiency_benchmark_reports_every_field(tmp_path: Path) -> None:
    """A tiny run reports every field, four consistent curves, gap_closed against central and against the pooled
    peers' bytes, and --plot writes a PNG."""
    # Prepare
    data, picture = tmp_path / "corpus.txt", tmp_path / "curves.png"
    data.write_bytes(generate_corpus(60_000, seed=4))
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "efficiency.py"), "--data", str(data), "--peers", "3"]
    command += ["--rounds", "2", "--inner-steps", "5", "--batch-size", "4", "--d-model", "16", "--context", "16"]
    command += ["--eval-every", "2", "--bits", "8", "--fraction", "0.5", "--timeout", "240", "--json"]
    command += ["--plot", str(picture)]

    # Execute
    result = subprocess.run(command, capture_output=True, text=True, timeout=420, cwd=REPO_ROOT)

    # Assert
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    for field in (
        "central_final_loss",
        "swarm_final_loss",
        "alone_final_loss",
        "swarm_minus_alone",
        "efficiency",
        "pooled_final_loss",
        "gap_closed_pooled",
        "efficiency_pooled",
        "naive_bytes_per_peer",
        "swarm_bytes_per_peer",
        "bytes_ratio",
        "utilization",
    ):
        assert isinstance(summary[field], (int, float)) and math.isfinite(summary[field]), field
    assert summary["preset"] is None
    assert summary["swarm_samples"] == summary["central_samples"] == 3 * 2 * 5 * 4
    assert summary["swarm_bytes_per_peer"] > 0 and 0 < summary["utilization"] <= 1
    central, alone, swarm = (summary["central_final_loss"], summary["alone_final_loss"], summary["swarm_final_loss"])
    assert summary["swarm_minus_alone"] == pytest.approx(swarm - alone, abs=1e-4)
    if alone == central:
        assert summary["gap_closed"] is None
    else:
        assert summary["gap_closed"] == pytest.approx((alone - swarm) / (alone - central), rel=1e-3, abs=1e-4)
    pooled = summary["pooled_final_loss"]
    assert summary["gap_closed_pooled"] == pytest.approx((alone - swarm) / (alone - pooled), rel=1e-3, abs=1e-4)
    curves = {name: summary[f"{name}_curve"] for name in ("central", "alone", "pooled", "swarm")}
    for name, curve in curves.items():
        assert all(len(point) == 2 and all(math.isfinite(v) for v in point) for point in curve), name
        assert [s for s, _ in curve] == sorted(s for s, _ in curve) and curve[0][0] == 0, name
    # every eval_every-th step and the last; the swarm: rounds 0, 1, 2
    assert [s for s, _ in curves["central"]] == [s for s, _ in curves["pooled"]] == [0, 24, 48, 72, 96, 120]
    assert [s for s, _ in curves["alone"]] == [0, 8, 16, 24, 32, 40]
    assert [s for s, _ in curves["swarm"]] == [0, 60, 120]
    assert curves["central"][-1][1] == central and curves["alone"][-1][1] == alone and curves["swarm"][-1][1] == swarm
    assert curves["pooled"][-1][1] == pooled and curves["pooled"][1:] != curves["central"][1:]  # other bytes
    assert curves["central"][0] == curves["alone"][0] == curves["pooled"][0] == curves["swarm"][0]  # one start
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_batch_size_is_halved_until_a_step_fits_in_memory() -> None:
    small = ModelConfig(d_model=32, context=32)
    assert fit_batch_size(small, 16, torch.device("cpu")) == 16
    huge = ModelConfig(n_layer=48, n_head=16, d_model=1024, context=8192)
    fitted = fit_batch_size(huge, 4096, torch.device("cpu"))
    assert fitted < 4096
    assert fitted == 1 or activation_bytes(huge, fitted) <= psutil.virtual_memory().available // 2
    assert fitted == 4096 or activation_bytes(huge, fitted * 2) > psutil.virtual_memory().available // 2 * 0.9

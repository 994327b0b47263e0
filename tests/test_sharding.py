"""Sharded training on 127.0.0.1: real `zen-node serve` and `zen-node join` processes, real libp2p.

The run's 4-block GPT keeps block 0 on the trainer and cuts blocks 1-3 into 2 remote stages.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from node.config import load_node_config
from node.data import generate_corpus
from node.demo import stop_process
from node.sharded_trainer import unsharded_losses

RUN_TOML = """
[run]
run_id = "shard"
min_memory_gb = 0.0
[run.model]
n_layer = 4
d_model = 32
context = 32
[run.train]
inner_steps = {inner_steps}
batch_size = 8
[run.sharding]
stages = 2
local_blocks = 1
micro_batches = 2
request_timeout = 3.0
spot_check_fraction = {spot_check}
[node]
heartbeat_period = 1.0
record_ttl = 6.0
"""
LOSS_TOLERANCE = 0.02  # the bound: the sharded loss curve within 2% of the unsharded one
SERVING = re.compile(r"serving stage\(s\) \[([0-9, ]+)\] of run \S+ as (\S+) .* multiaddrs (\S+)")


def write_config(path: Path, inner_steps: int = 10, spot_check: float = 0.1) -> Path:
    path.write_text(RUN_TOML.format(inner_steps=inner_steps, spot_check=spot_check))
    return path


class Process:
    """A `zen-node` subprocess writing to its own log."""

    def __init__(self, folder: Path, *args: str):
        self.folder = folder
        self.peer_id = ""
        folder.mkdir(parents=True, exist_ok=True)
        self.log = open(folder / "node.log", "w")
        command = [sys.executable, "-m", "node.cli", *args, "--host-maddrs", "/ip4/127.0.0.1/tcp/0"]
        command += ["--identity", str(folder / "id"), "--log-level", "INFO"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, env=env
        )

    def output(self) -> str:
        self.log.flush()
        return (self.folder / "node.log").read_text()

    def wait_for(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = pattern.search(self.output())
            if match:
                return match
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        pytest.fail(f"{self.folder.name}: no {pattern.pattern!r} in {timeout}s:\n{self.output()[-3000:]}")

    def crash(self) -> None:
        """SIGKILL the process and its children (its p2pd and DHT process): a machine that vanished."""
        family = [psutil.Process(self.process.pid), *psutil.Process(self.process.pid).children(recursive=True)]
        for member in family:
            member.send_signal(signal.SIGKILL)
        psutil.wait_procs(family, timeout=10)

    def stop(self) -> None:
        stop_process(self.process, timeout=20)
        self.log.close()


def serve(root: Path, name: str, config: Path, initial: str | None, *extra: str) -> tuple[Process, list[int], str]:
    """Start `zen-node serve`; return it, the stages it chose and its multiaddr (its PeerID is ``.peer_id``)."""
    args = ["serve", "--config", str(config), *extra]
    if initial:
        args += ["--initial-peers", initial]
    server = Process(root / name, *args)
    match = server.wait_for(SERVING, 90)
    stages = [int(s) for s in match.group(1).split(",")]
    server.peer_id = match.group(2)
    return server, stages, match.group(3)


def reports(trainer: Process) -> list[dict]:
    path = trainer.folder / "work" / "report.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def train(root: Path, config: Path, initial: str, corpus: bytes, rounds: int) -> Process:
    (root / "data.txt").write_bytes(corpus)
    args = ["join", "--config", str(config), "--initial-peers", initial, "--data", str(root / "data.txt")]
    args += ["--workdir", str(root / "trainer" / "work"), "--rounds", str(rounds)]
    return Process(root / "trainer", *args)


def relative_gap(sharded: list[float], reference: list[float]) -> float:
    return max(abs(a - b) / abs(b) for a, b in zip(sharded, reference, strict=True))


@pytest.mark.slow
def test_sharded_training_matches_unsharded_loss_curve(tmp_path: Path) -> None:
    """Two servers pick the two stages by block selection; the trainer's losses track the unsharded run within 2%."""
    # Prepare
    config = write_config(tmp_path / "run.toml")
    corpus = generate_corpus(30_000, seed=11)
    processes: list[Process] = []
    try:
        first, first_stages, maddr = serve(tmp_path, "s0", config, None)
        processes.append(first)
        second, second_stages, _ = serve(tmp_path, "s1", config, maddr)
        processes.append(second)

        # Execute
        trainer = train(tmp_path, config, maddr, corpus, rounds=2)
        processes.append(trainer)
        code = trainer.process.wait(timeout=120)

        # Assert
        assert (first_stages, second_stages) == ([0], [1])
        assert code == 0, trainer.output()[-3000:]
        steps = reports(trainer)
        assert [r["step"] for r in steps] == list(range(1, 21))
        assert [r["versions"] for r in steps] == [[i, i] for i in range(1, 21)]
        reference = unsharded_losses(load_node_config(str(config)).run, corpus, 20)
        assert relative_gap([r["loss"] for r in steps], reference) <= LOSS_TOLERANCE
        assert reference[-1] < reference[0]
        assert "step     20 | loss" in trainer.output()
    finally:
        for process in processes:
            process.stop()


@pytest.mark.slow
def test_a_stage_server_killed_mid_training_loses_no_step(tmp_path: Path) -> None:
    """Stage 1's server in use is SIGKILLed mid-run: the trainer reroutes to the replica; every step applies once."""
    # Prepare
    config = write_config(tmp_path / "run.toml", inner_steps=100)
    corpus = generate_corpus(30_000, seed=12)
    processes: list[Process] = []
    try:
        first, _, maddr = serve(tmp_path, "s0", config, None, "--stages", "0")
        processes.append(first)
        replicas = [serve(tmp_path, f"s1-{i}", config, maddr, "--stages", "1")[0] for i in range(2)]
        processes += replicas
        trainer = train(tmp_path, config, maddr, corpus, rounds=2)
        processes.append(trainer)

        # Execute
        deadline = time.monotonic() + 90
        while len(reports(trainer)) < 10 and time.monotonic() < deadline and trainer.process.poll() is None:
            time.sleep(0.05)
        in_use = reports(trainer)[-1]["servers"][1]
        victim = next(r for r in replicas if r.peer_id.startswith(in_use))
        killed_at = len(reports(trainer))
        victim.crash()
        code = trainer.process.wait(timeout=120)

        # Assert
        assert code == 0, trainer.output()[-3000:]
        assert 10 <= killed_at < 200
        steps = reports(trainer)
        assert [r["step"] for r in steps] == list(range(1, 201))
        assert [r["versions"] for r in steps] == [[i, i] for i in range(1, 201)]
        assert steps[-1]["failovers"] >= 1
        assert all(
            not r["servers"][1] or not victim.peer_id.startswith(r["servers"][1]) for r in steps[killed_at + 1 :]
        )
        reference = unsharded_losses(load_node_config(str(config)).run, corpus, 200)
        assert relative_gap([r["loss"] for r in steps], reference) <= LOSS_TOLERANCE
    finally:
        for process in processes:
            process.stop()

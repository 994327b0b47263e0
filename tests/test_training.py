"""Swarm training with real node processes on 127.0.0.1: sync, late join, mismatch, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.data import generate_corpus
from node.demo import max_divergence, start_bootstrap, stop_process

RUN_TOML = """
[run]
run_id = "{run_id}"
min_memory_gb = 0.0
[run.model]
d_model = {d_model}
context = 32
[run.train]
inner_steps = {inner_steps}
batch_size = 8
[run.aggregation]
min_group_size = {group}
matchmaking_time = {matchmaking}
timeout = {timeout}
"""


STATUS_COMMAND = [sys.executable, "-m", "node.cli", "status", "--host-maddrs", "/ip4/127.0.0.1/tcp/0"]


def write_config(
    path: Path,
    run_id: str = "t",
    d_model: int = 32,
    inner_steps: int = 8,
    group: int = 3,
    matchmaking: float = 2.0,
    timeout: float = 20.0,
) -> Path:
    path.write_text(
        RUN_TOML.format(
            run_id=run_id,
            d_model=d_model,
            inner_steps=inner_steps,
            group=group,
            matchmaking=matchmaking,
            timeout=timeout,
        )
    )
    return path


@pytest.fixture
def bootstrap_maddr(tmp_path: Path) -> Iterator[str]:
    """A real `zen-bootstrap` process on 127.0.0.1; yields the multiaddr it printed."""
    with open(tmp_path / "bootstrap.log", "w") as log:
        process, maddr = start_bootstrap(tmp_path, log)
        try:
            yield maddr
        finally:
            stop_process(process, timeout=20)


class NodeProcess:
    """A `zen-node join` subprocess with its own data, identity and workdir."""

    def __init__(self, root: Path, name: str, config: Path, maddr: str | None, data: bytes, *extra: str):
        self.folder = root / name
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "data.txt").write_bytes(data)
        command = [sys.executable, "-m", "node.cli", "join", "--config", str(config)]
        if maddr:
            command += ["--initial-peers", maddr]
        command += ["--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--data", str(self.folder / "data.txt")]
        command += ["--identity", str(self.folder / "id"), "--workdir", str(self.folder / "work")]
        command += ["--save-round-params", "--log-level", "INFO", *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.log = open(self.folder / "node.log", "w")
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, env=env
        )

    @classmethod
    def on_slices(
        cls, root: Path, config: Path, maddr: str, corpus: bytes, count: int, *extra: str, size: int = 20_000
    ) -> list[NodeProcess]:
        """``count`` nodes n0, n1, ... each on its own contiguous ``size``-byte slice of ``corpus``."""
        return [cls(root, f"n{i}", config, maddr, corpus[i * size : (i + 1) * size], *extra) for i in range(count)]

    def reports(self) -> list[dict]:
        path = self.folder / "work" / "report.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def params(self, round_no: int) -> Path:
        return self.folder / "work" / "rounds" / f"round-{round_no:05d}.pt"

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.folder.name} did not exit in {timeout}s:\n{self.output()[-3000:]}")

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return (self.folder / "node.log").read_text()

    def stop(self) -> None:
        stop_process(self.process, timeout=20)
        self.log.close()


def wait_until(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.5)


@pytest.mark.slow
def test_three_nodes_stay_in_sync_and_a_late_joiner_loads_the_state(tmp_path: Path, bootstrap_maddr: str) -> None:
    """3 nodes keep identical global params each round and lower the loss; a 4th joins late and matches."""
    # Prepare
    config = write_config(tmp_path / "run.toml", inner_steps=24)
    corpus = generate_corpus(4 * 20_000, seed=3)
    nodes = NodeProcess.on_slices(tmp_path, config, bootstrap_maddr, corpus, 3, "--rounds", "8", "--min-peers", "3")
    late = mismatched = None
    try:
        # Execute
        wait_until(lambda: any(r["round"] >= 2 for r in nodes[0].reports()), 240, "round 2 on the first node")
        late = NodeProcess(tmp_path, "late", config, bootstrap_maddr, corpus[60_000:], "--rounds", "5")
        other = write_config(tmp_path / "other.toml", d_model=48)
        mismatched = NodeProcess(tmp_path, "mismatched", other, bootstrap_maddr, corpus[:20_000], "--rounds", "1")
        mismatch_code = mismatched.wait(120)
        status = subprocess.run(
            [*STATUS_COMMAND, "--initial-peers", bootstrap_maddr, "--config", str(config), "--json"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        codes = [node.wait(300) for node in nodes]
        late_code = late.wait(300)

        # Assert
        assert codes == [0, 0, 0], [node.output()[-2000:] for node in nodes]
        for round_no in range(1, 9):
            assert max_divergence([node.params(round_no) for node in nodes]) <= 1e-6
        for node in nodes:
            reports = node.reports()
            assert reports[-1]["round"] == 8
            assert reports[-1]["eval_loss"] < reports[0]["eval_loss"]
            assert all(r["mode"] == "group" and r["group_size"] >= 3 for r in reports[1:])
        assert late_code == 0, late.output()[-2000:]
        loaded = late.reports()[0]
        assert loaded["mode"] == "loaded" and loaded["round"] >= 2
        assert max_divergence([late.params(loaded["round"]), nodes[0].params(loaded["round"])]) <= 1e-6
        assert mismatch_code == 2
        assert status.returncode == 0, status.stderr[-2000:]
        listed = [json.loads(line) for line in status.stdout.splitlines()]
        assert listed and all(row["roles"] == ["trainer"] and row["peer_id"].startswith("12D3KooW") for row in listed)
        assert "model.d_model" in mismatched.output()
        assert "Traceback" not in mismatched.output()
    finally:
        for node in [*nodes, late, mismatched]:
            if node is not None:
                node.stop()


@pytest.mark.slow
def test_a_lone_node_trains_solo_and_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    """With no peers a node applies its own updates; --resume continues at the saved round."""
    # Prepare
    config = write_config(tmp_path / "run.toml", group=3, matchmaking=0.5, timeout=2.0, inner_steps=4)
    data = generate_corpus(20_000, seed=5)

    # Execute
    first = NodeProcess(tmp_path, "solo", config, None, data, "--rounds", "1")
    first_code = first.wait(120)
    first.stop()
    second = NodeProcess(tmp_path, "solo", config, None, data, "--rounds", "2", "--resume")
    second_code = second.wait(120)
    second.stop()

    # Assert
    assert (first_code, second_code) == (0, 0), second.output()[-2000:]
    rounds = [(r["round"], r["mode"]) for r in second.reports()]
    assert rounds == [(0, "initial"), (1, "solo"), (2, "solo")]

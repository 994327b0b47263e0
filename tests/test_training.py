"""Swarm training with real node processes on 127.0.0.1: sync, late join, mismatch, resume."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from helpers import LOCALHOST_MADDR, ZEN_NODE, NodeProcess, wait_until, write_run_config

from node.data import generate_corpus
from node.demo import max_divergence

STATUS_COMMAND = [*ZEN_NODE, "status", "--host-maddrs", LOCALHOST_MADDR]


@pytest.mark.slow
def test_three_nodes_stay_in_sync_and_a_late_joiner_loads_the_state(tmp_path: Path, bootstrap_maddr: str) -> None:
    """3 nodes keep identical global params each round and lower the loss; a 4th joins late and matches."""
    # Prepare
    # matchmaking every round (group_rounds 1) paces the rounds so that the swarm is still training
    # when the late joiner arrives; kept groups would finish the 6 rounds before it has started
    config = write_run_config(tmp_path / "run.toml", train={"inner_steps": 24}, aggregation={"group_rounds": 1})
    corpus = generate_corpus(4 * 20_000, seed=3)
    nodes = NodeProcess.on_slices(tmp_path, config, bootstrap_maddr, corpus, 3, "--rounds", "6", "--min-peers", "3")
    late = mismatched = None
    try:
        # Execute
        wait_until(
            lambda: any(r["round"] >= 2 for r in nodes[0].reports()),
            240,
            "round 2 on the first node",
            detail=nodes[0].tail,
        )
        late = NodeProcess(tmp_path, "late", config, bootstrap_maddr, corpus[60_000:], "--rounds", "5")
        other = write_run_config(tmp_path / "other.toml", model={"d_model": 48})
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
        for round_no in range(1, 7):
            assert max_divergence([node.params(round_no) for node in nodes]) <= 1e-6
        for node in nodes:
            reports = node.reports()
            assert reports[-1]["round"] == 6
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
    config = write_run_config(
        tmp_path / "run.toml", train={"inner_steps": 4}, aggregation={"matchmaking_time": 0.5, "timeout": 2.0}
    )
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

"""A trainer that misses its round's group catches up within seconds, not after the aggregation timeout.

Real `zen-node` processes on 127.0.0.1: three honest trainers and one that is late, once, for round 3's
group (tests/deviant_node.py ``late-once``). The three form that round's group without it and move on;
before, the late one looked for a group of round 3 until ``aggregation.timeout`` and only then downloaded
their state. Now its step stops looking once it has missed a slot and the others' records show the round
finished (node/aggregation/plain.py ``_MissedRound``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from helpers import REPO_ROOT, NodeProcess, write_run_config

from node.data import generate_corpus

LATE_ONCE = [sys.executable, str(REPO_ROOT / "tests" / "deviant_node.py"), "late-once"]
TIMEOUT = 60.0  # aggregation.timeout: what the late trainer waited before


@pytest.mark.slow
def test_a_trainer_that_missed_its_group_downloads_the_others_state_at_once(
    tmp_path: Path, bootstrap_maddr: str
) -> None:
    # Prepare
    aggregation = {"matchmaking_time": 1.0, "group_rounds": 1, "timeout": TIMEOUT}
    config = write_run_config(tmp_path / "run.toml", run_id="late", aggregation=aggregation)
    corpus = generate_corpus(4 * 20_000, seed=7)
    honest = NodeProcess.on_slices(tmp_path, config, bootstrap_maddr, corpus, 3, "--rounds", "8", "--min-peers", "4")
    late = NodeProcess(
        tmp_path,
        "late",
        config,
        bootstrap_maddr,
        corpus[60_000:],
        "--rounds",
        "5",
        "--min-peers",
        "4",
        program=LATE_ONCE,
    )

    # Execute
    try:
        code = late.wait(timeout=150)
        codes = [node.wait(timeout=120) for node in honest]
    finally:
        for node in [*honest, late]:
            node.stop()

    # Assert
    assert (code, codes) == (0, [0, 0, 0]), [node.tail() for node in [*honest, late]]
    assert "deviant: 6.0 s late for round 3" in late.output(), late.tail()
    assert "no group of this round is coming" in late.output(), late.tail()
    reports = late.reports()
    resync = next(r for r in reports if r["mode"] == "resync")
    assert resync["round"] >= 3, reports  # it took their state of the round it missed (or later)
    assert resync["seconds"] < TIMEOUT / 2, reports  # the 6 s stall and a few windows, not the timeout
    assert all(r["mode"] != "solo" for r in reports), reports  # it never fell back to its update alone

"""Smoke test of ``benchmarks/attacks.py``: one cheap attack, run as the CLI runs it, gives a well-formed row."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import REPO_ROOT

FIELDS = {
    "attack": str,
    "leaked": bool,
    "result_consistent": bool,
    "releases_counted_ok": (bool, type(None)),
    "honest_seconds": float,
    "cost_ratio": float,
    "detected": (bool, type(None)),
    "honest_outcome": str,
    "details": dict,
    "error": type(None),
}


def test_one_attack_gives_a_row_with_every_field_and_no_leak() -> None:
    """``--only bad_box --json``: one JSON line, a baseline, and one row whose fields have their types."""
    # Prepare
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "attacks.py"), "--only", "bad_box", "--timeout", "60"]

    # Execute
    done = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=240, cwd=REPO_ROOT)

    # Assert
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["peers"] == 5 and report["honest_baseline_seconds"] > 0
    [row] = report["attacks"]
    for field, kind in FIELDS.items():
        assert isinstance(row[field], kind), f"{field} = {row[field]!r}"
    assert row["attack"] == "bad_box"
    assert row["leaked"] is False


def test_a_holder_that_sends_recipients_different_sums_fails_the_round_for_all() -> None:
    """A holder adds a different offset to each recipient's partial sum (benchmarks/attacks.py's
    ``forged_sum``): before the digests of the total were swapped, the honest members decoded means
    6e-8 apart and applied them; now every honest member fails the round, and the forger is named, alone:
    its two signed sums of one part, forwarded with the totals, prove it (before, the honest reporter was
    named with it)."""
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "attacks.py"), "--only", "forged_sum", "--timeout", "60"]
    done = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=240, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    [row] = json.loads(done.stdout.strip().splitlines()[-1])["attacks"]
    assert row["error"] is None and row["leaked"] is False
    assert row["result_consistent"] is True and row["honest_outcome"] == "all failed", row
    assert row["detected"] is True, row
    assert row["details"]["honest_named"] == [], row

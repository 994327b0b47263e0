"""Measure the local demo swarm end to end: wall time, loss drop and parameter agreement.

Runs ``zen-node demo`` (a bootstrap peer and N node processes on 127.0.0.1, generated data)
in a scratch folder and reports its summary::

    python benchmarks/demo_swarm.py --peers 3 --rounds 3 --json

JSON fields: ``peers``, ``rounds``, ``inner_steps``, ``seconds``, ``initial_loss``,
``final_loss``, ``max_param_divergence``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=3, help="node processes, e.g. 3")
    parser.add_argument("--rounds", type=int, default=3, help="outer rounds, e.g. 3")
    parser.add_argument("--inner-steps", type=int, default=30, help="inner steps per round, e.g. 30")
    parser.add_argument("--json", action="store_true", help="print one JSON line, e.g. --json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        summary_path = Path(scratch) / "summary.json"
        command = [sys.executable, "-m", "node.cli", "demo", "--peers", str(args.peers), "--rounds", str(args.rounds)]
        command += ["--inner-steps", str(args.inner_steps), "--workdir", str(Path(scratch) / "demo")]
        command += ["--summary-json", str(summary_path)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            print(result.stdout[-2000:], result.stderr[-2000:], file=sys.stderr)
            return result.returncode
        summary = json.loads(summary_path.read_text())
    row = {key: summary[key] for key in ("peers", "rounds", "seconds", "initial_loss", "final_loss")}
    row["inner_steps"] = args.inner_steps
    row["max_param_divergence"] = summary["max_param_divergence"]
    if args.json:
        print(json.dumps(row))
    else:
        for key, value in row.items():
            print(f"{key:22s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Differential privacy, measured: aggregate noise, the accountant, the budget stop, and the cost in loss.

Four measurements in one run, all on 127.0.0.1::

    python benchmarks/privacy.py --json

1. Noise: R rounds of the masked all-reduce among 4 real libp2p peers with zero inputs and DP
   noise shares (t = 1 peer missing); the std of the aggregate's noise over the configured
   sigma * C gives ``noise_std_ratio`` (1.0 is exact).
2. Accountant: a node's epsilon after K contributions vs a direct dp-accounting PLD computation
   (``epsilon``, ``epsilon_abs_diff``; ``epsilon_rdp`` is the RDP cross-check).
3. Budget: an accountant with a budget between epsilon(K) and epsilon(K+1) must admit exactly K
   rounds (``stopped_at_budget``).
4. Loss: the 3-peer demo (``zen-node demo``) without DP and with DP at --epsilon (default 8, delta
   1e-5, clip 2.0) over --rounds outer rounds; ``val_loss_no_dp``, ``val_loss_dp`` are the mean
   final evaluation losses of the peers.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from secagg_harness import SecAggSwarm  # noqa: E402

from node.secagg.privacy import NoiseShare, PrivacyAccountant, pld_epsilon  # noqa: E402


def measure_noise(rounds: int, numel: int) -> float:
    share = NoiseShare(noise_multiplier=1.0, clip_norm=1.0, max_dropouts=1)
    samples = []
    with tempfile.TemporaryDirectory() as scratch:
        swarm = SecAggSwarm(Path(scratch), size=4)
        try:
            for _ in range(rounds):
                sessions = swarm.sessions([np.zeros(numel, np.float32)] * 4, bound=11.0)
                for session in sessions[:3]:  # peer 3 sends no noise: t = 1 share missing
                    session.noise = share
                results = swarm.run(sessions)
                result = results[0]
                if isinstance(result, BaseException):
                    raise result
                samples.append(result.mean.astype(np.float64) * result.weight_sum)
        finally:
            swarm.close()
    return float(np.concatenate(samples).std() / (share.noise_multiplier * share.clip_norm))


def demo_loss(epsilon: float, rounds: int, inner_steps: int) -> float:
    with tempfile.TemporaryDirectory() as scratch:
        summary = Path(scratch) / "summary.json"
        command = [sys.executable, "-m", "node.cli", "demo", "--peers", "3", "--rounds", str(rounds)]
        command += ["--inner-steps", str(inner_steps), "--workdir", str(Path(scratch) / "demo")]
        command += ["--summary-json", str(summary), "--privacy-epsilon", str(epsilon)]
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if result.returncode != 0:
            raise RuntimeError(result.stdout[-2000:] + result.stderr[-2000:])
        return float(json.loads(summary.read_text())["final_loss"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--noise-rounds", type=int, default=5, help="all-reduce rounds for the noise test, e.g. 5")
    parser.add_argument("--numel", type=int, default=20000, help="elements per update in the noise test, e.g. 20000")
    parser.add_argument("--contributions", type=int, default=10, help="K rounds for the accountant, e.g. 10")
    parser.add_argument("--epsilon", type=float, default=8.0, help="epsilon of the DP training run, e.g. 8")
    parser.add_argument("--rounds", type=int, default=5, help="outer rounds of each training run, e.g. 5")
    parser.add_argument("--inner-steps", type=int, default=30, help="inner steps per round, e.g. 30")
    parser.add_argument("--json", action="store_true", help="print one JSON line, e.g. --json")
    args = parser.parse_args()

    sigma, delta = 1.1, 1e-5
    accountant = PrivacyAccountant(sigma, delta, budget=math.inf)
    for _ in range(args.contributions):
        accountant.record()
    direct = pld_epsilon(sigma, args.contributions, delta)
    budget = (pld_epsilon(sigma, args.contributions, delta) + pld_epsilon(sigma, args.contributions + 1, delta)) / 2
    limited = PrivacyAccountant(sigma, delta, budget=budget)
    admitted = 0
    while limited.can_contribute() and admitted < 10 * args.contributions:
        limited.record()
        admitted += 1

    row = {
        "noise_std_ratio": round(measure_noise(args.noise_rounds, args.numel), 4),
        "noise_samples": args.noise_rounds * args.numel,
        "epsilon": round(accountant.epsilon(), 6),
        "epsilon_abs_diff": abs(accountant.epsilon() - direct),
        "epsilon_rdp": round(accountant.rdp_epsilon(), 6),
        "contributions": args.contributions,
        "noise_multiplier": sigma,
        "delta": delta,
        "stopped_at_budget": admitted == args.contributions,
        "val_loss_no_dp": round(demo_loss(0.0, args.rounds, args.inner_steps), 4),
        "val_loss_dp": round(demo_loss(args.epsilon, args.rounds, args.inner_steps), 4),
        "dp_epsilon": args.epsilon,
        "rounds": args.rounds,
    }
    if args.json:
        print(json.dumps(row))
    else:
        for key, value in row.items():
            print(f"{key:>20}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

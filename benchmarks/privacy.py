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
4. Loss: the 3-peer demo swarm (``zen-node demo``'s run config, data and node processes) without DP,
   with user-level DP (``val_loss_dp``: level "user", clip 2.0) and with record-level DP-SGD
   (``val_loss_record_dp``: level "record", clip --record-clip, DP-SGD's expected batch and lr at
   --record-batch-scale and --record-lr-scale times the run's, the defaults of ``[run.privacy]``) at
   --epsilon (default 8, delta 1e-5)
   over --rounds outer rounds: the mean final held-out losses of the peers.
   ``record_dp_loss_ratio`` = val_loss_record_dp / val_loss_no_dp (target <= 1.10), both for the
   first of --record-peers (default 3,4; ``val_loss_no_dp`` is always the 3-peer swarm's);
   ``val_loss_record_dp_by_peers``, ``val_loss_no_dp_by_peers`` and ``record_dp_loss_ratio_by_peers``
   repeat them for each of --record-peers, each swarm against a no-DP swarm of its own size.
5. ``dp_step_overhead``: the median time of one DP-SGD step (per-example gradients, clip, noise,
   AdamW) over one plain AdamW step, same model (the demo's) and expected batch, one thread
   (target <= 2.5). ``dp_step_overhead_scaled``: the same with DP-SGD at its expected batch
   (--record-batch-scale x the plain batch): what a DP round's inner steps cost over a plain one's.
6. ``user_dp_population``: an exact in-process simulation (no network, no quantization) of K users
   a round under user-level DP at --epsilon (delta 1e-5, sigma calibrated for the
   --population-rounds rounds, every user in every round) for each K of --population-ks: the
   smallest K whose held-out loss is within 10% of the same simulation without DP (no clip, no
   noise), or null (then ``largest_tried`` and its ``largest_ratio``), with the per-K losses in
   ``per_k``. Users share --population-windows data windows (contiguous slices of --population-data,
   cut as benchmarks/sweep.py cuts its peers): user ``k`` trains on window ``k mod W``, so a round
   costs W local trainings (--population-inner-steps AdamW steps from the global params) whatever
   K is, and the group sum is exact: ``sum_w count_w * clip(update_w, C)`` plus one Gaussian of
   the std the K users' ``NoiseShare``s add together (``sigma * C * sqrt(K / (K - t))``, t = 1);
   the global params become the mean (the run's default outer step, lr 1, no momentum).
   ``--population-only`` runs this part alone.
7. ``--record-sweep`` (alone, not part of the run above): an exact in-process simulation (no network,
   no quantization) of the record-level swarm of part 4, for a cheap sweep of the DP-SGD settings.
   Each of --sweep-peers peers holds the slice of the demo's corpus its node would, split and
   evaluated as the node does (node/data.py ``split_corpus``; 4 held-out batches of 16); every peer
   takes --inner-steps steps a round on a persistent AdamW, then the global params become the exact
   mean of the peers' updates (the run's outer step) and every peer restarts from them. A DP point
   (clip C, expected batch B, inner lr) runs DPSGDStep on Poisson samples with sigma calibrated (PLD)
   for --rounds x --inner-steps steps at --epsilon; a no-DP point (``"dp": false``) takes plain steps
   on batches of B. Every point of the Cartesian product of --sweep-clips, --sweep-batches,
   --sweep-lrs and --sweep-seeds prints one JSON line (the mean final held-out loss of the peers).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import sweep  # noqa: E402  (benchmarks/, this script's folder: the exact in-process simulation of peers)
from secagg_harness import SecAggSwarm  # noqa: E402

from node.config import ModelConfig, PrivacyConfig, TrainConfig  # noqa: E402
from node.data import ByteBatches, batch_seed, generate_corpus, split_corpus  # noqa: E402
from node.demo import BYTES_PER_PEER, _demo_config, join_command, start_bootstrap, stop_process  # noqa: E402
from node.model import build_model  # noqa: E402
from node.secagg.privacy import (  # noqa: E402
    NoiseShare,
    PrivacyAccountant,
    calibrate_noise_multiplier,
    clip_update,
    mean_noise_ratio,
    pld_epsilon,
)
from node.training.dpsgd import DPSGDStep, RecordSampler, calibrate_record_noise  # noqa: E402
from node.training.inner import evaluate, plain_step  # noqa: E402
from node.training.outer import OuterState  # noqa: E402

POPULATION_TARGET = 1.10  # user_dp_population: DP loss over no-DP loss at or below this
DEMO_MODEL = ModelConfig(n_layer=2, n_head=2, d_model=64, context=64)  # node/demo.py's run model
DEMO_EVAL_BATCHES = 4  # held-out batches of 16 a node evaluates (node/training/trainer.py EVAL_BATCHES)


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


def swarm_loss(
    peers: int,
    epsilon: float,
    rounds: int,
    inner_steps: int,
    level: str = "user",
    clip: float = 2.0,
    scales: tuple[int, float] = (1, 1.0),
) -> float:
    """The demo's swarm (its run config with ``level``, ``clip`` and record level's (batch, lr) ``scales``
    under DP): mean final held-out loss."""
    config = _demo_config(peers, inner_steps, "secure", rounds, epsilon)
    if epsilon > 0:  # user level: 3 peers are far below the population floor, so allow_noisy (measured on purpose)
        extra = "\nallow_noisy = true" if level == "user" else f"\nbatch_scale = {scales[0]}\nlr_scale = {scales[1]}"
        config = config.replace("clip_norm = 2.0", f'clip_norm = {clip}\nlevel = "{level}"{extra}')
    corpus = generate_corpus(BYTES_PER_PEER * peers, seed=7)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        (root / "run.toml").write_text(config)
        processes: list[subprocess.Popen[str]] = []
        with open(root / "bootstrap.log", "w") as log:
            bootstrap, maddr = start_bootstrap(root, log)
            processes.append(bootstrap)
            try:
                for i in range(peers):
                    folder = root / f"peer-{i}"
                    folder.mkdir()
                    (folder / "data.txt").write_bytes(corpus[i * BYTES_PER_PEER : (i + 1) * BYTES_PER_PEER])
                    command = join_command(root / "run.toml", folder, maddr, rounds, peers)
                    out = open(folder / "node.log", "w")
                    processes.append(
                        subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, text=True)
                    )
                for i, process in enumerate(processes[1:]):
                    if process.wait(timeout=300 + 120 * rounds) != 0:
                        raise RuntimeError((root / f"peer-{i}" / "node.log").read_text()[-3000:])
            finally:
                for process in reversed(processes):
                    stop_process(process)
        finals = []
        for i in range(peers):
            lines = (root / f"peer-{i}" / "work" / "report.jsonl").read_text().splitlines()
            finals.append(json.loads(lines[-1])["eval_loss"])
        return sum(finals) / len(finals)


def step_overhead(steps: int, clip: float, batch_scale: int = 1) -> float:
    """Median DP-SGD step time (expected batch 16 x ``batch_scale``) over the median plain step time (the demo's
    model, batch 16, one thread)."""
    torch.set_num_threads(1)
    config = ModelConfig(n_layer=2, n_head=2, d_model=64, context=64)
    corpus = generate_corpus(BYTES_PER_PEER, seed=7)
    plain_model, dp_model = build_model(config, 0), build_model(config, 0)
    plain_opt = torch.optim.AdamW(plain_model.parameters(), lr=3e-3)
    batches = ByteBatches(corpus, config.context, 16, seed=1)
    sampler = RecordSampler(corpus, config.context, 16 * batch_scale, seed=1)
    dp = DPSGDStep(dp_model, torch.optim.AdamW(dp_model.parameters(), lr=3e-3), sampler, 1.0, clip, torch.device("cpu"))
    device = torch.device("cpu")

    def timed(step: object) -> float:
        times = []
        for i in range(steps + 3):
            started = time.perf_counter()
            step()  # type: ignore[operator]
            if i >= 3:  # warm-up
                times.append(time.perf_counter() - started)
        return statistics.median(times)

    plain = timed(lambda: plain_step(plain_model, plain_opt, batches, device))
    private = timed(dp)
    return private / plain


def record_swarm_sim(
    peers: int, rounds: int, inner_steps: int, epsilon: float, clip: float, batch: int, lr: float, seed: int
) -> dict[str, object]:
    """Part 7: the demo's record-level swarm simulated exactly in-process; ``epsilon`` 0: no DP (plain steps)."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)  # the DP noise (Opacus draws from torch's default generator)
    started = time.perf_counter()
    corpus = generate_corpus(BYTES_PER_PEER * peers, seed=7)
    context, device = DEMO_MODEL.context, torch.device("cpu")
    models = [build_model(DEMO_MODEL, 0) for _ in range(peers)]
    outer = OuterState(models[0], TrainConfig())  # the run's outer step: the global params become the mean
    steps: list[object] = []
    held_out: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    sigma, rate = 0.0, 0.0
    for i, model in enumerate(models):
        train, held = split_corpus(corpus[i * BYTES_PER_PEER : (i + 1) * BYTES_PER_PEER], context)
        held_out.append(ByteBatches(held, context, 16, seed=1234).take(DEMO_EVAL_BATCHES))
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        if epsilon > 0:
            sampler = RecordSampler(train, context, batch, seed=seed * 1000 + i)
            rate = sampler.sample_rate
            sigma = calibrate_record_noise(epsilon, 1e-5, rate, rounds * inner_steps)
            steps.append(DPSGDStep(model, optimizer, sampler, sigma, clip, device))
        else:
            batches = ByteBatches(train, context, batch, seed=batch_seed(0, train))
            steps.append(lambda m=model, o=optimizer, b=batches: plain_step(m, o, b, device))
    for _ in range(rounds):
        for step in steps:
            for _ in range(inner_steps):
                step()  # type: ignore[operator]
        sent = [outer.pseudo_gradient(model) for model in models]
        outer.step([torch.stack(parts).mean(dim=0) for parts in zip(*sent, strict=True)])
        for model in models:
            outer.copy_to(model)
    losses = [evaluate(models[0], outer.params, batches, device) for batches in held_out]
    return {
        "peers": peers,
        "dp": epsilon > 0,
        "clip": clip if epsilon > 0 else None,
        "expected_batch": batch,
        "inner_lr": lr,
        "seed": seed,
        "noise_multiplier": round(sigma, 4),
        "sample_rate": round(rate, 5),
        "val_loss": round(sum(losses) / len(losses), 4),
        "seconds": round(time.perf_counter() - started, 1),
    }


def population_loss(setup: sweep.Setup, users: int, rounds: int, noise: NoiseShare | None, seed: int = 0) -> float:
    """Held-out loss after ``rounds`` rounds of ``users`` users (module docstring, part 6); ``noise`` None: no DP."""
    train, held_out = sweep.load(setup)
    windows = min(users, setup.peers)
    counts = [users // setup.peers + (w < users % setup.peers) for w in range(windows)]
    streams = [sweep.peer_batches(train, setup, w) for w in range(windows)]
    model = build_model(setup.model, setup.seed)
    train_config = TrainConfig()  # the run's outer step: lr 1, no momentum (the global params become the mean)
    outer = OuterState(model, train_config)
    generator = torch.Generator().manual_seed(seed)
    inner_steps = setup.steps // rounds
    for _ in range(rounds):
        total = [torch.zeros_like(p) for p in outer.params]
        for stream, count in zip(streams, counts, strict=True):
            outer.copy_to(model)  # a user starts from the global params, with a fresh AdamW
            optimizer = torch.optim.AdamW(model.parameters(), lr=setup.inner_lr, weight_decay=train_config.weight_decay)
            for _ in range(inner_steps):
                sweep.inner_step(model, optimizer, stream, setup.inner_lr)
            update = outer.pseudo_gradient(model)
            if noise is not None:
                clip_update(update, noise.clip_norm)
            for part, value in zip(total, update, strict=True):
                part.add_(value, alpha=count)
        if noise is not None:  # K shares of std noise.std(K) sum to one Gaussian of std noise.std(K) * sqrt(K)
            std = noise.std(users) * math.sqrt(users)
            for part in total:
                part.add_(torch.randn(part.shape, generator=generator, dtype=part.dtype) * std)
        outer.step([part / users for part in total])
    return evaluate(model, outer.params, held_out, torch.device("cpu"))


def user_dp_population(args: argparse.Namespace) -> dict[str, object]:
    """The smallest K of ``--population-ks`` whose user-level DP loss is within 10% of no DP (part 6)."""
    rounds, delta = args.population_rounds, 1e-5
    data = Path(args.population_data)
    setup = sweep.Setup(
        str(data), "small", args.population_windows, rounds * args.population_inner_steps, "constant", 0, 10
    )
    sigma = calibrate_noise_multiplier(args.epsilon, delta, rounds)
    noise = NoiseShare(sigma, args.population_clip, max_dropouts=1)
    dimension = sum(p.numel() for p in build_model(setup.model, 0).parameters())
    baselines: dict[tuple[Fraction, ...], float] = {}  # no-DP loss by each window's share of the users
    per_k: list[dict[str, object]] = []
    found = None
    for users in sorted(args.population_ks):
        shares = tuple(
            Fraction(users // setup.peers + (w < users % setup.peers), users) for w in range(min(users, setup.peers))
        )
        if shares not in baselines:
            baselines[shares] = population_loss(setup, users, rounds, None)
        plain, private = baselines[shares], population_loss(setup, users, rounds, noise)
        ratio = private / plain
        per_k.append(
            {
                "k": users,
                "val_loss_dp": round(private, 4),
                "val_loss_no_dp": round(plain, 4),
                "loss_ratio": round(ratio, 4),
                "noise_to_signal": round(mean_noise_ratio(sigma, dimension, users, noise.max_dropouts), 4),
            }
        )
        if ratio <= POPULATION_TARGET:
            found = users
            break
    return {
        "k": found,
        "target_loss_ratio": POPULATION_TARGET,
        "epsilon": args.epsilon,
        "delta": delta,
        "rounds": rounds,
        "noise_multiplier": round(sigma, 4),
        "clip_norm": args.population_clip,
        "inner_steps": args.population_inner_steps,
        "windows": args.population_windows,
        "parameters": dimension,
        "data": data.name,
        "largest_tried": per_k[-1]["k"],
        "largest_ratio": per_k[-1]["loss_ratio"],
        "per_k": per_k,
    }


def population_data(path: str, scratch: Path) -> str:
    """The population's text: ``path``, or a generated corpus when that file is missing."""
    if Path(path).is_file():
        return path
    generated = scratch / "generated.txt"
    generated.write_bytes(generate_corpus(1_000_000, seed=7))
    return str(generated)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--noise-rounds", type=int, default=5, help="all-reduce rounds for the noise test, e.g. 5")
    parser.add_argument("--numel", type=int, default=20000, help="elements per update in the noise test, e.g. 20000")
    parser.add_argument("--contributions", type=int, default=10, help="K rounds for the accountant, e.g. 10")
    parser.add_argument("--epsilon", type=float, default=8.0, help="epsilon of the DP training run, e.g. 8")
    parser.add_argument("--rounds", type=int, default=5, help="outer rounds of each training run, e.g. 5")
    parser.add_argument("--inner-steps", type=int, default=30, help="inner steps per round, e.g. 30")
    parser.add_argument("--record-clip", type=float, default=1.0, help="DP-SGD per-record clip norm, e.g. 1.0")
    parser.add_argument(
        "--record-batch-scale",
        type=int,
        default=PrivacyConfig().batch_scale,
        help="DP-SGD's expected batch over the run's batch (privacy.batch_scale), e.g. 4",
    )
    parser.add_argument(
        "--record-lr-scale",
        type=float,
        default=PrivacyConfig().lr_scale,
        help="DP-SGD's lr over the run's inner lr (privacy.lr_scale), e.g. 3.0",
    )
    parser.add_argument("--record-peers", default="3,4", help="swarm sizes for record-level DP, e.g. 3,4")
    parser.add_argument("--overhead-steps", type=int, default=30, help="timed steps for dp_step_overhead, e.g. 30")
    parser.add_argument(
        "--population-ks",
        type=sweep.comma(int),
        default=[4, 16, 64, 256, 1024],
        help="users a round tried for user_dp_population, ascending, e.g. 4,16,64,256,1024",
    )
    parser.add_argument("--population-rounds", type=int, default=5, help="rounds of each population run, e.g. 5")
    parser.add_argument("--population-inner-steps", type=int, default=10, help="a user's AdamW steps, e.g. 10")
    parser.add_argument("--population-windows", type=int, default=16, help="distinct user data windows, e.g. 16")
    parser.add_argument("--population-clip", type=float, default=4.0, help="C of a user's update, e.g. 4.0")
    parser.add_argument(
        "--population-data",
        default=str(ROOT.parent / "shared/data/tinyshakespeare.txt"),
        help="text the users' windows and the held-out set come from (generated if missing)",
    )
    parser.add_argument("--population-only", action="store_true", help="measure user_dp_population alone")
    parser.add_argument("--record-sweep", action="store_true", help="run part 7 alone: one JSON line a point")
    parser.add_argument("--sweep-peers", type=int, default=4, help="simulated peers of --record-sweep, e.g. 4")
    parser.add_argument("--sweep-clips", type=sweep.comma(float), default=[1.0], help="per-record clips, e.g. 0.1,1")
    parser.add_argument("--sweep-batches", type=sweep.comma(int), default=[16], help="expected batches, e.g. 16,64")
    parser.add_argument("--sweep-lrs", type=sweep.comma(float), default=[3e-3], help="inner lrs, e.g. 0.003,0.01")
    parser.add_argument("--sweep-seeds", type=sweep.comma(int), default=[0], help="noise and sampling seeds, e.g. 0,1")
    parser.add_argument("--sweep-no-dp", action="store_true", help="--record-sweep without DP (plain steps, batch B)")
    parser.add_argument("--json", action="store_true", help="print one JSON line, e.g. --json")
    args = parser.parse_args()
    if not args.population_ks or min(args.population_ks) < 1 or args.population_rounds < 1:
        parser.error("--population-ks and --population-rounds must be >= 1")
    if args.population_inner_steps < 1 or args.population_windows < 1:
        parser.error("--population-inner-steps and --population-windows must be >= 1")
    if args.record_sweep:
        for clip, batch, lr, seed in itertools.product(
            args.sweep_clips, args.sweep_batches, args.sweep_lrs, args.sweep_seeds
        ):
            epsilon = 0.0 if args.sweep_no_dp else args.epsilon
            point = record_swarm_sim(args.sweep_peers, args.rounds, args.inner_steps, epsilon, clip, batch, lr, seed)
            print(json.dumps(point), flush=True)
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        args.population_data = population_data(args.population_data, Path(scratch))
        row = {"user_dp_population": user_dp_population(args)} if args.population_only else measure_all(args)
    if args.json:
        print(json.dumps(row))
    else:
        for key, value in row.items():
            print(f"{key:>20}: {value}")
    return 0


def measure_all(args: argparse.Namespace) -> dict[str, object]:
    """Parts 1-6 (the module docstring)."""
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

    record_peers = list(map(int, args.record_peers.split(",")))
    no_dp = {
        peers: round(swarm_loss(peers, 0.0, args.rounds, args.inner_steps), 4) for peers in sorted({3, *record_peers})
    }
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
        "val_loss_no_dp": no_dp[3],
        "val_loss_dp": round(swarm_loss(3, args.epsilon, args.rounds, args.inner_steps, "user", 2.0), 4),
        "dp_epsilon": args.epsilon,
        "rounds": args.rounds,
    }
    scales = (args.record_batch_scale, args.record_lr_scale)
    by_peers = {
        peers: round(
            swarm_loss(peers, args.epsilon, args.rounds, args.inner_steps, "record", args.record_clip, scales), 4
        )
        for peers in record_peers
    }
    first = record_peers[0]
    row["val_loss_record_dp"] = by_peers[first]
    row["record_dp_loss_ratio"] = round(by_peers[first] / no_dp[first], 4)
    row["val_loss_record_dp_by_peers"] = {str(k): v for k, v in by_peers.items()}
    row["val_loss_no_dp_by_peers"] = {str(k): no_dp[k] for k in record_peers}
    row["record_dp_loss_ratio_by_peers"] = {str(k): round(v / no_dp[k], 4) for k, v in by_peers.items()}
    row["record_clip"] = args.record_clip
    row["record_batch_scale"], row["record_lr_scale"] = scales
    row["dp_step_overhead"] = round(step_overhead(args.overhead_steps, args.record_clip), 3)
    row["dp_step_overhead_scaled"] = round(step_overhead(args.overhead_steps, args.record_clip, scales[0]), 3)
    row["user_dp_population"] = user_dp_population(args)
    return row


if __name__ == "__main__":
    sys.exit(main())

"""Outer-loop sweep: an exact in-process simulation of N peers running our DiLoCo outer loop.

No network and no quantization: every round's group mean is computed exactly in this process, so
what is measured is the algorithm (our ``OuterState`` outer step and staleness rule, AdamW inner
steps like node/training/inner.py), not the transport. Run, e.g.::

    python benchmarks/sweep.py --preset small --peers 4 --outer-lr 1.0,0.7 --outer-momentum 0,0.9 \\
        --inner-steps 25 --delay 0 --jobs 2 --json > /tmp/sweep/lr-momentum.jsonl

Every comma list is an axis; the sweep runs their Cartesian product.

Setup (as benchmarks/efficiency.py): the held-out set is 16 batches from the file's last 10%; the
first 90% is cut into N contiguous (non-IID) slices, one per peer, and each peer trains on the 90%
of its slice that its node trains on, in the node's batch order (``split_corpus``, ``batch_seed``). Every peer
takes the preset's steps in rounds of H inner steps; a round's mean lands ``--delay`` (tau) inner
steps into the next round (0: synchronous; ``H``: one round late, the node's ``train.overlap``) and
is applied with ``OuterState.step`` and ``OuterState.follow``. The last round is landed at once, as
the node does. ``--warm-start-rounds K`` runs K rounds of ``--warm-start-h`` steps first
(post-local SGD). ``--lr-schedule cosine``: linear warmup over ``--warmup-steps``, then cosine decay
to 10% over the run (per peer inner step), the same schedule given to the baselines.

Baselines, once per (N, preset, schedule, seed): ``central_final_loss`` (one model, batch N x per-peer
batch from all training bytes, the same number of steps as each peer, its held-out loss every
``--eval-every`` steps giving the curve), ``pooled_final_loss`` (the same on the bytes the peers train
on, pooled: each slice's training 90%, without the 10% each node holds out) and ``alone_final_loss``
(peer 0 on its own slice, the same steps). ``--seed`` (a list) sets the models' init and every batch
order, for the spread over seeds. Per configuration: ``final_loss`` (the global params),
``gap_closed`` = (alone - swarm) / (alone - central), ``efficiency`` (central samples to reach the
swarm's loss, interpolated on its curve, over the swarm's samples; central samples / swarm samples
with ``efficiency_is_lower_bound`` when the central run never gets that low), ``gap_closed_pooled``
and ``efficiency_pooled`` (the same against the pooled run). ``--json``: one JSON object per
configuration a line, then a summary line (``"summary": true``, the best configuration by final loss).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from node.config import ModelConfig, TrainConfig  # noqa: E402
from node.data import ByteBatches, batch_seed, split_corpus  # noqa: E402
from node.model import build_model  # noqa: E402
from node.training.inner import evaluate  # noqa: E402
from node.training.optimizers import build_inner_optimizer  # noqa: E402
from node.training.outer import OuterState  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from efficiency import samples_to_reach  # noqa: E402  (one definition of efficiency for both benchmarks)

EVAL_BATCHES = 16  # as benchmarks/efficiency.py

PRESETS: dict[str, dict[str, Any]] = {
    # today's run model
    "small": dict(n_layer=2, n_head=2, d_model=64, context=64, batch_size=16, steps=1000, inner_lr=3e-3),
    # one size up (about 0.37M parameters)
    "medium": dict(n_layer=3, n_head=2, d_model=96, context=64, batch_size=16, steps=3000, inner_lr=3e-3),
}


@dataclass(frozen=True)
class Setup:
    """What the baselines and every configuration of one sweep share."""

    data: str  # the text file
    preset: str  # a key of PRESETS
    peers: int  # N
    steps: int  # inner steps per peer (and central / alone steps)
    lr_schedule: str  # "constant" or "cosine"
    warmup_steps: int  # cosine only: linear warmup steps
    eval_every: int  # central steps between evaluations of its curve
    inner_optimizer: str = "adamw"  # "adamw" or "muon" (node/training/optimizers.py), for every run of the setup
    lr: float = 0.0  # the inner (and central, alone) learning rate; 0: the preset's
    seed: int = 0  # the models' init and every batch order (``--seed``: the spread over seeds)

    @property
    def model(self) -> ModelConfig:
        p = PRESETS[self.preset]
        return ModelConfig(n_layer=p["n_layer"], n_head=p["n_head"], d_model=p["d_model"], context=p["context"])

    @property
    def batch_size(self) -> int:
        return int(PRESETS[self.preset]["batch_size"])

    @property
    def inner_lr(self) -> float:
        return self.lr or float(PRESETS[self.preset]["inner_lr"])

    def optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """The inner optimizer every run of this setup uses (the node's own builder)."""
        return build_inner_optimizer(model, self.inner_optimizer, self.inner_lr, 0.0)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Point:
    """One configuration of the outer loop."""

    outer_lr: float
    outer_momentum: float
    inner_steps: int  # H
    delay: str  # tau in inner steps between a round's launch and its mean's landing, or "H" (one round late)
    warm_start_rounds: int  # K rounds of warm_start_h steps before rounds of H
    warm_start_h: int
    swarm_lr_scale: float = 1.0  # the peers' inner lr over the baselines' (central and alone keep the setup's)
    sync_moments: bool = False  # average the peers' AdamW moments (exp_avg, exp_avg_sq) with every mean


def lr_factor(step: int, total: int, schedule: str, warmup: int) -> float:
    """Multiplier of the inner learning rate at ``step`` (0-based) of ``total``."""
    if schedule == "constant":
        return 1.0
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def load(setup: Setup) -> tuple[bytes, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Training bytes and the held-out batches, cut as benchmarks/efficiency.py cuts them."""
    data = Path(setup.data).read_bytes()
    split = int(len(data) * 0.9)
    held = ByteBatches(data[split:], setup.model.context, setup.batch_size, seed=1234)
    return data[:split], [held.next() for _ in range(EVAL_BATCHES)]


def peer_bytes(train: bytes, setup: Setup, index: int) -> bytes:
    """The bytes peer ``index`` trains on: 90% of its contiguous slice, cut as the node cuts it."""
    share = len(train) // setup.peers
    return split_corpus(train[index * share : (index + 1) * share], setup.model.context)[0]


def peer_batches(train: bytes, setup: Setup, index: int) -> ByteBatches:
    """Peer ``index``'s batches: its training bytes in the order the node draws them (node/data.py)."""
    own = peer_bytes(train, setup, index)
    return ByteBatches(own, setup.model.context, setup.batch_size, seed=batch_seed(setup.seed, own))


def inner_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: ByteBatches, lr: float) -> None:
    """One AdamW step, as node/training/inner.py takes it, at learning rate ``lr``."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    tokens, targets = batches.next()
    loss = model(tokens, targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def baseline(setup: Setup, kind: str) -> dict[str, Any]:
    """The curve [(samples, loss)] of one model: ``central`` on all training bytes and ``pooled`` on the peers'
    own (each slice's training 90%), both on batches N x larger; ``alone``: peer 0 alone."""
    torch.set_num_threads(1)
    train, held_out = load(setup)
    model = build_model(setup.model, setup.seed)
    optimizer = setup.optimizer(model)
    if kind in ("central", "pooled"):
        batch = setup.peers * setup.batch_size
        pooled = b"".join(peer_bytes(train, setup, i) for i in range(setup.peers)) if kind == "pooled" else train
        batches = ByteBatches(pooled, setup.model.context, batch, seed=setup.seed)
    else:
        batch = setup.batch_size
        batches = peer_batches(train, setup, 0)
    params = list(model.parameters())
    curve = [(0, evaluate(model, params, held_out, torch.device("cpu")))]
    for step in range(setup.steps):
        model.train()
        lr = setup.inner_lr * lr_factor(step, setup.steps, setup.lr_schedule, setup.warmup_steps)
        inner_step(model, optimizer, batches, lr)
        if kind != "alone" and ((step + 1) % setup.eval_every == 0 or step + 1 == setup.steps):
            curve.append(((step + 1) * batch, evaluate(model, params, held_out, torch.device("cpu"))))
    if kind == "alone":
        curve.append((setup.steps * batch, evaluate(model, params, held_out, torch.device("cpu"))))
    return {"curve": curve}


def round_lengths(point: Point, steps: int) -> list[int]:
    """Inner steps of every round: K warm-start rounds, then rounds of H, the last one what remains."""
    lengths = [point.warm_start_h] * point.warm_start_rounds
    left = steps - sum(lengths)
    if left < 0:
        raise ValueError(f"--warm-start-rounds {point.warm_start_rounds} x {point.warm_start_h} exceeds {steps} steps")
    lengths += [point.inner_steps] * (left // point.inner_steps)
    if left % point.inner_steps:
        lengths.append(left % point.inner_steps)
    return lengths


def simulate(setup: Setup, point: Point) -> dict[str, Any]:
    """N peers in lock-step; our OuterState applies every round's exact group mean. Returns the final loss."""
    torch.set_num_threads(1)
    started = time.perf_counter()
    train, held_out = load(setup)
    config = TrainConfig(
        inner_steps=point.inner_steps,
        batch_size=setup.batch_size,
        inner_lr=setup.inner_lr,
        outer_lr=point.outer_lr,
        outer_momentum=point.outer_momentum,
        seed=setup.seed,
        overlap=point.delay != "0",
    )
    models = [build_model(setup.model, setup.seed) for _ in range(setup.peers)]  # optimizers' lr: set at every step
    optimizers = [setup.optimizer(m) for m in models]
    streams = [peer_batches(train, setup, i) for i in range(setup.peers)]
    outer = OuterState(models[0], config)  # every peer's global params are the same; one copy stands for all
    inflight: list[list[torch.Tensor]] | None = None  # every peer's sent delta, until the mean lands
    land_at = 0  # the inner step at which the in-flight mean lands

    def land(sent: list[list[torch.Tensor]]) -> None:
        mean = [torch.stack(parts).mean(dim=0) for parts in zip(*sent, strict=True)]  # equal samples per peer
        before = outer.snapshot()
        outer.step(mean)
        for model, delta in zip(models, sent, strict=True):
            outer.follow(model, before, delta)
        if point.sync_moments:
            average_moments(optimizers)

    lengths = round_lengths(point, setup.steps)
    step = 0
    for number, length in enumerate(lengths):
        for model in models:
            model.train()
        for _ in range(length):
            if inflight is not None and step == land_at:
                land(inflight)
                inflight = None
            lr = (
                point.swarm_lr_scale
                * setup.inner_lr
                * lr_factor(step, setup.steps, setup.lr_schedule, setup.warmup_steps)
            )
            for model, optimizer, stream in zip(models, optimizers, streams, strict=True):
                inner_step(model, optimizer, stream, lr)
            step += 1
        if inflight is not None:  # tau = H (or a short last round): land before launching, as the node does
            land(inflight)
        inflight = [outer.pseudo_gradient(model) for model in models]
        tau = length if point.delay == "H" else min(int(point.delay), length)
        if tau == 0 or number == len(lengths) - 1:
            land(inflight)
            inflight = None
        else:
            land_at = step + tau
    final = evaluate(models[0], outer.params, held_out, torch.device("cpu"))
    return {
        "final_loss": final,
        "rounds": len(lengths),
        "samples": setup.peers * setup.steps * setup.batch_size,
        "seconds": time.perf_counter() - started,
    }


def average_moments(optimizers: list[torch.optim.Optimizer]) -> None:
    """Every peer's optimizer state tensors (AdamW's moments; Muon's momentum) become the peers' mean."""
    parts = [getattr(opt, "parts", [opt]) for opt in optimizers]  # an InnerOptimizer keeps state in its parts
    states = [[part.state[p] for part in own for group in part.param_groups for p in group["params"]] for own in parts]
    for per_param in zip(*states, strict=True):
        for key, value in per_param[0].items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                mean = torch.stack([state[key] for state in per_param]).mean(dim=0)
                for state in per_param:
                    state[key].copy_(mean)


def derive(
    setup: Setup, point: Point, run: dict[str, Any], central: list[Any], pooled: list[Any], alone: float
) -> dict[str, Any]:
    """The configuration's JSON line."""
    swarm, central_loss, pooled_loss = run["final_loss"], central[-1][1], pooled[-1][1]
    needed = samples_to_reach(central, swarm)
    efficiency = (central[-1][0] if needed is None else needed) / run["samples"]
    pooled_needed = samples_to_reach(pooled, swarm)
    return {
        "seed": setup.seed,
        "preset": setup.preset,
        "peers": setup.peers,
        "steps": setup.steps,
        "lr_schedule": setup.lr_schedule,
        "inner_optimizer": setup.inner_optimizer,
        "inner_lr": setup.inner_lr,
        "warmup_steps": setup.warmup_steps if setup.lr_schedule == "cosine" else 0,
        **asdict(point),
        "delay": point.delay if point.delay == "H" else int(point.delay),
        "rounds": run["rounds"],
        "final_loss": round(swarm, 4),
        "central_final_loss": round(central_loss, 4),
        "alone_final_loss": round(alone, 4),
        "gap_closed": round((alone - swarm) / (alone - central_loss), 4),
        "efficiency": round(efficiency, 4),
        "efficiency_is_lower_bound": needed is None,
        "pooled_final_loss": round(pooled_loss, 4),
        "gap_closed_pooled": round((alone - swarm) / (alone - pooled_loss), 4),
        "efficiency_pooled": round((pooled[-1][0] if pooled_needed is None else pooled_needed) / run["samples"], 4),
        "seconds": round(run["seconds"], 1),
    }


def comma(kind: type) -> Any:
    def parse(text: str) -> list[Any]:
        return [kind(item) for item in text.split(",") if item]

    return parse


def delays(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    for item in items:
        if item != "H" and not (item.isdigit()):
            raise argparse.ArgumentTypeError(f"--delay takes inner-step counts or H, got {item!r}")
    return items


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/tinyshakespeare.txt"), help="a text file")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small", help="model and steps, e.g. small")
    parser.add_argument("--peers", type=comma(int), default=[4], help="N peers, comma list, e.g. 4,8")
    parser.add_argument("--steps", type=int, default=0, help="inner steps per peer (0: the preset's), e.g. 1000")
    parser.add_argument("--outer-lr", type=comma(float), default=[0.7], help="outer lr, e.g. 1.0,0.7,0.5,1.2")
    parser.add_argument("--outer-momentum", type=comma(float), default=[0.9], help="outer momentum, e.g. 0,0.5,0.9")
    parser.add_argument("--inner-steps", type=comma(int), default=[20], help="H, e.g. 5,10,25,50,100")
    parser.add_argument(
        "--delay", type=delays, default=["H"], help="tau inner steps, or H (one round late), e.g. 0,2,H"
    )
    parser.add_argument("--lr-schedule", type=comma(str), default=["constant"], help="constant,cosine")
    parser.add_argument("--inner-optimizer", type=comma(str), default=["adamw"], help="adamw,muon (all runs)")
    parser.add_argument("--inner-lr", type=comma(float), default=[0.0], help="inner lr of all runs (0: preset's)")
    parser.add_argument("--sync-moments", type=comma(int), default=[0], help="average AdamW moments too: 0,1")
    parser.add_argument("--swarm-lr-scale", type=comma(float), default=[1.0], help="peers' inner lr x, e.g. 1,1.5,2")
    parser.add_argument("--warmup-steps", type=int, default=50, help="cosine: linear warmup steps, e.g. 50")
    parser.add_argument("--warm-start-rounds", type=comma(int), default=[0], help="K rounds of small H, e.g. 0,100")
    parser.add_argument("--warm-start-h", type=int, default=1, help="inner steps of a warm-start round, e.g. 1")
    parser.add_argument("--seed", type=comma(int), default=[0], help="model and batch seeds, e.g. 0,1,2")
    parser.add_argument("--eval-every", type=int, default=10, help="central steps between evaluations, e.g. 10")
    parser.add_argument("--jobs", type=int, default=1, help="configurations run in parallel processes, e.g. 2")
    parser.add_argument("--json", action="store_true", help="one JSON line per configuration and a summary line")
    args = parser.parse_args()
    for kind in args.inner_optimizer:
        if kind not in ("adamw", "muon"):
            parser.error(f"--inner-optimizer takes adamw or muon, got {kind!r}")
    for schedule in args.lr_schedule:
        if schedule not in ("constant", "cosine"):
            parser.error(f"--lr-schedule takes constant or cosine, got {schedule!r}")
    if not Path(args.data).is_file():
        parser.error(f"--data {args.data} is not a file")
    if min(args.inner_steps) < 1 or args.warm_start_h < 1 or args.jobs < 1 or min(args.peers) < 1:
        parser.error("--inner-steps, --warm-start-h, --jobs and --peers must be >= 1")
    for h, tau in itertools.product(args.inner_steps, args.delay):
        if tau != "H" and int(tau) > h:
            parser.error(f"--delay {tau} exceeds H = {h}: at most one round may be in flight")
    return args


def main() -> int:
    args = parse_args()
    started = time.perf_counter()
    steps = args.steps or int(PRESETS[args.preset]["steps"])
    setups = [
        Setup(args.data, args.preset, n, steps, s, args.warmup_steps, args.eval_every, o, lr, seed)
        for n, s, o, lr, seed in itertools.product(
            args.peers, args.lr_schedule, args.inner_optimizer, args.inner_lr, args.seed
        )
    ]
    points = [
        Point(lr, m, h, tau, k, args.warm_start_h, scale, bool(sync))
        for lr, m, h, tau, k, scale, sync in itertools.product(
            args.outer_lr,
            args.outer_momentum,
            args.inner_steps,
            args.delay,
            args.warm_start_rounds,
            args.swarm_lr_scale,
            args.sync_moments,
        )
    ]
    lines: list[dict[str, Any]] = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        bases: dict[tuple[Setup, str], Future[dict[str, Any]]] = {
            (setup, kind): pool.submit(baseline, setup, kind)
            for setup in setups
            for kind in ("central", "pooled", "alone")
        }
        runs = [(setup, point, pool.submit(simulate, setup, point)) for setup in setups for point in points]
        for setup, point, future in runs:
            central, pooled = (bases[(setup, kind)].result()["curve"] for kind in ("central", "pooled"))
            alone = bases[(setup, "alone")].result()["curve"][-1][1]
            line = derive(setup, point, future.result(), central, pooled, alone)
            lines.append(line)
            if args.json:
                print(json.dumps(line), flush=True)
            else:
                print(
                    f"N={line['peers']} lr={point.outer_lr} m={point.outer_momentum} H={point.inner_steps} "
                    f"tau={point.delay} {setup.lr_schedule} {setup.inner_optimizer} lr={setup.inner_lr} "
                    f"x{point.swarm_lr_scale} K={point.warm_start_rounds}: loss {line['final_loss']} "
                    f"gap_closed {line['gap_closed']} efficiency {line['efficiency']} "
                    f"(central {line['central_final_loss']}, alone {line['alone_final_loss']}; "
                    f"pooled {line['pooled_final_loss']}: gap_closed {line['gap_closed_pooled']}) seed {setup.seed}",
                    flush=True,
                )
    best = min(lines, key=lambda line: line["final_loss"])
    summary = {"summary": True, "configurations": len(lines), "best": best, "seconds": time.perf_counter() - started}
    print(json.dumps(summary) if args.json else f"best: {json.dumps(best)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

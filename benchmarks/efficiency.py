"""Training efficiency and bytes on the wire: the swarm against centralized training on the same samples.

One invocation runs all four, on 127.0.0.1::

    python benchmarks/efficiency.py --data ../shared/data/tinyshakespeare.txt --peers 4 --json
    python benchmarks/efficiency.py --data ../shared/data/tinyshakespeare.txt --preset medium --plot medium.png

(a) Centralized baseline: one process, all training bytes, batches drawn from all of them,
    batch = N x the per-peer batch, as many AdamW steps as each peer's inner steps in all
    (rounds x H), the same learning rate; the held-out loss is measured every ``--eval-every``
    steps, giving a curve of loss against samples. It (and the alone run) gets ``--threads`` cores.
(b) Alone: one model trained in this process on peer 0's slice exactly as that peer sees it (the
    90% of the slice its node trains on, ``split_corpus``, in the node's batch order), the per-peer
    batch, the same steps and learning rate as each peer, and no peers; the held-out curve is measured like central's.
(c) Pooled: the central run on the bytes the peers train on, pooled (each slice's training 90%, as each
    node cuts it; the 10% every node holds out for its own evaluation is left out), batch N x the
    per-peer batch, the same steps: what pooling the peers' training data gives. ``--no-pooled`` skips it.
(d) The swarm: a bootstrap peer and N ``zen-node join`` processes, each with a contiguous
    (non-IID) slice of the training bytes, secure aggregation with compression (``--bits``,
    ``--fraction``, error feedback) and the overlapped outer loop (unless ``--no-overlap``), for the
    same total samples. Every peer keeps each round's global parameters (``--save-round-params``);
    peer 0's are evaluated on the same held-out slice (the file's last 10%), one point per round.

Model families (``--family``): ``zen-gpt`` (default), the built-in byte GPT of ``--n-layer``,
``--n-head``, ``--d-model``; ``hf``, a Llama-shaped transformers model of the same flags (4 heads unless
given) with a 512-token BPE tokenizer trained on the training bytes, its files written to the scratch
folder (benchmarks/model_family.py); the context is then in tokens. ``--lora`` (with ``hf``): rank-8
LoRA adapters on q_proj and v_proj over a frozen base (the seeded init, not pretrained); the adapters
are the only parameters trained and sent. All four runs build the model as a node does.

Presets (``--preset``) set the model and the length of the run; any flag given explicitly still wins:

- ``small``: 2 layers, 2 heads, width 64, context 64 (120,576 parameters), batch 16, 1000 steps
  per peer;
- ``medium``: 3 layers, 2 heads, width 96, context 64 (366,432 parameters), batch 16, 3000 steps
  per peer (N = 4 in under 15 minutes, N = 8 in under 30, on a 2-core CPU).

With a preset, H is the run's default (``TrainConfig().inner_steps``) unless ``--inner-steps`` is
given, rounds = ceil(steps per peer / H) unless ``--rounds`` is given, and the inner and outer
learning rates, momentum, overlap, bits and fraction are the run's own defaults (node/run_config.py),
so a preset measures what a user gets. Without a preset the benchmark's settings are unchanged
(8 rounds of H = 50, outer 0.7 / 0.9, 8-bit codes, random-k 10%).

JSON fields: ``central_final_loss``, ``swarm_final_loss``, ``alone_final_loss``,
``swarm_minus_alone`` (below zero: the swarm beats a peer alone), ``gap_closed`` ((alone - swarm) /
(alone - central), from the reported 4-decimal losses; 1: as good as pooling the data; null when
alone equals central), ``efficiency`` (samples the central run needed to reach the swarm's final
loss, interpolated on its curve, over the samples the swarm consumed; when the central run never
gets that low, central samples / swarm samples, with ``efficiency_is_lower_bound`` true),
``naive_bytes_per_peer`` (a float32 ring all-reduce of all parameters every optimizer step:
2(N-1)/N x 4 x params x steps), ``swarm_bytes_per_peer`` (every byte each peer's libp2p daemon sent
over TCP, DHT included, mean over peers), ``bytes_ratio`` (naive / measured), ``utilization``
(inner-step seconds over wall seconds of every round report of every peer, from the start of
training to the last landed round), ``pooled_final_loss``, ``gap_closed_pooled`` and
``efficiency_pooled`` (the same against the pooled run; ``efficiency_pooled_is_lower_bound``; all null
with ``--no-pooled``), ``central_curve``, ``alone_curve``, ``pooled_curve`` and ``swarm_curve`` (lists
of [samples consumed, held-out loss]; the swarm's has one point per round kept, round 0 included,
its samples summed over all peers up to that round), ``preset``, the setup and the seconds of each run;
``family``, ``lora`` (the adapters' settings, or null), ``parameters`` (trainable: the adapters with
``--lora``; ``params`` is the same count), ``model_bytes`` (float32 of every saved value, base
included), ``adapter_bytes`` (float32 adapters, null without ``--lora``) and ``bytes_per_round_per_peer``
(bytes each peer's daemon sent from its round-0 report to its last, over the rounds it trained, mean
over peers).
``--plot FILE.png`` draws the four curves against samples and against steps per participant
(needs matplotlib: ``pip install -e ".[bench]"``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from efficiency_plot import Curve, plot  # noqa: E402  (benchmarks/, this script's folder)
from model_family import BenchmarkModel, gpt_model, hf_model  # noqa: E402

from node.config import AggregationConfig, CompressionConfig, TrainConfig  # noqa: E402
from node.data import TokenBatches, batch_seed, split_corpus  # noqa: E402
from node.demo import join_command, start_bootstrap, stop_process  # noqa: E402
from node.training.checkpoint import load_round_params  # noqa: E402
from node.training.optimizers import build_inner_optimizer  # noqa: E402
from node.training.report import REPORT_FILE  # noqa: E402

EVAL_BATCHES = 16
SEED = 0


@dataclass(frozen=True)
class Preset:
    """A model and a run length that users run (``--preset``); training settings are the run's defaults."""

    n_layer: int  # transformer blocks
    n_head: int  # attention heads
    d_model: int  # width
    context: int  # tokens per sequence
    batch_size: int  # per-peer batch (sequences)
    steps_per_peer: int  # inner steps each peer takes in all (rounds x H)
    eval_every: int  # central and alone steps between held-out evaluations
    timeout: float  # seconds the swarm may take


PRESETS = {
    "small": Preset(
        n_layer=2, n_head=2, d_model=64, context=64, batch_size=16, steps_per_peer=1000, eval_every=10, timeout=1800.0
    ),
    "medium": Preset(
        n_layer=3, n_head=2, d_model=96, context=64, batch_size=16, steps_per_peer=3000, eval_every=25, timeout=3600.0
    ),
}

# Without --preset: the benchmark's own settings, as they have always been.
DEFAULTS: dict[str, Any] = {
    "rounds": 8,
    "inner_steps": 50,
    "batch_size": 16,
    "inner_lr": 3e-3,
    "inner_optimizer": "adamw",
    "outer_lr": TrainConfig().outer_lr,  # the run's defaults (they were DiLoCo's 0.7 / 0.9 before the sweep)
    "outer_momentum": TrainConfig().outer_momentum,
    "n_layer": 2,
    "n_head": 2,
    "d_model": 64,
    "context": 64,
    "bits": 8,
    "fraction": 0.1,
    "overlap": TrainConfig().overlap,
    "group_rounds": AggregationConfig().group_rounds,
    "eval_every": 10,
    "timeout": 900.0,
}


def resolve_settings(args: argparse.Namespace) -> None:
    """Fill in every flag left unset: from ``--preset`` (and the run's defaults) if given, else ``DEFAULTS``."""
    chosen = {**DEFAULTS, "n_head": 4} if args.family == "hf" else dict(DEFAULTS)
    if args.preset:
        preset, train, compression = PRESETS[args.preset], TrainConfig(), CompressionConfig()
        inner_steps = train.inner_steps if args.inner_steps is None else args.inner_steps
        chosen.update(
            n_layer=preset.n_layer,
            n_head=preset.n_head,
            d_model=preset.d_model,
            context=preset.context,
            batch_size=preset.batch_size,
            eval_every=preset.eval_every,
            timeout=preset.timeout,
            inner_steps=inner_steps,
            rounds=max(1, math.ceil(preset.steps_per_peer / inner_steps)),
            inner_lr=train.inner_lr,
            inner_optimizer=train.inner_optimizer,
            outer_lr=train.outer_lr,
            outer_momentum=train.outer_momentum,
            overlap=train.overlap,
            bits=compression.bits,
            fraction=compression.fraction,
        )
    for key, value in chosen.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def run_toml(args: argparse.Namespace, model: BenchmarkModel) -> str:
    return f"""[run]
run_id = "zen-efficiency"
min_memory_gb = 0.0

{model.toml()}
[run.train]
inner_steps = {args.inner_steps}
batch_size = {args.batch_size}
inner_lr = {args.inner_lr}
inner_optimizer = "{args.inner_optimizer}"
outer_lr = {args.outer_lr}
outer_momentum = {args.outer_momentum}
seed = {SEED}
overlap = {"true" if args.overlap else "false"}

[run.aggregation]
mode = "secure"
min_group_size = {max(3, args.peers)}
matchmaking_time = 2.0
timeout = 120.0
group_rounds = {args.group_rounds}

[run.compression]
bits = {args.bits}
fraction = {args.fraction}
error_feedback = true
"""


def benchmark_model(args: argparse.Namespace, train: bytes, folder: Path) -> BenchmarkModel:
    """``--family``'s model; "hf" writes its config, tokenizer (trained on ``train``) and base into ``folder``."""
    if args.family == "zen-gpt":
        return gpt_model(args.n_layer, args.n_head, args.d_model, args.context)
    shape = {"n_layer": args.n_layer, "n_head": args.n_head, "d_model": args.d_model, "context": args.context}
    return hf_model(folder, train, shape, lora=args.lora, seed=SEED)


def held_out_batches(held_out: bytes, args: argparse.Namespace, model: BenchmarkModel) -> list[Any]:
    return model.batches(held_out, args.batch_size, seed=1234).take(EVAL_BATCHES)


def evaluate(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    with torch.no_grad():
        return sum(float(model(x, y)) for x, y in batches) / len(batches)


def train_curve(batches: TokenBatches, held_out: list[Any], args: argparse.Namespace, built: BenchmarkModel) -> Curve:
    """One model, the run's inner optimizer for rounds x H steps on ``batches``, no peers: the curve (samples,
    held-out loss)."""
    model = built.build(SEED)
    optimizer = build_inner_optimizer(model, args.inner_optimizer, args.inner_lr, 0.0)
    steps = args.rounds * args.inner_steps
    curve = [(0, evaluate(model, held_out))]
    for step in range(1, steps + 1):
        tokens, targets = batches.next()
        loss = model(tokens, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % args.eval_every == 0 or step == steps:
            curve.append((step * batches.batch_size, evaluate(model, held_out)))
    return curve


def central(train: bytes, held_out: list[Any], args: argparse.Namespace, model: BenchmarkModel) -> Curve:
    """The centralized run's curve: every training byte, batch N x the per-peer batch."""
    return train_curve(model.batches(train, args.peers * args.batch_size, seed=SEED), held_out, args, model)


def peer_bytes(train: bytes, args: argparse.Namespace, index: int) -> bytes:
    """The bytes peer ``index`` trains on: 90% of its contiguous slice, cut as its node cuts it."""
    share = len(train) // args.peers
    return split_corpus(train[index * share : (index + 1) * share], args.context)[0]


def alone(train: bytes, held_out: list[Any], args: argparse.Namespace, model: BenchmarkModel) -> Curve:
    """Peer 0 on its own: its slice split, tokenized and shuffled as its node does (``split_corpus``,
    ``batch_seed``)."""
    own = peer_bytes(train, args, 0)
    return train_curve(model.batches(own, args.batch_size, seed=batch_seed(SEED, own)), held_out, args, model)


def pooled(train: bytes, held_out: list[Any], args: argparse.Namespace, model: BenchmarkModel) -> Curve:
    """The central run on the peers' training bytes pooled: every slice's training 90% (``split_corpus``, as each
    node cuts its own), batch N x the per-peer batch."""
    owns = b"".join(peer_bytes(train, args, i) for i in range(args.peers))
    batches = model.batches(owns, args.peers * args.batch_size, seed=SEED)
    return train_curve(batches, held_out, args, model)


def against(baseline: Curve, alone_loss: float, swarm_loss: float, samples: int) -> tuple[Any, ...]:
    """(baseline's final loss, gap_closed, efficiency, efficiency_is_lower_bound) of the swarm against one baseline
    run (central or pooled), from the 4-decimal losses."""
    needed = samples_to_reach(baseline, swarm_loss)
    efficiency = (baseline[-1][0] if needed is None else needed) / samples
    final = round(baseline[-1][1], 4)
    gap = alone_loss - final
    return final, round((alone_loss - swarm_loss) / gap, 4) if gap else None, round(efficiency, 4), needed is None


def start_swarm(train: bytes, args: argparse.Namespace, root: Path, logs: list[IO[str]], started: list[Any]) -> None:
    """Start the bootstrap and N nodes of ``root / "run.toml"`` into ``started`` as (folder, process), the
    bootstrap first (``root``).

    ``logs`` and ``started`` fill as it goes, so the caller's cleanup reaches whatever did start.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    share = len(train) // args.peers
    boot_log = open(root / "bootstrap.log", "w")
    logs.append(boot_log)
    bootstrap, maddr = start_bootstrap(root, boot_log)
    started.append((root, bootstrap))
    for i in range(args.peers):
        folder = root / f"peer-{i}"
        folder.mkdir()
        (folder / "data.txt").write_bytes(train[i * share : (i + 1) * share])
        log = open(folder / "node.log", "w")
        logs.append(log)
        command = join_command(root / "run.toml", folder, maddr, args.rounds, args.peers)
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, text=True, cwd=ROOT)
        started.append((folder, process))


def swarm(
    train: bytes, held_out: list[Any], args: argparse.Namespace, root: Path, model: BenchmarkModel
) -> dict[str, Any]:
    """Run N nodes on contiguous slices; return the curve, final loss, samples, bytes and utilization."""
    logs: list[IO[str]] = []
    started: list[Any] = []
    (root / "run.toml").write_text(run_toml(args, model))
    try:
        start_swarm(train, args, root, logs, started)
        deadline = time.monotonic() + args.timeout
        for folder, process in started[1:]:
            try:
                process.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"{folder} did not finish within --timeout; see {folder / 'node.log'}") from None
            if process.returncode != 0:
                raise RuntimeError(f"{folder} failed; see {folder / 'node.log'}")
    finally:
        for _, process in reversed(started):
            stop_process(process)
        for handle in logs:
            handle.close()
    folders = [folder for folder, _ in started[1:]]
    reports = [[json.loads(line) for line in (f / "work" / REPORT_FILE).read_text().splitlines()] for f in folders]
    trained = [[r for r in peer if r["mode"] not in ("initial", "loaded")] for peer in reports]
    curve = swarm_curve(folders[0] / "work" / "rounds", trained, held_out, args, model)
    return {
        "curve": curve,
        "final_loss": curve[-1][1],
        "samples": sum(r["samples"] for peer in trained for r in peer),
        "bytes_per_peer": sum(peer[-1]["bytes_sent"] for peer in reports) / len(reports),
        "bytes_per_round": bytes_per_round(reports, trained),
        # time-weighted: inner-step seconds over wall seconds, every report of every peer
        "utilization": sum(r["utilization"] * r["seconds"] for peer in trained for r in peer)
        / max(1e-9, sum(r["seconds"] for peer in trained for r in peer)),
        "rounds_in_group": min(sum(r["mode"] == "group" for r in peer) for peer in reports),
    }


def bytes_per_round(reports: list[list[dict[str, Any]]], trained: list[list[dict[str, Any]]]) -> float:
    """Bytes a peer sent from its round-0 report (the join) to its last, over the rounds it trained; mean over peers."""
    sent = [
        (peer[-1]["bytes_sent"] - peer[0]["bytes_sent"]) / max(1, len(t))
        for peer, t in zip(reports, trained, strict=True)
    ]
    return sum(sent) / len(sent)


def swarm_curve(
    rounds_dir: Path,
    trained: list[list[dict[str, Any]]],
    held_out: list[Any],
    args: argparse.Namespace,
    built: BenchmarkModel,
) -> Curve:
    """Peer 0's global parameters of every round it kept, on the held-out batches; the last is round ``--rounds``.

    A round's samples are every peer's samples in the reports of that round and the ones before it.
    """
    model = built.build(SEED)  # the base (buffers with --lora) as every node built it; parameters are loaded
    numbered = sorted((int(path.stem.removeprefix("round-")), path) for path in rounds_dir.glob("round-*.safetensors"))
    if not numbered or numbered[-1][0] != args.rounds:
        raise RuntimeError(f"peer 0 kept no parameters of round {args.rounds} in {rounds_dir}")
    curve: Curve = []
    for number, path in numbered:
        with torch.no_grad():
            for param, value in zip(model.parameters(), load_round_params(path), strict=True):
                param.copy_(value)
        samples = sum(r["samples"] for peer in trained for r in peer if r["round"] <= number)
        curve.append((samples, evaluate(model, held_out)))
    return curve


def samples_to_reach(curve: Curve, loss: float) -> float | None:
    """Samples at which the curve first gets down to ``loss`` (linear between measurements); None: never."""
    if curve[0][1] <= loss:
        return 0.0
    for (s0, l0), (s1, l1) in itertools.pairwise(curve):
        if l1 <= loss:
            return s1 if l0 <= l1 else s0 + (s1 - s0) * (l0 - loss) / (l0 - l1)
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--data", required=True, help="a text file, e.g. ../shared/data/tinyshakespeare.txt")
    add("--preset", choices=sorted(PRESETS), help="model and steps users run, e.g. medium (flags still override)")
    add("--family", choices=("zen-gpt", "hf"), default="zen-gpt", help="model family, e.g. hf (default zen-gpt)")
    add("--lora", action="store_true", help="with --family hf: train LoRA adapters on a frozen base, e.g. --lora")
    add("--peers", type=int, default=4, help="N swarm peers, e.g. 4")
    add("--rounds", type=int, help="outer rounds, e.g. 8 (default 8; a preset: steps per peer / H)")
    add("--inner-steps", type=int, help="H inner steps per round, e.g. 50 (default 50; a preset: the run's H)")
    add("--batch-size", type=int, help="per-peer batch (sequences), e.g. 16")
    add("--inner-lr", type=float, help="inner learning rate, e.g. 0.003 (a preset: the run's)")
    add(
        "--inner-optimizer",
        choices=["adamw", "muon"],
        help="inner optimizer of swarm, central and alone (a preset: the run's)",
    )
    add("--outer-lr", type=float, help="outer Nesterov learning rate, e.g. 0.7 (a preset: the run's)")
    add("--outer-momentum", type=float, help="outer Nesterov momentum, e.g. 0.9 (a preset: the run's)")
    add("--n-layer", type=int, help="transformer blocks, e.g. 2")
    add("--n-head", type=int, help="attention heads, e.g. 2 (default 2; --family hf: 4)")
    add("--d-model", type=int, help="model width, e.g. 64")
    add("--context", type=int, help="tokens per sequence, e.g. 64")
    add("--bits", type=int, choices=(4, 8, 16, 32), help="bits per value, e.g. 8 (a preset: the run's)")
    add("--fraction", type=float, help="random-k share of coordinates, e.g. 0.1 (a preset: the run's)")
    add(
        "--overlap",
        action=argparse.BooleanOptionalAction,
        help="overlapped outer loop; --no-overlap: synchronous (a preset: the run's)",
    )
    add("--group-rounds", type=int, help="rounds a formed group runs before all match again, e.g. 8 (the run's)")
    add("--eval-every", type=int, help="central and alone steps between evaluations, e.g. 10 (medium: 25)")
    add("--max-bytes", type=int, default=0, help="use only the first B bytes of --data (0: all)")
    add("--timeout", type=float, help="seconds the swarm may take, e.g. 900 (small 1800, medium 3600)")
    add(
        "--no-pooled",
        dest="pooled",
        action="store_false",
        help="skip the pooled run (central on the peers' own training bytes), e.g. --no-pooled",
    )
    add("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of central and alone, e.g. 2 (all)")
    add("--workdir", default="", help="keep the swarm's folders (logs, reports, round params, hf model files) here")
    add("--plot", default="", help="draw held-out loss against samples to this PNG, e.g. efficiency.png")
    add("--json", action="store_true", help="print one JSON line, e.g. --json")
    return parser


def summarize(
    args: argparse.Namespace, curves: dict[str, Curve], result: dict[str, Any], facts: dict[str, Any]
) -> dict[str, Any]:
    """The JSON line: losses, efficiency, bytes, utilization, the curves and the setup (``facts``: the model's)."""
    params = facts["parameters"]
    naive = 2 * (args.peers - 1) / args.peers * 4 * params * args.rounds * args.inner_steps
    swarm_loss, alone_loss = round(result["final_loss"], 4), round(curves["alone"][-1][1], 4)
    central_loss, gap_closed, efficiency, lower = against(curves["central"], alone_loss, swarm_loss, result["samples"])
    pooled = (None,) * 4
    if "pooled" in curves:
        pooled = against(curves["pooled"], alone_loss, swarm_loss, result["samples"])
    return {
        "preset": args.preset,
        "peers": args.peers,
        "params": params,
        "rounds": args.rounds,
        "inner_steps": args.inner_steps,
        "bits": args.bits,
        "fraction": args.fraction,
        "overlap": args.overlap,
        "group_rounds": args.group_rounds,
        "outer_lr": args.outer_lr,
        "outer_momentum": args.outer_momentum,
        "inner_lr": args.inner_lr,
        "inner_optimizer": args.inner_optimizer,
        "central_final_loss": central_loss,
        "swarm_final_loss": swarm_loss,
        "alone_final_loss": alone_loss,
        "swarm_minus_alone": round(swarm_loss - alone_loss, 4),
        "gap_closed": gap_closed,
        "efficiency": efficiency,
        "efficiency_is_lower_bound": lower,
        "pooled_final_loss": pooled[0],
        "gap_closed_pooled": pooled[1],
        "efficiency_pooled": pooled[2],
        "efficiency_pooled_is_lower_bound": pooled[3],
        "central_samples": curves["central"][-1][0],
        "swarm_samples": result["samples"],
        "naive_bytes_per_peer": int(naive),
        "swarm_bytes_per_peer": int(result["bytes_per_peer"]),
        "bytes_ratio": round(naive / max(result["bytes_per_peer"], 1), 1),
        "utilization": round(result["utilization"], 4),
        "rounds_in_group": result["rounds_in_group"],
        **facts,
        "bytes_per_round_per_peer": int(result["bytes_per_round"]),
        "central_seconds": result["central_seconds"],
        "alone_seconds": result["alone_seconds"],
        "pooled_seconds": result.get("pooled_seconds"),
        "swarm_seconds": result["swarm_seconds"],
        **{f"{name}_curve": [[s, round(loss, 4)] for s, loss in curve] for name, curve in curves.items()},
    }


def compare(
    train: bytes, held_out_bytes: bytes, args: argparse.Namespace, root: Path, model: BenchmarkModel
) -> tuple[dict[str, Curve], dict[str, Any]]:
    """Run central, alone, pooled (unless ``--no-pooled``) and the swarm (in ``root``) on ``model``; return their
    curves and the JSON summary."""
    held_out = held_out_batches(held_out_bytes, args, model)
    # central and alone run while nothing else of ours does: every core (--threads 1 on a busy machine)
    torch.set_num_threads(max(1, args.threads))
    timings: dict[str, float] = {}
    started = time.perf_counter()
    curves = {"central": central(train, held_out, args, model)}
    timings["central_seconds"], started = round(time.perf_counter() - started, 1), time.perf_counter()
    curves["alone"] = alone(train, held_out, args, model)
    timings["alone_seconds"], started = round(time.perf_counter() - started, 1), time.perf_counter()
    if args.pooled:
        curves["pooled"] = pooled(train, held_out, args, model)
        timings["pooled_seconds"], started = round(time.perf_counter() - started, 1), time.perf_counter()
    result = swarm(train, held_out, args, root, model)
    curves["swarm"] = result["curve"]
    result["swarm_seconds"] = round(time.perf_counter() - started, 1)
    return curves, summarize(args, curves, {**result, **timings}, model.facts())


def read_data(parser: argparse.ArgumentParser, args: argparse.Namespace) -> bytes:
    """``--data`` (its first ``--max-bytes``), after the checks that need no data; parser.error on a bad one."""
    if args.peers < 3:
        parser.error(f"--peers must be >= 3 (secure aggregation), got {args.peers}")
    if args.lora and args.family != "hf":
        parser.error("--lora needs --family hf (the built-in GPT trains every parameter)")
    if args.plot:
        try:
            import matplotlib  # noqa: F401  (only --plot needs it; fail before the runs, not after)
        except ImportError:
            parser.error('--plot needs matplotlib: pip install -e ".[bench]"')
    try:
        data = Path(args.data).read_bytes()
    except OSError as e:
        parser.error(f"cannot read --data {args.data}: {e.strerror}")
    data = data[: args.max_bytes] if args.max_bytes else data
    if int(len(data) * 0.9) // args.peers <= 4 * args.context:
        parser.error(f"--data is too small for {args.peers} peers with context {args.context}")
    return data


def main() -> int:
    parser = build_parser()
    args = parser.parse_args()
    resolve_settings(args)
    data = read_data(parser, args)
    split = int(len(data) * 0.9)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.workdir or scratch)
        root.mkdir(parents=True, exist_ok=True)
        if any(root.iterdir()):
            parser.error(f"--workdir {root} is not empty")
        # the "hf" files live beside the swarm's folders: its nodes read them there
        model = benchmark_model(args, data[:split], root / "model")
        curves, summary = compare(data[:split], data[split:], args, root, model)
    if args.plot:
        title = f"{args.preset or 'custom'}: N = {args.peers}, {summary['params']:,} parameters, H = {args.inner_steps}"
        per_step = {name: args.peers * args.batch_size for name in ("central", "pooled", "swarm")}
        unit = "byte" if args.family == "zen-gpt" else "token"
        plot(args.plot, curves, {**per_step, "alone": args.batch_size}, title, unit)
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            shown = f"{len(value)} points, last {value[-1]}" if key.endswith("_curve") else value
            print(f"{key:>26s}: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training efficiency and bytes on the wire: the swarm against centralized training on the same samples.

One invocation runs both, on 127.0.0.1::

    python benchmarks/efficiency.py --data ../shared/data/tinyshakespeare.txt --peers 4 --json

(a) Centralized baseline: one process, all training bytes, batches drawn from all of them,
    batch = N x the per-peer batch, as many AdamW steps as each peer's inner steps in all
    (rounds x H), the same learning rate; the held-out loss is measured every ``--eval-every``
    steps, giving a curve of loss against samples.
(b) The swarm: a bootstrap peer and N ``zen-node join`` processes, each with a contiguous
    (non-IID) slice of the training bytes, secure aggregation with compression (``--bits``,
    ``--fraction``, error feedback) and the overlapped outer loop, for the same total samples.
    Its final global parameters are evaluated on the same held-out slice (the file's last 10%).

JSON fields: ``central_final_loss``, ``swarm_final_loss``, ``efficiency`` (samples the central run
needed to reach the swarm's final loss, interpolated on its curve, over the samples the swarm
consumed; when the central run never gets that low, central samples / swarm samples, with
``efficiency_is_lower_bound`` true), ``naive_bytes_per_peer`` (a float32 ring all-reduce of all
parameters every optimizer step: 2(N-1)/N x 4 x params x steps), ``swarm_bytes_per_peer`` (every
byte each peer's libp2p daemon sent over TCP, DHT included, mean over peers), ``bytes_ratio``
(naive / measured), ``utilization`` (inner-step seconds over wall seconds of every round report of
every peer, from the start of training to the last landed round), and the setup.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from node.config import ModelConfig  # noqa: E402
from node.data import ByteBatches  # noqa: E402
from node.demo import start_bootstrap, stop_process  # noqa: E402
from node.model import build_model  # noqa: E402
from node.training.report import REPORT_FILE  # noqa: E402

EVAL_BATCHES = 16
SEED = 0


def run_toml(args: argparse.Namespace) -> str:
    return f"""[run]
run_id = "zen-efficiency"
min_memory_gb = 0.0

[run.model]
n_layer = {args.n_layer}
n_head = {args.n_head}
d_model = {args.d_model}
context = {args.context}

[run.train]
inner_steps = {args.inner_steps}
batch_size = {args.batch_size}
inner_lr = {args.inner_lr}
outer_lr = {args.outer_lr}
outer_momentum = {args.outer_momentum}
seed = {SEED}
overlap = {"true" if args.overlap else "false"}

[run.aggregation]
mode = "secure"
min_group_size = {max(3, args.peers)}
matchmaking_time = 2.0
timeout = 120.0

[run.compression]
bits = {args.bits}
fraction = {args.fraction}
error_feedback = true
"""


def model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model, context=args.context)


def held_out_batches(held_out: bytes, args: argparse.Namespace) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches = ByteBatches(held_out, args.context, args.batch_size, seed=1234)
    return [batches.next() for _ in range(EVAL_BATCHES)]


def evaluate(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    with torch.no_grad():
        return sum(float(model(x, y)) for x, y in batches) / len(batches)


def central(train: bytes, held_out: list[Any], args: argparse.Namespace) -> list[tuple[int, float]]:
    """The centralized run's curve: (samples consumed, held-out loss)."""
    model = build_model(model_config(args), SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.inner_lr, weight_decay=0.0)
    batch = args.peers * args.batch_size
    batches = ByteBatches(train, args.context, batch, seed=SEED)
    steps = args.rounds * args.inner_steps
    curve = [(0, evaluate(model, held_out))]
    for step in range(1, steps + 1):
        tokens, targets = batches.next()
        loss = model(tokens, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % args.eval_every == 0 or step == steps:
            curve.append((step * batch, evaluate(model, held_out)))
    return curve


def swarm(train: bytes, held_out: list[Any], args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Run N nodes on contiguous slices; return the final loss, samples, bytes and utilization."""
    (root / "run.toml").write_text(run_toml(args))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    share = len(train) // args.peers
    logs: list[IO[str]] = []
    processes: list[subprocess.Popen[str]] = []
    nodes = []
    try:
        boot_log = open(root / "bootstrap.log", "w")
        logs.append(boot_log)
        bootstrap, maddr = start_bootstrap(root, boot_log)
        processes.append(bootstrap)
        for i in range(args.peers):
            folder = root / f"peer-{i}"
            folder.mkdir()
            (folder / "data.txt").write_bytes(train[i * share : (i + 1) * share])
            log = open(folder / "node.log", "w")
            logs.append(log)
            command = [sys.executable, "-m", "node.cli", "join", "--config", str(root / "run.toml")]
            command += ["--initial-peers", maddr, "--host-maddrs", "/ip4/127.0.0.1/tcp/0"]
            command += ["--data", str(folder / "data.txt"), "--identity", str(folder / "identity")]
            command += ["--workdir", str(folder / "work"), "--rounds", str(args.rounds)]
            command += ["--min-peers", str(args.peers), "--save-round-params"]
            processes.append(
                subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, text=True, cwd=ROOT)
            )
            nodes.append((folder, processes[-1]))
        deadline = time.monotonic() + args.timeout
        for folder, process in nodes:
            try:
                process.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"{folder} did not finish within --timeout; see {folder / 'node.log'}") from None
            if process.returncode != 0:
                raise RuntimeError(f"{folder} failed; see {folder / 'node.log'}")
    finally:
        for process in reversed(processes):
            stop_process(process)
        for handle in logs:
            handle.close()
    reports = [
        [json.loads(line) for line in (folder / "work" / REPORT_FILE).read_text().splitlines()] for folder, _ in nodes
    ]
    trained = [[r for r in peer if r["mode"] not in ("initial", "loaded")] for peer in reports]
    model = build_model(model_config(args), SEED)
    final = torch.load(nodes[0][0] / "work" / "rounds" / f"round-{args.rounds:05d}.pt", weights_only=True)
    with torch.no_grad():
        for param, value in zip(model.parameters(), final, strict=True):
            param.copy_(value)
    return {
        "final_loss": evaluate(model, held_out),
        "samples": sum(r["samples"] for peer in trained for r in peer),
        "bytes_per_peer": sum(peer[-1]["bytes_sent"] for peer in reports) / len(reports),
        # time-weighted: inner-step seconds over wall seconds, every report of every peer
        "utilization": sum(r["utilization"] * r["seconds"] for peer in trained for r in peer)
        / max(1e-9, sum(r["seconds"] for peer in trained for r in peer)),
        "rounds_in_group": min(sum(r["mode"] == "group" for r in peer) for peer in reports),
    }


def samples_to_reach(curve: list[tuple[int, float]], loss: float) -> float | None:
    """Samples at which the curve first gets down to ``loss`` (linear between measurements); None: never."""
    if curve[0][1] <= loss:
        return 0.0
    for (s0, l0), (s1, l1) in itertools.pairwise(curve):
        if l1 <= loss:
            return s1 if l0 <= l1 else s0 + (s1 - s0) * (l0 - loss) / (l0 - l1)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a text file, e.g. ../shared/data/tinyshakespeare.txt")
    parser.add_argument("--peers", type=int, default=4, help="N swarm peers, e.g. 4")
    parser.add_argument("--rounds", type=int, default=8, help="outer rounds, e.g. 8")
    parser.add_argument("--inner-steps", type=int, default=50, help="H inner steps per round, e.g. 50")
    parser.add_argument("--batch-size", type=int, default=16, help="per-peer batch (sequences), e.g. 16")
    parser.add_argument("--inner-lr", type=float, default=3e-3, help="AdamW learning rate, e.g. 0.003")
    parser.add_argument("--outer-lr", type=float, default=0.7, help="outer Nesterov learning rate, e.g. 0.7")
    parser.add_argument("--outer-momentum", type=float, default=0.9, help="outer Nesterov momentum, e.g. 0.9")
    parser.add_argument("--n-layer", type=int, default=2, help="transformer blocks, e.g. 2")
    parser.add_argument("--n-head", type=int, default=2, help="attention heads, e.g. 2")
    parser.add_argument("--d-model", type=int, default=64, help="model width, e.g. 64")
    parser.add_argument("--context", type=int, default=64, help="tokens per sequence, e.g. 64")
    parser.add_argument("--bits", type=int, default=8, choices=(4, 8, 16, 32), help="bits per value, e.g. 8")
    parser.add_argument("--fraction", type=float, default=0.1, help="random-k share of coordinates, e.g. 0.1")
    parser.add_argument("--no-overlap", dest="overlap", action="store_false", help="synchronous outer loop")
    parser.add_argument("--eval-every", type=int, default=10, help="central steps between evaluations, e.g. 10")
    parser.add_argument("--max-bytes", type=int, default=0, help="use only the first B bytes of --data (0: all)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds the swarm may take, e.g. 900")
    parser.add_argument("--workdir", default="", help="keep the swarm's folders (logs, reports) here")
    parser.add_argument("--json", action="store_true", help="print one JSON line, e.g. --json")
    args = parser.parse_args()
    if args.peers < 3:
        parser.error(f"--peers must be >= 3 (secure aggregation), got {args.peers}")
    try:
        data = Path(args.data).read_bytes()
    except OSError as e:
        parser.error(f"cannot read --data {args.data}: {e.strerror}")
    if args.max_bytes:
        data = data[: args.max_bytes]
    split = int(len(data) * 0.9)
    train, held_out = data[:split], held_out_batches(data[split:], args)
    if len(train) // args.peers <= 4 * args.context:
        parser.error(f"--data is too small for {args.peers} peers with context {args.context}")
    torch.set_num_threads(1)
    started = time.perf_counter()
    curve = central(train, held_out, args)
    central_seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.workdir or scratch)
        root.mkdir(parents=True, exist_ok=True)
        if any(root.iterdir()):
            parser.error(f"--workdir {root} is not empty")
        result = swarm(train, held_out, args, root)
    swarm_seconds = time.perf_counter() - started - central_seconds
    needed = samples_to_reach(curve, result["final_loss"])
    lower_bound = needed is None
    efficiency = (curve[-1][0] if needed is None else needed) / result["samples"]
    params = sum(p.numel() for p in build_model(model_config(args), SEED).parameters())
    steps = args.rounds * args.inner_steps
    naive = 2 * (args.peers - 1) / args.peers * 4 * params * steps
    summary = {
        "peers": args.peers,
        "params": params,
        "rounds": args.rounds,
        "inner_steps": args.inner_steps,
        "bits": args.bits,
        "fraction": args.fraction,
        "overlap": args.overlap,
        "outer_lr": args.outer_lr,
        "outer_momentum": args.outer_momentum,
        "central_final_loss": round(curve[-1][1], 4),
        "swarm_final_loss": round(result["final_loss"], 4),
        "efficiency": round(efficiency, 4),
        "efficiency_is_lower_bound": lower_bound,
        "central_samples": curve[-1][0],
        "swarm_samples": result["samples"],
        "naive_bytes_per_peer": int(naive),
        "swarm_bytes_per_peer": int(result["bytes_per_peer"]),
        "bytes_ratio": round(naive / max(result["bytes_per_peer"], 1), 1),
        "utilization": round(result["utilization"], 4),
        "rounds_in_group": result["rounds_in_group"],
        "central_seconds": round(central_seconds, 1),
        "swarm_seconds": round(swarm_seconds, 1),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            print(f"{key:>26s}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

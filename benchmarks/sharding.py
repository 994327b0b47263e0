"""Measure sharded training: loss vs the unsharded model on the same batches, throughput, failover time.

Starts ``--servers`` ``zen-node serve`` processes on 127.0.0.1 (the first ``--stages`` choose their
stages by block selection; the rest replicate the last stage) and one ``zen-node join`` trainer
on generated data; once the trainer reaches ``--kill-at``, the server of the last stage it is
using is SIGKILLed with its children (``--failure kill``: a machine that vanished; its port then
refuses connections) or SIGSTOPped (``--failure freeze``: a hung machine; calls time out after
``request_timeout``, 5 s here). Then it trains the same model
unsharded on the same batches in this process and compares::

    python benchmarks/sharding.py --json

JSON fields: ``loss_gap`` (largest relative difference of a step's loss, sharded vs unsharded),
``final_loss``, ``reference_final_loss``, ``tokens_per_second`` (the trainer's, over all steps),
``failover_seconds`` (the step that lost its server, minus the median step), ``steps``,
``stages``, ``servers``, ``n_layer``, ``d_model``, ``exactly_once`` (every step moved every
stage's version by one), ``seconds`` (wall time, process start-up included).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import psutil

from node.config import load_node_config
from node.data import generate_corpus
from node.demo import stop_process
from node.sharding.trainer import unsharded_losses

RUN_TOML = """
[run]
run_id = "bench-shard"
min_memory_gb = 0.0
[run.model]
n_layer = {n_layer}
d_model = {d_model}
context = 64
[run.train]
inner_steps = {steps}
batch_size = 16
[run.sharding]
stages = {stages}
local_blocks = 1
micro_batches = 2
request_timeout = 5.0
spot_check_fraction = 0.05
[node]
heartbeat_period = 1.0
record_ttl = 6.0
"""
SERVING = re.compile(r"serving stage\(s\) \[([0-9, ]+)\] of run \S+ as (\S+) .* multiaddrs (\S+)")


def start_server(folder: Path, log: IO[str], config: Path, initial: str | None, *extra: str) -> tuple[Any, str, str]:
    """A `zen-node serve` process; returns it, its PeerID and its multiaddr once it serves."""
    command = [sys.executable, "-m", "node.cli", "serve", "--config", str(config), "--identity", str(folder / "id")]
    command += ["--host-maddrs", "/ip4/127.0.0.1/tcp/0", *extra] + (["--initial-peers", initial] if initial else [])
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=ENV)
    assert process.stdout is not None
    for line in process.stdout:
        match = SERVING.search(line)
        if match:
            return process, match.group(2), match.group(3)
    raise RuntimeError(f"zen-node serve exited; see {log.name}")


def signal_family(pid: int, signum: int) -> None:
    """Send ``signum`` to a process and all its children (its DHT process and p2pd)."""
    family = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    for member in family:
        member.send_signal(signum)
    if signum == signal.SIGKILL:
        psutil.wait_procs(family, timeout=10)


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=int, default=2, help="remote stages, e.g. 2")
    parser.add_argument("--servers", type=int, default=3, help="serve processes (>= stages + 1 to fail over), e.g. 3")
    parser.add_argument("--n-layer", type=int, default=4, help="blocks of the GPT (one stays on the trainer), e.g. 4")
    parser.add_argument("--d-model", type=int, default=64, help="model width, e.g. 64")
    parser.add_argument("--steps", type=int, default=200, help="training steps, e.g. 200")
    parser.add_argument("--kill-at", type=int, default=100, help="kill a server at this step (0: never), e.g. 100")
    parser.add_argument("--failure", choices=("kill", "freeze"), default="kill", help="how a server fails, e.g. freeze")
    parser.add_argument(
        "--workdir", default=None, help="keep the processes' logs here (default: a temp folder), e.g. out"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON line, e.g. --json")
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.workdir or scratch)
        root.mkdir(parents=True, exist_ok=True)
        config = root / "run.toml"
        config.write_text(
            RUN_TOML.format(n_layer=args.n_layer, d_model=args.d_model, steps=args.steps, stages=args.stages)
        )
        corpus = generate_corpus(200_000, seed=21)
        (root / "data.txt").write_bytes(corpus)
        log = open(root / "servers.log", "w")
        servers: list[tuple[Any, str]] = []
        trainer = None
        try:
            maddr = None
            for index in range(args.servers):
                extra = ["--stages", str(args.stages - 1)] if index >= args.stages else []
                process, peer_id, address = start_server(root / f"s{index}", log, config, maddr, *extra)
                servers.append((process, peer_id))
                maddr = maddr or address
            command = [sys.executable, "-m", "node.cli", "join", "--config", str(config), "--initial-peers", str(maddr)]
            command += ["--data", str(root / "data.txt"), "--identity", str(root / "trainer-id"), "--rounds", "1"]
            command += ["--workdir", str(root / "work"), "--host-maddrs", "/ip4/127.0.0.1/tcp/0"]
            trainer_log = open(root / "trainer.log", "w")
            trainer = subprocess.Popen(command, stdout=trainer_log, stderr=subprocess.STDOUT, env=ENV)
            report = root / "work" / "steps.jsonl"  # a sharded trainer's line per step
            killed = False
            while trainer.poll() is None:
                lines = report.read_text().splitlines() if report.exists() else []
                if args.kill_at and not killed and len(lines) >= args.kill_at:
                    in_use = json.loads(lines[-1])["servers"][-1]
                    victim = next(p for p, peer in servers if peer.startswith(in_use))
                    signal_family(victim.pid, signal.SIGKILL if args.failure == "kill" else signal.SIGSTOP)
                    killed = True
                time.sleep(0.05)
            if trainer.returncode != 0:
                print(f"the trainer failed; see {log.name}", file=sys.stderr)
                return 1
            steps = [json.loads(line) for line in report.read_text().splitlines()]
        finally:
            for process, _ in servers:
                if process.poll() is None and psutil.Process(process.pid).status() == psutil.STATUS_STOPPED:
                    signal_family(process.pid, signal.SIGKILL)
                stop_process(process)
            if trainer is not None:
                stop_process(trainer)
            log.close()
        reference = unsharded_losses(load_node_config(str(config)).run, corpus, args.steps)
    gaps = [abs(s["loss"] - r) / abs(r) for s, r in zip(steps, reference, strict=True)]
    median = statistics.median(s["seconds"] for s in steps)
    failover = next((s for s in steps if s["failovers"] > 0), None)
    row = {
        "loss_gap": max(gaps),
        "final_loss": steps[-1]["loss"],
        "reference_final_loss": reference[-1],
        "tokens_per_second": sum(s["tokens_per_second"] * s["seconds"] for s in steps)
        / sum(s["seconds"] for s in steps),
        "failover_seconds": None if failover is None else max(0.0, failover["seconds"] - median),
        "steps": len(steps),
        "failure": args.failure,
        "stages": args.stages,
        "servers": args.servers,
        "n_layer": args.n_layer,
        "d_model": args.d_model,
        "exactly_once": [s["versions"] for s in steps] == [[i] * args.stages for i in range(1, len(steps) + 1)],
        "seconds": round(time.monotonic() - started, 1),
    }
    if args.json:
        print(json.dumps(row))
    else:
        for key, value in row.items():
            print(f"{key:22s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

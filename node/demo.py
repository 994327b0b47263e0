"""``zen-node demo``: a whole swarm on 127.0.0.1, as separate processes, on generated data.

Starts one ``zen-bootstrap`` and N ``zen-node join`` processes, each with its own contiguous
slice of a deterministic generated corpus (nothing is downloaded), trains N outer rounds,
prints a per-peer table and writes a JSON summary::

    zen-node demo --peers 3 --rounds 3 --summary-json out.json

Summary fields: ``peers``, ``rounds``, ``initial_loss`` and ``final_loss`` (held-out loss of the
global parameters, mean over peers), ``max_param_divergence`` (largest absolute difference of
any global parameter between any two peers after the last round), ``per_peer``, ``seconds``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from node.config import ConfigError
from node.data import generate_corpus
from node.training.checkpoint import load_round_params, round_params_path
from node.training.report import REPORT_FILE

BYTES_PER_PEER = 60_000


def _demo_config(peers: int, inner_steps: int, mode: str, rounds: int = 3, epsilon: float = 0.0) -> str:
    return f"""# Written by `zen-node demo`: the run every demo node shares.
[run]
run_id = "zen-demo"
min_memory_gb = 0.0

[run.model]
n_layer = 2
n_head = 2
d_model = 64
context = 64

[run.train]
inner_steps = {inner_steps}
batch_size = 16
inner_lr = 0.003

[run.aggregation]
mode = "{mode}"
min_group_size = {max(3 if mode == "secure" else 2, peers)}
matchmaking_time = 2.0
timeout = 180.0

[run.privacy]
enabled = {"true" if epsilon > 0 else "false"}
target_epsilon = {epsilon}
planned_rounds = {rounds}
clip_norm = 2.0
delta = 1e-5
"""


def stop_process(process: subprocess.Popen[Any], timeout: float = 15.0) -> None:
    """Terminate a child (SIGTERM: it shuts down cleanly), kill it if it lingers, close its stdout pipe."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)
    if process.stdout is not None:
        process.stdout.close()


def start_bootstrap(folder: Path, log: IO[str], timeout: float = 60.0) -> tuple[subprocess.Popen[str], str]:
    """Start ``zen-bootstrap`` on 127.0.0.1 and return it with the multiaddr it printed."""
    command = [sys.executable, "-m", "bootstrap.cli", "--host-maddrs", "/ip4/127.0.0.1/tcp/0"]
    command += ["--identity", str(folder / "bootstrap-identity"), "--http-port", "0"]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, text=True)
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        log.write(line)
        word = line.strip().split()[-1] if line.strip() else ""
        if word.startswith("/ip4/127.0.0.1/") and "/p2p/" in word:
            return process, word
    process.kill()
    raise RuntimeError(f"zen-bootstrap did not print its address; see {log.name}")


def _read_reports(workdir: Path) -> list[dict[str, Any]]:
    path = workdir / REPORT_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def max_divergence(files: list[Path]) -> float:
    """Largest absolute difference of any parameter between any two of the saved parameter lists."""
    params = [load_round_params(f) for f in files]
    worst = 0.0
    for i in range(len(params)):
        for j in range(i + 1, len(params)):
            for a, b in zip(params[i], params[j], strict=True):
                worst = max(worst, float((a - b).abs().max()))
    return worst


def join_command(config: Path, folder: Path, maddr: str, rounds: int, peers: int) -> list[str]:
    """``zen-node join`` for a local peer on 127.0.0.1 whose data, identity and workdir live in ``folder``."""
    return [
        *(sys.executable, "-m", "node.cli", "join", "--config", str(config)),
        *("--initial-peers", maddr, "--host-maddrs", "/ip4/127.0.0.1/tcp/0"),
        *("--data", str(folder / "data.txt"), "--identity", str(folder / "identity")),
        *("--workdir", str(folder / "work"), "--rounds", str(rounds)),
        *("--min-peers", str(peers), "--save-round-params"),
    ]


def check_demo_args(args: argparse.Namespace) -> None:
    """The demo's flags, checked before it clears and fills ``--workdir``; ConfigError names the fix."""
    if not 1 <= args.peers <= 32:
        raise ConfigError(f"--peers must be in [1, 32], got {args.peers}")
    if not 1 <= args.rounds <= 1000:
        raise ConfigError(f"--rounds must be in [1, 1000], got {args.rounds}")
    if args.privacy_epsilon < 0 or (args.privacy_epsilon > 0 and args.aggregation != "secure"):
        raise ConfigError("--privacy-epsilon must be > 0 and needs --aggregation secure")
    if args.aggregation == "secure" and args.peers < 3:
        raise ConfigError(
            f"secure aggregation needs --peers >= 3 (a sum of two reveals both inputs), got {args.peers}; "
            "use --aggregation plain for a smaller demo"
        )


def run_demo(args: argparse.Namespace) -> int:
    check_demo_args(args)
    root = Path(args.workdir).resolve()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    config = _demo_config(args.peers, args.inner_steps, args.aggregation, args.rounds, args.privacy_epsilon)
    (root / "run.toml").write_text(config)
    corpus = generate_corpus(BYTES_PER_PEER * args.peers, seed=7)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    print(f"demo: starting a bootstrap peer and {args.peers} nodes in {root}", flush=True)
    logs: list[IO[str]] = []
    processes: list[subprocess.Popen[str]] = []
    try:
        boot_log = open(root / "bootstrap.log", "w")
        logs.append(boot_log)
        bootstrap, maddr = start_bootstrap(root, boot_log)
        processes.append(bootstrap)
        print(f"demo: bootstrap peer at {maddr}", flush=True)
        nodes = []
        for i in range(args.peers):
            folder = root / f"peer-{i}"
            folder.mkdir()
            slice_ = corpus[i * BYTES_PER_PEER : (i + 1) * BYTES_PER_PEER]
            (folder / "data.txt").write_bytes(slice_)
            log = open(folder / "node.log", "w")
            logs.append(log)
            command = join_command(root / "run.toml", folder, maddr, args.rounds, args.peers)
            command += ["--log-level", args.log_level]
            process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, text=True
            )
            processes.append(process)
            nodes.append((folder, process))
        deadline = time.monotonic() + 300 + 120 * args.rounds
        for folder, process in nodes:
            remaining = max(1.0, deadline - time.monotonic())
            try:
                process.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"node in {folder} did not finish in time; see {folder / 'node.log'}") from None
        failed = [str(folder / "node.log") for folder, process in nodes if process.returncode != 0]
        if failed:
            print(f"demo: {len(failed)} node(s) failed; see {', '.join(failed)}", file=sys.stderr)
            return 1
    finally:
        for process in reversed(processes):
            stop_process(process)
        for handle in logs:
            handle.close()
    return _summarize(args, root, started)


def _summarize(args: argparse.Namespace, root: Path, started: float) -> int:
    per_peer, finals = [], []
    for i in range(args.peers):
        work = root / f"peer-{i}" / "work"
        reports = _read_reports(work)
        per_peer.append(
            {
                "peer": i,
                "initial_loss": reports[0]["eval_loss"],
                "final_loss": reports[-1]["eval_loss"],
                "final_round": reports[-1]["round"],
                "rounds_in_group": sum(r["mode"] == "group" for r in reports),
            }
        )
        finals.append(round_params_path(work, args.rounds))
    summary = {
        "peers": args.peers,
        "aggregation": args.aggregation,
        "privacy_epsilon": args.privacy_epsilon or None,
        "rounds": args.rounds,
        "initial_loss": sum(p["initial_loss"] for p in per_peer) / len(per_peer),
        "final_loss": sum(p["final_loss"] for p in per_peer) / len(per_peer),
        "max_param_divergence": max_divergence(finals) if len(finals) > 1 else 0.0,
        "seconds": round(time.perf_counter() - started, 1),
        "per_peer": per_peer,
    }
    print(f"\n{'peer':>4s} {'initial loss':>12s} {'final loss':>10s} {'rounds in group':>15s}")
    for p in per_peer:
        print(f"{p['peer']:4d} {p['initial_loss']:12.4f} {p['final_loss']:10.4f} {p['rounds_in_group']:15d}")
    print(
        f"\nloss {summary['initial_loss']:.4f} -> {summary['final_loss']:.4f}; "
        f"max divergence of global params between peers: {summary['max_param_divergence']:.2e}; "
        f"{summary['seconds']}s"
    )
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2) + "\n")
        print(f"summary written to {args.summary_json}")
    return 0

"""Every capability that composes today, in one run: cohorts on real text, secure aggregation, 8-bit
compression in the ring and record-level DP, with real ``zen-node join`` processes on 127.0.0.1.

Run::

    python benchmarks/full_swarm.py --json
    python benchmarks/full_swarm.py --domains 2 --peers-per-domain 3 --rounds 6 --json

Setup: a bootstrap peer and ``--domains`` x ``--peers-per-domain`` trainers; trainer ``i`` holds a
contiguous ``--bytes-per-peer`` slice of real text of domain ``i mod K`` (benchmarks/domain_corpora.py:
plays, the Python language reference, package licences; or ``--corpora-dir``). The run: cohorts on
(the adaptive rule), ``aggregation.mode = "secure"``, ``compression.bits = --bits``, record-level DP
at ``--epsilon`` (delta 1e-5) over the planned rounds. With ``--stages S`` the model has ``1 + S``
blocks, block 0 on the trainers and one block per stage on ``zen-node serve`` processes (``--servers``,
server ``k`` pinned to stage ``k mod S``); the trainers then average their own parts
(node/sharding/fronts.py), by cohort, and their parameters come from their checkpoints; DP-SGD then
clips each example over the whole model, the stages' share noised on their servers (node/sharding/private.py).

Then, in this process, each trainer's "alone" baseline: the same model trained alone on its own
slice for the same number of inner steps (AdamW, no DP, no averaging), evaluated on the same
held-out batches as the node's reports.

JSON fields: ``ari`` (cohorts found against the domains), ``cohorts``, ``loss_per_cohort`` and
``alone_loss_per_cohort`` (mean final held-out loss of the members, keyed by cohort id),
``epsilon`` (largest reported), ``groups_within_cohorts`` (every group round's peers in one cohort),
``cohort_params_identical`` / ``cohort_params_differ`` (cohort-tagged parameters equal inside each
cohort after the last round / different across cohorts), ``global_params_identical`` (global-tagged
parameters equal on every trainer after the last round: the cross-cohort ring's lineage merge),
``stage_steps_exactly_once`` (sharded: each stage's final version equals the trainers' steps, so every
step moved it exactly once; else null), ``bytes_per_peer`` (the mean of what each trainer's libp2p daemon
sent; sharded: its stage calls included), ``seconds``, and the setup.
"""

from __future__ import annotations

import argparse
import importlib.util
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

from dht import adjusted_rand_index  # noqa: E402
from node.aggregation.hierarchy import partition_parameters  # noqa: E402
from node.config import RunConfig, load_node_config  # noqa: E402
from node.data import ByteBatches, split_corpus  # noqa: E402
from node.demo import join_command, start_bootstrap, stop_process  # noqa: E402
from node.model import build_model  # noqa: E402
from node.sharding.stages import LocalParts  # noqa: E402
from node.training.checkpoint import Checkpoint, load_round_params  # noqa: E402
from node.training.report import REPORT_FILE, STEPS_FILE  # noqa: E402

EVAL_BATCHES = 4  # as the trainer's reports (node/training/trainer.py)


def domain_slices(args: argparse.Namespace) -> list[tuple[int, bytes]]:
    """(domain index, slice) per trainer, trainer i on domain i mod K."""
    if args.corpora_dir is not None:
        folders = sorted(d for d in args.corpora_dir.iterdir() if d.is_dir())
        texts = [b"\n".join(f.read_bytes() for f in sorted(d.glob("*.txt"))) for d in folders]
    else:
        spec = importlib.util.spec_from_file_location("domain_corpora", ROOT / "benchmarks" / "domain_corpora.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        texts = list(module.domain_texts().values())
    texts = texts[: args.domains]
    size, per = args.bytes_per_peer, args.peers_per_domain
    out = []
    for i in range(args.domains * per):
        k, j = i % args.domains, i // args.domains
        piece = texts[k][j * size : (j + 1) * size]
        if len(piece) < size:
            raise SystemExit(f"domain {k} has {len(texts[k])} bytes, too few for {per} peers of {size}")
        out.append((k, piece))
    return out


def run_toml(args: argparse.Namespace, peers: int) -> str:
    sharding = (
        f"""n_layer = {1 + args.stages}
[run.sharding]
stages = {args.stages}
local_blocks = 1
average_period = 0
stage_lr_scale = {args.stage_lr_scale}
"""
        if args.stages
        else ""
    )
    return f"""[run]
run_id = "zen-full"
min_memory_gb = 0.0
[run.model]
d_model = 32
context = 32
{sharding}[run.train]
inner_steps = {args.inner_steps}
batch_size = 16
inner_lr = 0.003
[run.aggregation]
mode = "secure"
min_group_size = 3
matchmaking_time = 2.0
timeout = 120.0
[run.compression]
bits = {args.bits}
[run.privacy]
enabled = {"true" if args.epsilon > 0 else "false"}
target_epsilon = {args.epsilon}
planned_rounds = {args.rounds}
delta = 1e-5
[run.cohorts]
enabled = true
global_every = 2
"""


def run_swarm(args: argparse.Namespace, data: list[tuple[int, bytes]], root: Path) -> list[Path]:
    """Start the bootstrap and every trainer, wait for all; returns the trainers' folders."""
    config = root / "run.toml"
    config.write_text(run_toml(args, len(data)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    logs: list[IO[str]] = [open(root / "bootstrap.log", "w")]
    started: list[tuple[Path, subprocess.Popen[Any]]] = []
    servers: list[subprocess.Popen[Any]] = []
    try:
        bootstrap, maddr = start_bootstrap(root, logs[0])
        started.append((root, bootstrap))
        for k in range(args.servers if args.stages else 0):
            folder = root / f"server-{k}"
            folder.mkdir()
            logs.append(open(folder / "node.log", "w"))
            command = [
                *(sys.executable, "-m", "node.cli", "serve", "--config", str(config)),
                *("--initial-peers", maddr, "--host-maddrs", "/ip4/127.0.0.1/tcp/0"),
                *("--identity", str(folder / "identity"), "--stages", str(k % args.stages)),
            ]
            servers.append(subprocess.Popen(command, stdout=logs[-1], stderr=subprocess.STDOUT, env=env))
        for i, (_, text) in enumerate(data):
            folder = root / f"peer-{i}"
            folder.mkdir()
            (folder / "data.txt").write_bytes(text)
            logs.append(open(folder / "node.log", "w"))
            command = join_command(config, folder, maddr, args.rounds, len(data))
            started.append((folder, subprocess.Popen(command, stdout=logs[-1], stderr=subprocess.STDOUT, env=env)))
        deadline = time.monotonic() + args.timeout
        for folder, process in started[1:]:
            if process.wait(timeout=max(1.0, deadline - time.monotonic())) != 0:
                raise RuntimeError(f"{folder} failed; see {folder / 'node.log'}")
    finally:
        for process in servers:
            stop_process(process)
        for _, process in reversed(started):
            stop_process(process)
        for log in logs:
            log.close()
    return [folder for folder, _ in started[1:]]


def alone_loss(text: bytes, config_path: Path, steps: int) -> float:
    """One peer alone on its own slice: same model and inner optimizer, ``steps`` AdamW steps, no DP."""
    run = load_node_config(str(config_path)).run
    train_bytes, eval_bytes = split_corpus(text, run.model.context)
    model = build_model(run.model, run.train.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=run.train.inner_lr, weight_decay=run.train.weight_decay)
    batches = ByteBatches(train_bytes, run.model.context, run.train.batch_size, seed=0)
    for _ in range(steps):
        x, y = batches.next()
        optimizer.zero_grad()
        model(x, y).backward()
        optimizer.step()
    evaluation = ByteBatches(eval_bytes, run.model.context, run.train.batch_size, seed=1234)
    with torch.no_grad():
        return sum(float(model(*evaluation.next())) for _ in range(EVAL_BATCHES)) / EVAL_BATCHES


def trainer_views(folders: list[Path], run: RunConfig) -> tuple[list[dict[str, Any]], list[str]]:
    """Per trainer: its final cohort, held-out loss, inner steps, final parameters and group rounds, whether its
    group rounds all fell in that cohort, and (sharded) its stages' versions; and the parameters' names."""
    views = []
    for folder in folders:
        rows = [json.loads(line) for line in (folder / "work" / REPORT_FILE).read_text().splitlines()]
        last = rows[-1]  # a line per round, sharded or not (node/training/report.py)
        grouped = [r for r in rows if r["mode"] == "group"]
        steps = sum(r["inner_steps"] for r in rows if r["mode"] not in ("initial", "loaded"))
        epsilon = max((r.get("epsilon") or 0.0) for r in rows)
        versions = None
        if run.sharding.stages:  # the trainer's own parts in its checkpoint; the stages' versions in steps.jsonl
            checkpoint = Checkpoint.load(folder / "work", run.digest())
            assert checkpoint is not None, f"{folder} wrote no checkpoint"
            params = checkpoint.global_params
            lines = (folder / "work" / STEPS_FILE).read_text().splitlines()
            versions = [max(json.loads(line)["versions"][k] for line in lines) for k in range(run.sharding.stages)]
        else:
            params = load_round_params(sorted((folder / "work" / "rounds").glob("*"))[-1])
        view = dict(steps=steps, params=params, bytes=last["bytes_sent"], epsilon=epsilon, versions=versions)
        view.update(
            cohort=last["cohort"],
            eval_loss=last["eval_loss"],
            group_rounds=len(grouped),
            within_cohort=all(r["cohort"] == last["cohort"] for r in grouped),
        )
        views.append(view)
    model = build_model(run.model, run.train.seed)
    own = LocalParts(model, run.sharding.local_blocks) if run.sharding.stages else model
    return views, [name for name, _ in own.named_parameters()]


def summarize(args: argparse.Namespace, data: list[tuple[int, bytes]], folders: list[Path], seconds: float) -> dict:
    run = load_node_config(str(folders[0].parent / "run.toml")).run
    views, names = trainer_views(folders, run)
    cohort_of = [v["cohort"] for v in views]
    ids = sorted(set(cohort_of))
    members = {c: [i for i, x in enumerate(cohort_of) if x == c] for c in ids}
    alone = [alone_loss(text, folders[0].parent / "run.toml", views[0]["steps"]) for _, text in data]
    partition = partition_parameters(names, run.cohorts)
    final = [v["params"] for v in views]

    def same(i: int, j: int) -> bool:
        return all(torch.equal(final[i][k], final[j][k]) for k in partition.cohort)

    total_steps = sum(v["steps"] for v in views)
    bytes_sent = [v["bytes"] for v in views]
    return {
        "ari": round(adjusted_rand_index([k for k, _ in data], cohort_of), 4),
        "cohorts": len(ids),
        "loss_per_cohort": {c: round(sum(views[i]["eval_loss"] for i in m) / len(m), 4) for c, m in members.items()},
        "alone_loss_per_cohort": {c: round(sum(alone[i] for i in m) / len(m), 4) for c, m in members.items()},
        "epsilon": max(v["epsilon"] for v in views),
        "groups_within_cohorts": all(v["within_cohort"] for v in views),
        "cohort_params_identical": all(same(m[0], i) for m in members.values() for i in m[1:]),
        "cohort_params_differ": all(not same(members[a][0], members[b][0]) for a in ids for b in ids if a < b),
        "global_params_identical": all(
            torch.equal(final[0][k], final[i][k]) for i in range(1, len(final)) for k in partition.global_
        ),
        "stage_steps_exactly_once": (
            all(max(v["versions"][k] for v in views) == total_steps for k in range(run.sharding.stages))
            if run.sharding.stages
            else None
        ),
        "bytes_per_peer": None if None in bytes_sent else round(sum(bytes_sent) / len(bytes_sent)),
        "rounds_in_group": min(v["group_rounds"] for v in views),
        "seconds": round(seconds, 1),
        "peers": len(data),
        "domains": args.domains,
        "rounds": args.rounds,
        "bits": args.bits,
        "target_epsilon": args.epsilon,
        "stages": args.stages,
        "servers": args.servers if args.stages else 0,
        "stage_lr_scale": args.stage_lr_scale if args.stages else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--domains", type=int, default=2, help="text domains (1-3), e.g. 2")
    parser.add_argument("--peers-per-domain", type=int, default=3, help="trainers per domain, e.g. 3")
    parser.add_argument("--bytes-per-peer", type=int, default=40_000, help="text per trainer, e.g. 40000")
    parser.add_argument("--rounds", type=int, default=6, help="outer rounds, e.g. 6")
    parser.add_argument("--inner-steps", type=int, default=10, help="inner steps per round, e.g. 10")
    parser.add_argument("--bits", type=int, default=8, help="compression bits in the ring, e.g. 8")
    parser.add_argument("--epsilon", type=float, default=8.0, help="record-level DP target epsilon (0: no DP), e.g. 8")
    parser.add_argument("--corpora-dir", type=Path, default=None, help="one sub-folder of .txt per domain")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds for the whole swarm, e.g. 900")
    parser.add_argument("--stages", type=int, default=0, help="remote stages (0: no sharding), e.g. 2")
    parser.add_argument("--servers", type=int, default=2, help="zen-node serve processes when sharded, e.g. 2")
    parser.add_argument(
        "--stage-lr-scale", type=float, default=1.0, help="sharding.stage_lr_scale when sharded, e.g. 1.0"
    )
    parser.add_argument("--keep", type=Path, default=None, help="keep the nodes' folders (logs, reports) here")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()
    if not 1 <= args.domains <= 3 or args.peers_per_domain < 3:
        parser.error("--domains must be in [1, 3] and --peers-per-domain >= 3 (a secure group needs 3)")
    if args.stages < 0 or (args.stages and args.servers < args.stages):
        parser.error("--stages must be >= 0, and --servers >= --stages (one server per stage)")
    torch.set_num_threads(1)
    data = domain_slices(args)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as temporary:
        root = args.keep or Path(temporary)  # --keep: the nodes' logs and reports stay there
        root.mkdir(parents=True, exist_ok=True)
        folders = run_swarm(args, data, root)
        summary = summarize(args, data, folders, time.monotonic() - started)
    print(json.dumps(summary) if args.json else json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

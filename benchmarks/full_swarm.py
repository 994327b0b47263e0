"""Every capability that composes today, in one run: cohorts on real text, secure aggregation, 8-bit
compression in the ring and record-level DP, with real ``zen-node join`` processes on 127.0.0.1.

Run::

    python benchmarks/full_swarm.py --json
    python benchmarks/full_swarm.py --domains 2 --peers-per-domain 3 --rounds 6 --json

Setup: a bootstrap peer and ``--domains`` x ``--peers-per-domain`` trainers; trainer ``i`` holds a
contiguous ``--bytes-per-peer`` slice of real text of domain ``i mod K`` (benchmarks/domain_corpora.py:
plays, the Python language reference, package licences; or ``--corpora-dir``). The run: cohorts on
(the adaptive rule), ``aggregation.mode = "secure"``, ``compression.bits = --bits``, record-level DP
at ``--epsilon`` (delta 1e-5) over the planned rounds. Sharding is not in it: cohorts with sharding
are refused today (docs/architecture.md, "Cohorts"), so ``stage_steps_exactly_once`` is null.

Then, in this process, each trainer's "alone" baseline: the same model trained alone on its own
slice for the same number of inner steps (AdamW, no DP, no averaging), evaluated on the same
held-out batches as the node's reports.

JSON fields: ``ari`` (cohorts found against the domains), ``cohorts``, ``loss_per_cohort`` and
``alone_loss_per_cohort`` (mean final held-out loss of the members, keyed by cohort id),
``epsilon`` (largest reported), ``groups_within_cohorts`` (every group round's peers in one cohort),
``cohort_params_identical`` / ``cohort_params_differ`` (cohort-tagged parameters equal inside each
cohort after the last round / different across cohorts), ``global_params_identical`` (global-tagged
parameters equal on every trainer after the last round: the cross-cohort ring's lineage merge),
``stage_steps_exactly_once`` (null), ``bytes_per_peer``, ``seconds``, and the setup.
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
from node.config import load_node_config  # noqa: E402
from node.data import ByteBatches, split_corpus  # noqa: E402
from node.demo import join_command, start_bootstrap, stop_process  # noqa: E402
from node.model import build_model  # noqa: E402
from node.training.checkpoint import load_round_params  # noqa: E402
from node.training.report import REPORT_FILE  # noqa: E402

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
    return f"""[run]
run_id = "zen-full"
min_memory_gb = 0.0
[run.model]
d_model = 32
context = 32
[run.train]
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
    try:
        bootstrap, maddr = start_bootstrap(root, logs[0])
        started.append((root, bootstrap))
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


def summarize(args: argparse.Namespace, data: list[tuple[int, bytes]], folders: list[Path], seconds: float) -> dict:
    reports = [[json.loads(line) for line in (f / "work" / REPORT_FILE).read_text().splitlines()] for f in folders]
    last = [peer[-1] for peer in reports]
    cohort_of = [r["cohort"] for r in last]
    ids = sorted(set(cohort_of))
    members = {c: [i for i, x in enumerate(cohort_of) if x == c] for c in ids}
    steps = sum(r["inner_steps"] for r in reports[0] if r["mode"] not in ("initial", "loaded"))
    alone = [alone_loss(text, folders[0].parent / "run.toml", steps) for _, text in data]
    run = load_node_config(str(folders[0].parent / "run.toml")).run
    names = [name for name, _ in build_model(run.model, run.train.seed).named_parameters()]
    partition = partition_parameters(names, run.cohorts)
    cohort_index = partition.cohort
    final = [load_round_params(sorted((f / "work" / "rounds").glob("*"))[-1]) for f in folders]

    def same(i: int, j: int) -> bool:
        return all(torch.equal(final[i][k], final[j][k]) for k in cohort_index)

    return {
        "ari": round(adjusted_rand_index([k for k, _ in data], cohort_of), 4),
        "cohorts": len(ids),
        "loss_per_cohort": {c: round(sum(last[i]["eval_loss"] for i in m) / len(m), 4) for c, m in members.items()},
        "alone_loss_per_cohort": {c: round(sum(alone[i] for i in m) / len(m), 4) for c, m in members.items()},
        "epsilon": max((r.get("epsilon") or 0.0) for peer in reports for r in peer),
        "groups_within_cohorts": all(
            r["cohort"] == peer[-1]["cohort"] for peer in reports for r in peer if r["mode"] == "group"
        ),
        "cohort_params_identical": all(same(m[0], i) for m in members.values() for i in m[1:]),
        "cohort_params_differ": all(not same(members[a][0], members[b][0]) for a in ids for b in ids if a < b),
        "global_params_identical": all(
            torch.equal(final[0][k], final[i][k]) for i in range(1, len(final)) for k in partition.global_
        ),
        "stage_steps_exactly_once": None,
        "bytes_per_peer": round(sum(r["bytes_sent"] for r in last) / len(last)),
        "rounds_in_group": min(sum(r["mode"] == "group" for r in peer) for peer in reports),
        "seconds": round(seconds, 1),
        "peers": len(data),
        "domains": args.domains,
        "rounds": args.rounds,
        "bits": args.bits,
        "target_epsilon": args.epsilon,
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
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()
    if not 1 <= args.domains <= 3 or args.peers_per_domain < 3:
        parser.error("--domains must be in [1, 3] and --peers-per-domain >= 3 (a secure group needs 3)")
    torch.set_num_threads(1)
    data = domain_slices(args)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as folder:
        folders = run_swarm(args, data, Path(folder))
        summary = summarize(args, data, folders, time.monotonic() - started)
    print(json.dumps(summary) if args.json else json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

"""Cohorts, sharding, 8-bit compression and DP in one secure run: real `zen-node join` and `zen-node serve` processes.

Six trainers on real text of two domains (tinyshakespeare, the Python language reference), two stage servers
(one per stage), cohorts on (every 2nd round across cohorts), the masked all-reduce with 8-bit words, and
record-level DP-SGD on each trainer's own parts (node/sharding/private.py). Before, cohorts with sharding were
refused, a sharded trainer's own parts were never averaged, and DP with sharding was refused.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from helpers import NodeProcess, domain_texts, write_run_config

from node.aggregation.hierarchy import partition_parameters
from node.config import load_node_config
from node.model import build_model
from node.sharding.stages import LocalParts
from node.training.checkpoint import Checkpoint

SERVING = re.compile(r"serving stage\(s\) \[([0-9, ]+)\]")
SLICE = 20_000  # bytes of text per trainer


@pytest.mark.slow
def test_six_sharded_trainers_in_two_cohorts_train_one_global_model_over_two_servers(
    tmp_path: Path, bootstrap_maddr: str
) -> None:
    # Prepare
    rounds = 2
    config = write_run_config(
        tmp_path / "run.toml",
        run_id="sharded-cohorts",
        model={"n_layer": 3},
        sharding={"stages": 2, "local_blocks": 1, "average_period": 0, "request_timeout": 5.0},
        cohorts={"enabled": True, "global_every": 2},
        compression={"bits": 8},
        privacy={"enabled": True, "target_epsilon": 8.0, "planned_rounds": 4},
    )
    texts = domain_texts()
    data = [texts[("drama", "docs")[i % 2]][(i // 2) * SLICE : (i // 2 + 1) * SLICE] for i in range(6)]
    servers = [
        NodeProcess(tmp_path, f"s{k}", config, bootstrap_maddr, None, "--stages", str(k), command="serve")
        for k in range(2)
    ]
    nodes: list[NodeProcess] = []
    try:
        for server in servers:
            server.wait_for(SERVING, 90)
        args = ("--rounds", str(rounds), "--min-peers", "6")
        nodes = [NodeProcess(tmp_path, f"n{i}", config, bootstrap_maddr, data[i], *args) for i in range(6)]

        # Execute
        codes = [node.wait(timeout=300) for node in nodes]
    finally:
        for process in [*nodes, *servers]:
            process.stop()

    # Assert
    assert codes == [0] * 6, [node.tail() for node in nodes]
    rows = [n.reports() for n in nodes]  # a line per round, zen-node join's fields (node/training/report.py)
    cohorts = [r[-1]["cohort"] for r in rows]
    assert len(set(cohorts)) == 2 and cohorts[0::2] == [cohorts[0]] * 3 and cohorts[1::2] == [cohorts[1]] * 3
    assert all(r["cohort"] == mine[-1]["cohort"] for mine in rows for r in mine if r["group_size"])  # within cohorts
    assert all([r["mode"] for r in mine] == ["group"] * rounds for mine in rows)  # every round averaged
    assert all(r["group_size"] >= 3 and math.isfinite(r["eval_loss"]) for mine in rows for r in mine)
    epsilons = [[r["epsilon"] for r in mine] for mine in rows]  # DP-SGD's steps, counted in every trainer's report
    assert all(0 < mine[0] < mine[-1] <= 8.0 for mine in epsilons), epsilons
    steps = [n.steps() for n in nodes]
    total = sum(len(mine) for mine in steps)
    assert [max(r["versions"][k] for mine in steps for r in mine) for k in (0, 1)] == [total, total]  # each step once

    run = load_node_config(str(config)).run
    names = [name for name, _ in LocalParts(build_model(run.model, run.train.seed), 1).named_parameters()]
    partition = partition_parameters(names, run.cohorts)
    params = []
    for node in nodes:
        checkpoint = Checkpoint.load(node.folder / "work", run.digest())
        assert checkpoint is not None and checkpoint.round == rounds
        params.append(checkpoint.global_params)

    def same(k: int, members: list[int]) -> bool:
        return all(torch.equal(params[members[0]][k], params[j][k]) for j in members[1:])

    assert all(same(k, list(range(6))) for k in partition.global_)  # one global model after the cross round
    assert all(same(k, [0, 2, 4]) and same(k, [1, 3, 5]) for k in partition.cohort)
    assert not all(same(k, [0, 1]) for k in partition.cohort)  # one set of cohort parts per cohort
    assert partition.local and not all(same(k, [0, 2]) for k in partition.local)  # local parts stay each one's own
    assert all("Traceback" not in process.output() for process in [*nodes, *servers])

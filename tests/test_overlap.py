"""The eager overlap and the inner learning-rate schedule: a round's mean lands between the next
phase's inner steps, once, and leaves the group's global parameters bit-identical; every peer
follows the same schedule; the new train fields are validated."""

from __future__ import annotations

import math
import os
import re
import subprocess
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import ZEN_NODE, NodeProcess, write_run_config

from node.config import ConfigError, ModelConfig, TrainConfig, check_join, load_node_config, run_config_from_dict
from node.data import ByteBatches, generate_corpus
from node.model import build_model
from node.training.checkpoint import load_round_params
from node.training.inner import inner_phase
from node.training.schedule import FINAL_RATIO, InnerSchedule

LANDS = re.compile(r"round (\d+) lands (\d+) inner steps into the next phase")


@pytest.mark.slow
def test_the_overlap_lands_each_mean_once_and_keeps_the_group_bit_identical(
    tmp_path: Path, bootstrap_maddr: str
) -> None:
    """3 overlapped nodes land every round once, some between inner steps, with bit-identical global params."""
    # Prepare
    rounds, inner_steps = 4, 100_000  # phases end after round_seconds; the aggregation has time to land in them
    config = write_run_config(
        tmp_path / "run.toml",
        run_id="eager",
        train={
            "inner_steps": inner_steps,
            "round_seconds": 8.0,
            "overlap": True,
            "lr_schedule": "cosine",
            "warmup_steps": 20,
        },
        aggregation={"matchmaking_time": 1.0, "timeout": 30.0},
        compression={"bits": 8, "fraction": 0.5},  # error feedback: what the ring left out stays local
    )
    corpus = generate_corpus(3 * 20_000, seed=13)
    nodes = NodeProcess.on_slices(
        tmp_path, config, bootstrap_maddr, corpus, 3, "--rounds", str(rounds), "--min-peers", "3"
    )

    # Execute
    try:
        codes = [node.wait(timeout=240) for node in nodes]
    finally:
        for node in nodes:
            node.stop()

    # Assert
    assert codes == [0, 0, 0], [node.tail() for node in nodes]
    for node in nodes:
        reports = node.reports()
        assert [r["round"] for r in reports] == list(range(rounds + 1)), reports  # one line per landed round
        assert all(r["mode"] == "group" and r["group_size"] == 3 for r in reports[1:]), reports
    for round_no in range(1, rounds + 1):
        saved = [load_round_params(node.params(round_no)) for node in nodes]
        for other in saved[1:]:
            assert all(torch.equal(a, b) for a, b in zip(saved[0], other, strict=True)), f"round {round_no}"
    landings = [[int(m.group(1)) for m in LANDS.finditer(node.output())] for node in nodes]
    assert all(max(Counter(rounds_landed).values(), default=1) == 1 for rounds_landed in landings), landings
    assert all(0 < r < rounds for rounds_landed in landings for r in rounds_landed), landings
    assert any(landings), "no round landed between inner steps"


def test_inner_phase_lands_between_steps_and_follows_the_schedule() -> None:
    """``between_steps`` runs between every two steps; each step's lr is the schedule's at the run's step."""
    # Prepare
    model_config = ModelConfig(d_model=16, context=16)
    train = TrainConfig(inner_steps=5, batch_size=2, lr_schedule="cosine", warmup_steps=3, total_steps=40)
    model = build_model(model_config, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.inner_lr)
    batches = ByteBatches(generate_corpus(4_000, seed=1), model_config.context, train.batch_size, seed=0)
    schedule = InnerSchedule.for_run(train, rounds=0)
    seen: list[tuple[int, float]] = []

    # Execute
    losses = inner_phase(
        model,
        optimizer,
        batches,
        torch.device("cpu"),
        train,
        threading.Event(),
        schedule=schedule,
        first_step=10,
        between_steps=lambda steps: seen.append((steps, optimizer.param_groups[0]["lr"])),
    )

    # Assert
    assert len(losses) == 5
    assert [steps for steps, _ in seen] == [1, 2, 3, 4]
    assert [lr for _, lr in seen] == [schedule.lr(10 + i) for i in range(4)]  # the lr of the step just taken
    assert optimizer.param_groups[0]["lr"] == schedule.lr(14)


def test_the_schedule_is_the_same_function_on_every_peer() -> None:
    """Peers with the same run config compute the same inner lr at every step, whatever their history."""
    # Prepare
    table = {"train": {"inner_steps": 10, "inner_lr": 0.01, "lr_schedule": "cosine", "warmup_steps": 7}}
    peers = [run_config_from_dict(table).train for _ in range(3)]

    # Execute
    schedules = [InnerSchedule.for_run(train, rounds=30) for train in peers]

    # Assert
    curves = [[schedule.lr(step) for step in range(400)] for schedule in schedules]
    assert curves[0] == curves[1] == curves[2]
    assert schedules[0].total_steps == 300  # derived: rounds x inner_steps


@pytest.mark.parametrize(
    ("kind", "step", "expected"),
    [
        ("constant", 0, 0.01 / 10),  # warmup: rises linearly from inner_lr / warmup_steps
        ("constant", 4, 0.01 / 2),
        ("constant", 9, 0.01),
        ("constant", 5000, 0.01),
        ("cosine", 0, 0.01 / 10),
        ("cosine", 9, 0.01),
        ("cosine", 10, 0.01),  # the peak, where the decay starts
        ("cosine", 60, 0.01 * (FINAL_RATIO + (1 - FINAL_RATIO) / 2)),  # half way through the decay
        ("cosine", 110, 0.01 * FINAL_RATIO),  # the end: 10% of inner_lr
        ("cosine", 5000, 0.01 * FINAL_RATIO),  # and there it stays
    ],
)
def test_warmup_and_cosine_values(kind: str, step: int, expected: float) -> None:
    """Warmup over 10 steps, then constant or cosine down to 10% at step 110."""
    # Prepare
    schedule = InnerSchedule(base_lr=0.01, kind=kind, warmup_steps=10, total_steps=110)  # type: ignore[arg-type]

    # Execute
    lr = schedule.lr(step)

    # Assert
    assert math.isclose(lr, expected, rel_tol=1e-12)


def test_constant_without_warmup_is_the_old_inner_lr() -> None:
    """The defaults leave the inner lr as it was: ``inner_lr`` at every step."""
    # Prepare
    schedule = InnerSchedule.for_run(TrainConfig(inner_lr=0.003), rounds=0)

    # Execute
    rates = {schedule.lr(step) for step in range(1000)}

    # Assert
    assert rates == {0.003}


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"lr_schedule": "linear"}, "train.lr_schedule"),
        ({"warmup_steps": -1}, "train.warmup_steps"),
        ({"total_steps": -5}, "train.total_steps"),
        ({"lr_schedule": "cosine", "warmup_steps": 100, "total_steps": 100}, "train.warmup_steps"),
    ],
)
def test_schedule_fields_are_validated(values: dict[str, object], field: str) -> None:
    """An out-of-range schedule field is refused with a ValueError naming it."""
    # Execute
    with pytest.raises(ValueError) as raised:
        TrainConfig(**values)  # type: ignore[arg-type]

    # Assert
    assert field in str(raised.value)


def test_a_sharded_run_refuses_a_schedule_it_would_not_follow() -> None:
    """The sharded trainer has no schedule yet: a sharded run with one is refused, naming the fix."""
    # Prepare
    tree = {"model": {"n_layer": 4}, "sharding": {"stages": 2}, "train": {"lr_schedule": "cosine", "total_steps": 100}}

    # Execute
    with pytest.raises(ConfigError) as raised:
        run_config_from_dict(tree)

    # Assert
    assert "train.lr_schedule = 'constant'" in str(raised.value)
    run_config_from_dict({**tree, "train": {}})  # the same run without a schedule is accepted


def test_cosine_needs_a_length(tmp_path: Path) -> None:
    """A cosine schedule with neither train.total_steps nor --rounds is refused before joining, naming the fix."""
    # Prepare
    data = tmp_path / "data.txt"
    data.write_text("hello swarm " * 200)
    overrides = {"run.train.lr_schedule": "cosine", "node.data": str(data)}

    # Execute
    config = load_node_config(None, overrides)
    with pytest.raises(ConfigError) as raised:
        check_join(config)
    with_rounds = load_node_config(None, {**overrides, "node.rounds": 5})
    check_join(with_rounds)
    result = subprocess.run(
        [*ZEN_NODE, "join", "--data", str(data), "--config", str(write_cosine_config(tmp_path))],
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )

    # Assert
    assert "train.total_steps" in str(raised.value) and "--rounds" in str(raised.value)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("zen-node: error:")]
    assert len(errors) == 1 and "train.total_steps" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def write_cosine_config(tmp_path: Path) -> Path:
    return write_run_config(tmp_path / "cosine.toml", train={"lr_schedule": "cosine"})

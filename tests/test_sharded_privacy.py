"""Record-level DP-SGD for a sharded trainer (node/sharding/private.py), through a real stage server on 127.0.0.1.

Each example's gradient of the trainer's own parts is taken in pieces (head here, the stages' backward on
the server, the front's vector-Jacobian product here); together they must be the gradient one backward of
that example alone through the whole model gives. Then a DP trainer's steps are counted, its epsilon
reported and published, resumed from its checkpoint, and it stops when its budget is spent.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from sharding_harness import node_config, start_servers

from node.config import PrivacyConfig
from node.data import generate_corpus
from node.model import build_model
from node.sharding.pipeline import StepPipeline
from node.sharding.private import ShardedDPSGD
from node.sharding.server import StageServer
from node.sharding.trainer import ShardedTrainer
from node.training.checkpoint import Checkpoint

PRIVACY = PrivacyConfig(enabled=True, target_epsilon=8.0, planned_rounds=4)


def test_per_example_gradients_through_a_stage_server_are_each_examples_own(tmp_path: Path) -> None:
    # Prepare
    (server,) = start_servers(tmp_path, [StageServer], privacy=PRIVACY)
    (tmp_path / "data.txt").write_bytes(generate_corpus(20_000, seed=71))
    config = node_config(tmp_path, "trainer", list(server.maddrs), spot_check=0.0, privacy=PRIVACY)
    config.data = str(tmp_path / "data.txt")
    trainer = ShardedTrainer(config)
    try:
        trainer.prepare()
        trainer.join()
        assert trainer.privacy is not None and isinstance(trainer.privacy.dpsgd, ShardedDPSGD)
        dpsgd = trainer.privacy.dpsgd
        assert trainer.remote is not None
        dpsgd.pipeline = StepPipeline(trainer.remote, step_id=1, stages=1, micro_batches=1)
        windows = dpsgd.sampler.records[:3]
        tokens, targets = windows[:, :-1], windows[:, 1:]

        # Execute
        grads, loss = dpsgd.per_example_gradients(tokens, targets)
    finally:
        trainer.close()
        server.shutdown()

    # Assert: the whole model (the server's stage is at version 0, the same seed), one example at a time
    full = build_model(config.run.model, config.run.train.seed)
    named = dict(full.named_parameters())
    losses = []
    for i in range(3):
        full.zero_grad(set_to_none=True)
        one = full(tokens[i : i + 1], targets[i : i + 1])
        one.backward()
        losses.append(one.item())
        for name, per_example in grads.items():
            reference = named[name].grad
            assert reference is not None, name
            assert torch.allclose(per_example[i], reference, atol=2e-5, rtol=1e-3), (name, i)
    assert loss == pytest.approx(sum(losses) / 3, rel=1e-5)
    assert set(grads) == {name for name, _ in trainer.local.named_parameters()}
    assert dpsgd.pipeline.sent == 1  # one micro-batch went back through the stage


def test_a_dp_sharded_trainer_counts_reports_resumes_and_stops_at_its_budget(tmp_path: Path) -> None:
    """Steps are counted (epsilon grows in report.jsonl and in the trainer's record), the count comes back
    with ``--resume``, and a budget that allows fewer steps than asked stops the trainer there."""
    # Prepare
    (server,) = start_servers(tmp_path, [StageServer], privacy=PRIVACY)
    (tmp_path / "data.txt").write_bytes(generate_corpus(20_000, seed=72))
    config = node_config(tmp_path, "trainer", list(server.maddrs), spot_check=0.0, privacy=PRIVACY)
    config.data = str(tmp_path / "data.txt")
    config.rounds = 2
    first = ShardedTrainer(config)
    try:
        first.prepare()
        first.join()

        # Execute
        first.run_forever()
        record = first._record_fields()
    finally:
        first.close()
    steps = config.run.train.inner_steps
    assert first.privacy is not None and first.privacy.steps is not None
    rows = [json.loads(line) for line in (Path(config.workdir) / "report.jsonl").read_text().splitlines()]
    epsilons = [row["epsilon"] for row in rows]
    assert len(epsilons) == 2 * steps and 0 < epsilons[0] < epsilons[-1] <= 8.0
    assert first.privacy.spent == 2 * steps and record["epsilon"] == pytest.approx(first.privacy.epsilon())
    saved = Checkpoint.load(first.workdir, first.run.digest())
    assert saved is not None and saved.dp_rounds == 2 * steps

    # a budget of a little more than those steps: --resume takes the count back, and stops at the budget
    budget = first.privacy.steps.epsilon(2 * steps + 3)
    second = ShardedTrainer(dataclasses.replace(config, resume=True, rounds=4, epsilon_budget=budget))
    try:
        second.prepare()
        assert second.privacy is not None and second.privacy.spent == 2 * steps
        second.join()
        second.run_forever()
    finally:
        second.close()
        server.shutdown()
    assert second.privacy.spent == second.step == 2 * steps + 3  # stopped at the budget, mid-round
    assert second.privacy.epsilon() <= budget and math.isfinite(second.privacy.epsilon())

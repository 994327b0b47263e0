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

import node.sharding.hosted as hosted_module
from node.config import ConfigError, PrivacyConfig
from node.data import generate_corpus
from node.metrics import NodeMetrics
from node.model import build_model
from node.progress import print_step
from node.sharding.hosted import HostedStage
from node.sharding.messages import StageMessageError
from node.sharding.pipeline import StepPipeline
from node.sharding.private import DP_STEPS_FILE, ShardedDPSGD, load_dp_steps, save_dp_steps
from node.sharding.server import StageServer
from node.sharding.stages import build_stage
from node.sharding.trainer import ShardedTrainer, StepReport
from node.training.checkpoint import Checkpoint

PRIVACY = PrivacyConfig(enabled=True, target_epsilon=8.0, planned_rounds=4)


def test_each_example_is_clipped_over_the_whole_model_across_the_trainer_and_the_stage_server(tmp_path: Path) -> None:
    """The trainer's per-example gradients and the server's (kept pending) are each example's own gradient
    through the whole model, both scaled by one clip factor min(1, C / whole-model norm); the stage's commit
    sums them clipped (plus its noise, here tiny)."""
    # Prepare
    clipping = PrivacyConfig(enabled=True, noise_multiplier=1e-6, clip_norm=0.05)
    (server,) = start_servers(tmp_path, [StageServer], privacy=clipping)
    (tmp_path / "data.txt").write_bytes(generate_corpus(20_000, seed=71))
    config = node_config(tmp_path, "trainer", list(server.maddrs), spot_check=0.0, privacy=clipping)
    config.data = str(tmp_path / "data.txt")
    trainer = ShardedTrainer(config)
    try:
        trainer.prepare()
        trainer.join()
        assert trainer.privacy is not None and isinstance(trainer.privacy.dpsgd, ShardedDPSGD)
        assert trainer.remote is not None
        dpsgd = trainer.privacy.dpsgd
        dpsgd.pipeline = StepPipeline(trainer.remote, step_id=1, stages=1, micro_batches=1)
        windows = dpsgd.sampler.records[:3]
        tokens, targets = windows[:, :-1], windows[:, 1:]

        # Execute
        grads, loss = dpsgd.per_example_gradients(tokens, targets)
        hosted = server.hosted[0]
        stage_grads = hosted.pending[(trainer.identity.peer_id, 1)][0]
        std, scale = dpsgd.commit_noise
        summed = hosted.summed_pending(
            (trainer.identity.peer_id, 1), 1, (torch.cat(dpsgd.pipeline.clip), torch.tensor([std, scale]))
        )
    finally:
        trainer.close()
        server.shutdown()

    # Assert: the whole model (the server's stage is at version 0, the same seed), one example at a time
    full = build_model(config.run.model, config.run.train.seed)
    named = dict(full.named_parameters())
    stage_names = [f"blocks.{k + 1}.{name}" for k in range(2) for name, _ in full.blocks[0].named_parameters()]
    losses, factors = [], []
    for i in range(3):
        full.zero_grad(set_to_none=True)
        one = full(tokens[i : i + 1], targets[i : i + 1])
        one.backward()
        losses.append(one.item())
        norm = torch.sqrt(sum((p.grad**2).sum() for p in full.parameters() if p.grad is not None))
        factor = min(1.0, 0.05 / (float(norm) + 1e-6))
        factors.append(factor)
        for name, per_example in grads.items():
            assert torch.allclose(per_example[i], factor * named[name].grad, atol=1e-6, rtol=1e-3), (name, i)
        for name, per_example in zip(stage_names, stage_grads, strict=True):  # unclipped, until the commit
            assert torch.allclose(per_example[i], named[name].grad, atol=2e-5, rtol=1e-3), (name, i)
    assert min(factors) < 1.0  # the clip binds
    assert torch.allclose(dpsgd.pipeline.clip[0], torch.tensor(factors), rtol=1e-4)
    assert loss == pytest.approx(sum(losses) / 3, rel=1e-5)
    assert set(grads) == {name for name, _ in trainer.local.named_parameters()}
    for value, per_example in zip(summed, stage_grads, strict=True):
        clipped = (torch.tensor(factors).view(-1, *[1] * (per_example.dim() - 1)) * per_example).sum(0)
        assert torch.allclose(value, clipped * scale, atol=1e-6), "the stage's sum: clipped, scaled, noise tiny"


def test_a_dp_sharded_trainer_counts_reports_resumes_and_stops_at_its_budget(tmp_path: Path) -> None:
    """Steps are counted (epsilon grows in report.jsonl and in the trainer's record); the count comes back
    with ``--resume``, steps after the checkpoint's round included (each released its stage update at its
    commit); a budget that allows fewer steps than asked stops the trainer there."""
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
        for _ in range(2):  # two steps of round 3, then it stops (a crash): the checkpoint holds round 2
            first.train_step()
    finally:
        first.close()
    steps = config.run.train.inner_steps
    assert first.privacy is not None and first.privacy.steps is not None
    rows = [json.loads(line) for line in (Path(config.workdir) / "steps.jsonl").read_text().splitlines()]
    rounds = [json.loads(line) for line in (Path(config.workdir) / "report.jsonl").read_text().splitlines()]
    epsilons = [row["epsilon"] for row in rows]
    assert len(epsilons) == 2 * steps + 2 and 0 < epsilons[0] < epsilons[-1] <= 8.0
    assert [(r["round"], r["inner_steps"], r["epsilon"]) for r in rounds] == [
        (1, steps, epsilons[steps - 1]),
        (2, steps, epsilons[2 * steps - 1]),
    ]
    assert record["epsilon"] == pytest.approx(first.privacy.steps.epsilon(2 * steps))
    assert first.privacy.spent == 2 * steps + 2
    saved = Checkpoint.load(first.workdir, first.run.digest())
    assert saved is not None and saved.round == 2 and saved.dp_rounds == 2 * steps

    # a budget of 3 more steps: --resume counts all 2 * steps + 2 taken, and the trainer stops at the budget
    budget = first.privacy.steps.epsilon(2 * steps + 5)
    second = ShardedTrainer(dataclasses.replace(config, resume=True, rounds=4, epsilon_budget=budget))
    try:
        second.prepare()
        assert second.privacy is not None and second.privacy.spent == 2 * steps + 2
        assert second.step == 2 * steps  # the round the checkpoint holds
        second.join()
        second.run_forever()
    finally:
        second.close()
        server.shutdown()
    assert second.privacy.spent == 2 * steps + 5 and second.step == 2 * steps + 3  # stopped at the budget
    assert second.privacy.epsilon() <= budget and math.isfinite(second.privacy.epsilon())


@pytest.mark.parametrize(
    ("private", "reason"),
    [
        ((), "clip factors and \\[noise std, scale\\]"),
        ((torch.ones(2), torch.tensor([0.1, 0.5])), "clip factors and \\[noise std, scale\\]"),  # 3 examples
        ((torch.tensor([1.0, 2.0, 1.0]), torch.tensor([0.1, 0.5])), "clip factors must be in \\[0, 1\\]"),
        ((torch.ones(3), torch.tensor([math.nan, 0.5])), "noise std must be"),
        ((torch.ones(3), torch.tensor([0.1, 4.0])), "scale in \\(0, 1\\]"),
    ],
)
def test_a_dp_commit_without_valid_clip_factors_and_noise_is_refused(private: tuple, reason: str) -> None:
    """A stage holding a step's per-example gradients applies them only clipped and noised as the commit says;
    a commit that does not say it well is refused with the reason, and the pending gradients stay."""
    run = node_config(Path("/nonexistent"), "x", []).run
    hosted = HostedStage(build_stage(run.model, run.sharding, run.train.seed, 0), lr=1e-3, weight_decay=0.0)
    hidden, grad = torch.randn(3, 8, run.model.d_model), torch.randn(3, 8, run.model.d_model)
    hosted.backward_per_example(("t", 1), 0, hidden, grad)

    with pytest.raises(StageMessageError, match=reason):
        hosted.summed_pending(("t", 1), 1, private)

    assert len(hosted.pending[("t", 1)][0]) == len(hosted.params)
    good = hosted.summed_pending(("t", 1), 1, (torch.ones(3), torch.tensor([0.1, 0.5])))
    again = hosted.summed_pending(("t", 1), 1, (torch.ones(3), torch.tensor([0.1, 0.5])))
    assert all(torch.equal(a, b) for a, b in zip(good, again, strict=True))  # one noise draw per step
    hosted.backward(("u", 1), 0, hidden, grad)
    with pytest.raises(StageMessageError, match="sent without backward_dp"):
        hosted.summed_pending(("u", 1), 1, (torch.ones(3), torch.tensor([0.1, 0.5])))


def test_a_dp_sharded_trainers_epsilon_is_on_its_line_and_in_its_metrics(capsys: pytest.CaptureFixture[str]) -> None:
    report = StepReport(
        step=3, loss=2.5, versions=[3], servers=["s"], seconds=1.0, tokens_per_second=100.0, failovers=0, bans=0
    )
    metrics = NodeMetrics("sharded")
    metrics.observe_step(report)
    assert metrics.registry.get_sample_value("zen_node_epsilon") == -1  # no DP

    print_step(dataclasses.replace(report, epsilon=1.5))
    metrics.observe_step(dataclasses.replace(report, epsilon=1.5))

    assert "| epsilon 1.500" in capsys.readouterr().out
    assert metrics.registry.get_sample_value("zen_node_epsilon") == 1.5


def test_a_stage_holds_a_bounded_number_of_per_example_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    """A DP step keeps one gradient per example until its commit: past ``MAX_PENDING_FLOATS`` the oldest step's
    are dropped (its commit then asks for them again), so trainers cannot fill a server's memory."""
    run = node_config(Path("/nonexistent"), "x", []).run
    hosted = HostedStage(build_stage(run.model, run.sharding, run.train.seed, 0), lr=1e-3, weight_decay=0.0)
    one_step = 3 * sum(p.numel() for p in hosted.params)  # 3 examples' gradients
    monkeypatch.setattr(hosted_module, "MAX_PENDING_FLOATS", int(1.5 * one_step))
    hidden, grad = torch.randn(3, 8, run.model.d_model), torch.randn(3, 8, run.model.d_model)

    hosted.backward_per_example(("t", 1), 0, hidden, grad)
    hosted.backward_per_example(("t", 2), 0, hidden, grad)

    assert list(hosted.pending) == [("t", 2)]
    assert hosted.summed_pending(("t", 1), 1, (torch.ones(3), torch.tensor([0.1, 0.5]))) == [0]  # missing: resend


@pytest.mark.parametrize("content", ["{", '{"run_hash": "h"}', '{"run_hash": "h", "steps": -3}', "[1, 2]"])
def test_a_malformed_dp_step_count_is_refused_in_one_line(tmp_path: Path, content: str) -> None:
    """The count of a sharded trainer's DP steps is what keeps its epsilon honest after a crash: a damaged one stops
    the start with the fix, it is never read as zero. Another run's count does not apply."""
    (tmp_path / DP_STEPS_FILE).write_text(content)
    with pytest.raises(ConfigError, match=r"dp_steps\.json is malformed") as refused:
        load_dp_steps(tmp_path, "h")
    assert "\n" not in str(refused.value)
    save_dp_steps(tmp_path, "h", 7)
    assert (load_dp_steps(tmp_path, "h"), load_dp_steps(tmp_path, "other")) == (7, 0)

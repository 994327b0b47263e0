"""A sharded trainer's checkpoint, ``--resume`` and held-out evaluation (node/sharding/trainer.py): real stage server.

After each round the trainer writes its own parts, their averager's anchors, AdamW's state and the batch
order to ``<workdir>/checkpoint.safetensors``; a trainer started with ``--resume`` continues from there.
Before, a sharded trainer had no checkpoint: a restart began again from the seeded parts.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from sharding_harness import node_config, start_servers

from node.config import ConfigError
from node.data import generate_corpus
from node.export.writer import export_run
from node.model import build_model
from node.sharding.server import StageServer
from node.sharding.snapshot import STAGES_FILE, STAGES_FORMAT
from node.sharding.stages import LocalParts, build_stage
from node.sharding.trainer import ShardedTrainer
from node.training.checkpoint import CHECKPOINT_FILE, Checkpoint, write_safetensors


def held_out_loss(trainer: ShardedTrainer, server: StageServer) -> float:
    """The trainer's held-out loss computed here, with the server's stage weights (what ``evaluate`` asks it)."""
    run = trainer.run
    stage = build_stage(run.model, run.sharding, run.train.seed, 0)
    with torch.no_grad():
        for param, value in zip(stage.parameters(), server.hosted[0].params, strict=True):
            param.copy_(value)
        losses = [float(trainer.local.head(stage(trainer.local.front(x)), y)) for x, y in trainer.eval_set]
    return sum(losses) / len(losses)


def test_a_restarted_sharded_trainer_resumes_its_parts_optimizer_and_batches(tmp_path: Path) -> None:
    # Prepare
    (server,) = start_servers(tmp_path, [StageServer])
    (tmp_path / "data.txt").write_bytes(generate_corpus(20_000, seed=61))
    config = node_config(tmp_path, "trainer", list(server.maddrs), spot_check=0.0)
    config.data = str(tmp_path / "data.txt")
    first = ShardedTrainer(config)
    try:
        first.prepare()
        first.join()
        steps = first.run.train.inner_steps
        rows = [first.train_step() for _ in range(steps)]  # a round
        expected = held_out_loss(first, server)
        rows += [first.train_step() for _ in range(2)]  # and two steps of the next, which the checkpoint does not hold
        saved = Checkpoint.load(first.workdir, first.run.digest())
    finally:
        first.close()
    assert saved is not None and saved.round == 1
    assert [r.eval_loss is not None for r in rows] == [False] * (steps - 1) + [True, False, False]  # at round ends
    assert rows[steps - 1].eval_loss == pytest.approx(expected, rel=1e-5)

    # Execute
    second = ShardedTrainer(dataclasses.replace(config, resume=True))
    try:
        second.prepare()
        second.join()
        report = second.train_step()
    finally:
        second.close()
        server.shutdown()

    # Assert
    assert report.step == steps + 1  # on from the round the checkpoint holds
    restored = ShardedTrainer(dataclasses.replace(config, resume=True))
    restored.prepare()  # no network: the parts, AdamW and the batch order as the checkpoint holds them
    assert restored.step == steps
    params = list(restored.local.parameters())
    assert all(torch.equal(p, s) for p, s in zip(params, saved.global_params, strict=True))
    moments = [restored.optimizer.state[p]["exp_avg"] for p in params]
    assert all(torch.equal(m, saved.inner_opt["state"][i]["exp_avg"]) for i, m in enumerate(moments))
    assert torch.equal(restored.batches.state(), saved.data_rng)
    assert second.fronts is not None  # its averager took the checkpoint's anchors back
    assert all(torch.equal(a, b) for a, b in zip(second.fronts.anchor, saved.outer_opt["anchor"], strict=True))
    seeded = LocalParts(build_model(config.run.model, config.run.train.seed), config.run.sharding.local_blocks)
    assert all(torch.equal(a, b) for a, b in zip(saved.outer_opt["anchor"], seeded.parameters(), strict=True))  # alone
    with pytest.raises(ConfigError, match=r"stages\.safetensors is missing"):  # it never stopped by run_forever
        export_run(first.workdir, tmp_path / "export")


def test_a_sharded_trainer_that_stops_saves_the_stages_blocks_and_its_workdir_exports(tmp_path: Path) -> None:
    """``run_forever`` ends by saving the stages' blocks; the export, loaded by transformers, gives the held-out
    loss the trainer's own parts and the server's stage give. A damaged or foreign blocks file is refused."""
    # Prepare
    (server,) = start_servers(tmp_path, [StageServer])
    (tmp_path / "data.txt").write_bytes(generate_corpus(20_000, seed=63))
    config = dataclasses.replace(node_config(tmp_path, "trainer", list(server.maddrs), spot_check=0.0), rounds=1)
    config.data = str(tmp_path / "data.txt")
    trainer = ShardedTrainer(config)
    try:
        trainer.prepare()
        trainer.join()

        # Execute
        trainer.run_forever()
        expected = held_out_loss(trainer, server)
        result = export_run(trainer.workdir, tmp_path / "export")
    finally:
        trainer.close()
        server.shutdown()

    # Assert
    hf = transformers.AutoModelForCausalLM.from_pretrained(result.out).eval()
    with torch.no_grad():
        losses = [float(F.cross_entropy(hf(x).logits.flatten(0, 1), y.flatten())) for x, y in trainer.eval_set]
    assert sum(losses) / len(losses) == pytest.approx(expected, rel=1e-5)
    assert expected < held_out_loss_of_seeded(trainer)  # the blocks trained: not the seeded ones
    blocks = trainer.workdir / STAGES_FILE
    blocks.write_bytes(blocks.read_bytes()[:-10])
    with pytest.raises(ConfigError, match="cannot be read") as error:
        export_run(trainer.workdir, tmp_path / "export2")
    assert "\n" not in str(error.value)
    write_safetensors(blocks, {}, {"format": STAGES_FORMAT, "run_hash": "another", "versions": "[]"})
    with pytest.raises(ConfigError, match="another run's blocks"):
        export_run(trainer.workdir, tmp_path / "export3")


def held_out_loss_of_seeded(trainer: ShardedTrainer) -> float:
    """The held-out loss of the trainer's parts around the seeded stage."""
    run = trainer.run
    stage = build_stage(run.model, run.sharding, run.train.seed, 0)
    with torch.no_grad():
        losses = [float(trainer.local.head(stage(trainer.local.front(x)), y)) for x, y in trainer.eval_set]
    return sum(losses) / len(losses)


def test_a_checkpoint_that_does_not_hold_the_trainers_parts_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "data.txt").write_bytes(generate_corpus(5_000, seed=62))
    config = node_config(tmp_path, "trainer", [], spot_check=0.0)
    config.data = str(tmp_path / "data.txt")
    workdir = Path(config.workdir)
    workdir.mkdir(parents=True)
    Checkpoint(
        run_hash=config.run.digest(),
        round=3,
        global_params=[torch.zeros(4, 4)],
        outer_opt={},
        inner_opt={},
        data_rng=torch.zeros(8, dtype=torch.uint8),
    ).save(workdir)
    trainer = ShardedTrainer(dataclasses.replace(config, resume=True))
    with pytest.raises(ConfigError, match=f"{CHECKPOINT_FILE} does not hold this sharded trainer's parts") as error:
        trainer.prepare()
    assert "\n" not in str(error.value)
    trainer.close()

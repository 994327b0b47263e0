"""Record-level DP: per-example gradients of the tied model, Opacus' clip and noise, the step accountant,
the budget stop, and a small swarm that trains with DP-SGD."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest
import torch
from dp_accounting.pld import pld_privacy_accountant
from helpers import NodeProcess, write_run_config

from node.config import ConfigError, ModelConfig, PrivacyConfig, load_node_config
from node.data import generate_corpus
from node.model import build_model
from node.training.dpsgd import (
    VALUE_DISCRETIZATION,
    DPSGDStep,
    RecordAccountant,
    RecordSampler,
    record_epsilon,
    sampled_gaussian_steps,
)
from node.training.inner import inner_phase
from node.training.privacy import TrainerPrivacy
from node.training.report import RoundOutcome

MODEL = ModelConfig(d_model=32, context=16)


def corpus(size: int = 4000, seed: int = 0) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    return bytes(torch.randint(97, 123, (size,), generator=generator).tolist())


def sgd_step(noise_multiplier: float, clip_norm: float, expected_batch: int = 4) -> tuple[torch.nn.Module, DPSGDStep]:
    """A DP-SGD step with plain SGD at lr 1: the parameters move by exactly -(clipped sum + noise) / batch."""
    model = build_model(MODEL, seed=3)
    sampler = RecordSampler(corpus(), MODEL.context, expected_batch, seed=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    return model, DPSGDStep(model, optimizer, sampler, noise_multiplier, clip_norm, torch.device("cpu"))


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def moved(noise_multiplier: float, clip_norm: float, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """How far one DP-SGD step on (tokens, targets) moves the parameters, times the expected batch."""
    model, step = sgd_step(noise_multiplier, clip_norm)
    before = flat(model)
    step.step_on(tokens, targets)
    return (flat(model) - before) * step.optimizer.expected_batch_size


def test_per_example_gradients_are_exact_for_the_tied_head() -> None:
    """vmap's per-example gradients equal one backward per example, the tied wte.weight included."""
    model, step = sgd_step(1.0, 1.0)
    tokens, targets = step.sampler.records[:3, :-1], step.sampler.records[:3, 1:]

    grads, loss = step.per_example_gradients(tokens, targets)

    for i in range(3):
        model.zero_grad()
        model(tokens[i : i + 1], targets[i : i + 1]).backward()
        for name, param in model.named_parameters():
            assert torch.allclose(grads[name][i], param.grad, atol=1e-6), name
    assert loss == pytest.approx(model(tokens, targets).item(), rel=1e-5)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_opacus_grad_sample_module_gets_this_model_wrong() -> None:
    """Why dpsgd.py computes per-example gradients itself: Opacus' hooks miss the tied head's use of wte.weight
    and read the unbatched positions as a batch (they raise, or return other per-example gradients)."""
    from opacus import GradSampleModule

    _, step = sgd_step(1.0, 1.0)
    tokens, targets = step.sampler.records[:3, :-1], step.sampler.records[:3, 1:]
    exact, _ = step.per_example_gradients(tokens, targets)
    model = GradSampleModule(build_model(MODEL, seed=3), loss_reduction="mean")

    try:
        model(tokens, targets).backward()
        got = {name: getattr(p, "grad_sample", None) for name, p in model._module.named_parameters()}
        wrong = [
            name
            for name in ("wte.weight", "wpe.weight")
            if got[name] is None or got[name].shape != exact[name].shape or not torch.allclose(got[name], exact[name])
        ]
    except RuntimeError:
        wrong = ["raised"]

    assert wrong


def test_changing_one_record_moves_the_update_by_at_most_c() -> None:
    """Before noise: removing one record moves the summed update by <= C, replacing it by <= 2C; a record's
    own clipped contribution has norm C exactly when its gradient is larger."""
    clip = 0.05
    records = RecordSampler(corpus(), MODEL.context, 4, seed=1).records[:5]
    tokens, targets = records[:, :-1], records[:, 1:]
    changed_tokens, changed_targets = tokens.clone(), targets.clone()
    changed_tokens[2], changed_targets[2] = 0, 255  # a record nothing like the others

    full = moved(0.0, clip, tokens, targets)
    without = moved(0.0, clip, torch.cat([tokens[:2], tokens[3:]]), torch.cat([targets[:2], targets[3:]]))
    replaced = moved(0.0, clip, changed_tokens, changed_targets)
    alone = moved(0.0, clip, tokens[2:3], targets[2:3])

    assert float((full - without).norm()) <= clip * (1 + 1e-4)
    assert float((full - replaced).norm()) <= 2 * clip * (1 + 1e-4)
    assert float(alone.norm()) == pytest.approx(clip, rel=1e-4)  # its gradient is far above C: clipped to C
    assert float(moved(0.0, 1e3, tokens[2:3], targets[2:3]).norm()) > 10 * clip  # the test can fail


def test_noise_on_a_zero_gradient_batch_has_std_sigma_c_over_batch() -> None:
    """An empty Poisson sample: the step is pure noise of std sigma * C / expected batch on every coordinate."""
    sigma, clip = 1.3, 0.7
    model, step = sgd_step(sigma, clip, expected_batch=4)
    before = flat(model)
    empty = torch.zeros(0, MODEL.context, dtype=torch.long)

    step.step_on(empty, empty)

    change = flat(model) - before
    expected = sigma * clip / 4
    assert change.numel() > 20_000
    assert float(change.std()) == pytest.approx(expected, rel=0.03)
    assert abs(float(change.mean())) < 4 * expected / math.sqrt(change.numel())


def test_poisson_sampling_takes_each_record_at_the_sample_rate() -> None:
    """Records are aligned windows of context + 1 bytes; each joins a sample with probability q."""
    sampler = RecordSampler(corpus(size=17 * 200 + 5), MODEL.context, expected_batch=20, seed=4)
    sizes = [sampler.sample()[0].shape[0] for _ in range(400)]

    assert sampler.count == 200 and sampler.sample_rate == pytest.approx(0.1)
    assert sum(sizes) / len(sizes) == pytest.approx(20, rel=0.05)
    assert len(set(sizes)) > 5  # a Poisson sample's size varies


def test_record_epsilon_equals_dp_accounting_and_opacus_agrees() -> None:
    """The accountant's epsilon is dp-accounting's PLD for the same steps; Opacus' PRV is close, its RDP above."""
    accountant = RecordAccountant(noise_multiplier=0.8, sample_rate=0.02, delta=1e-5, budget=math.inf)
    accountant.record(120)

    direct = pld_privacy_accountant.PLDAccountant(value_discretization_interval=VALUE_DISCRETIZATION)
    direct.compose(sampled_gaussian_steps(0.8, 0.02, 120))

    assert accountant.epsilon() == direct.get_epsilon(1e-5)
    assert accountant.cross_check("prv") == pytest.approx(accountant.epsilon(), rel=0.05)
    assert accountant.epsilon() <= accountant.cross_check("rdp") <= 1.5 * accountant.epsilon()


def record_privacy(tmp_path: Path, budget: float) -> TrainerPrivacy:
    config = write_run_config(
        tmp_path / "run.toml",
        model={"d_model": MODEL.d_model, "context": MODEL.context},
        train={"inner_steps": 5, "batch_size": 4},
        privacy={"enabled": True, "noise_multiplier": 1.0, "clip_norm": 1.0},
    )
    node = load_node_config(config, {"node.epsilon_budget": budget})
    model = build_model(node.run.model, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    privacy = TrainerPrivacy.create(node, model, optimizer, corpus(), batch_size=4)
    privacy.model = model  # type: ignore[attr-defined]  # for the caller's inner phases
    privacy.optimizer = optimizer  # type: ignore[attr-defined]
    return privacy


def test_record_level_budget_caps_the_steps_and_stops_sending(tmp_path: Path) -> None:
    """With a budget of 7 steps and 5-step phases: 5, then 2 counted, then sending stops and steps go uncounted."""
    sample_rate = 4 * PrivacyConfig().batch_scale / (4000 // (MODEL.context + 1))  # batch 4, DP-SGD's scale
    budget = (record_epsilon(1.0, sample_rate, 7, 1e-5) + record_epsilon(1.0, sample_rate, 8, 1e-5)) / 2
    privacy = record_privacy(tmp_path, budget)
    assert privacy.level == "record" and privacy.noise is None and privacy.steps is not None
    train = load_node_config(tmp_path / "run.toml").run.train
    update = [torch.ones(3)]

    taken, sent = [], []
    for _ in range(3):
        losses = inner_phase(
            privacy.model,  # type: ignore[attr-defined]
            privacy.optimizer,  # type: ignore[attr-defined]
            None,  # type: ignore[arg-type]  # DP-SGD draws its own Poisson samples
            torch.device("cpu"),
            train,
            threading.Event(),
            step=privacy.inner_step,
            steps=privacy.phase_steps(train.inner_steps),
        )
        taken.append(len(losses))
        sent.append(privacy.launch(update))

    assert taken == [5, 2, 5] and sent == [True, True, False]
    assert privacy.spent == 7 and privacy.epsilon() <= budget
    assert privacy.budget_spent
    assert torch.equal(update[0], torch.ones(3))  # record level: the update itself is not clipped
    assert privacy.publishes(RoundOutcome.SOLO) and not privacy.publishes(RoundOutcome.LOCAL)


@pytest.mark.slow
def test_a_swarm_trains_with_record_level_dp(tmp_path: Path, bootstrap_maddr: str) -> None:
    """Three nodes with DP-SGD (the default level) form groups, their loss falls, report.jsonl holds epsilon."""
    config = write_run_config(
        tmp_path / "run.toml",
        train={"inner_steps": 6, "batch_size": 8, "inner_lr": 0.003},
        aggregation={"timeout": 60.0},
        privacy={"enabled": True, "target_epsilon": 8.0, "planned_rounds": 3, "clip_norm": 1.0},
    )
    text = generate_corpus(60_000, seed=5)
    nodes = NodeProcess.on_slices(tmp_path, config, bootstrap_maddr, text, 3, "--rounds", "3", "--min-peers", "3")
    try:
        codes = [node.wait(400) for node in nodes]
        outputs = [node.output() for node in nodes]
    finally:
        for node in nodes:
            node.stop()

    assert codes == [0, 0, 0], outputs[0][-3000:]
    for i, output in enumerate(outputs):
        assert "record-level differential privacy (DP-SGD)" in output, output[-2000:]
        rows = [json.loads(line) for line in (tmp_path / f"n{i}" / "work" / "report.jsonl").read_text().splitlines()]
        trained = [r for r in rows if r["round"] > 0]
        assert [r["mode"] for r in trained] == ["group"] * 3
        assert trained[-1]["eval_loss"] < rows[0]["eval_loss"] - 0.3
        epsilons = [r["epsilon"] for r in trained]
        assert 0 < epsilons[0] < epsilons[-1] <= 8.0


def test_user_level_privacy_with_sharding_is_refused_in_one_line_and_record_level_starts() -> None:
    """User-level noise lives in the trainers' ring, which the stages' weights never cross: refused. Record-level
    DP-SGD covers a sharded trainer's own parts (node/sharding/private.py): accepted."""
    # Prepare
    overrides = {"run.privacy.enabled": True, "run.privacy.target_epsilon": 8.0, "run.sharding.stages": 1}

    # Execute
    with pytest.raises(ConfigError) as refused:
        load_node_config(None, {**overrides, "run.privacy.level": "user"})

    # Assert
    message = str(refused.value)
    assert "\n" not in message and "user-level privacy cannot be combined with sharding" in message
    assert 'set privacy.level = "record" or sharding.stages = 0' in message
    assert load_node_config(None, {**overrides, "run.privacy.level": "record"}).run.privacy.enabled


def test_record_level_dp_with_cohorts_starts_and_plans_the_same_steps(tmp_path: Path) -> None:
    """Cohorts with DP-SGD start, and their second (cross-cohort) ring costs no epsilon: sigma and the step
    budget are those of the same run without cohorts (each ring sends post-processing of counted steps)."""
    # Prepare
    common = {"run.privacy.enabled": True, "run.privacy.target_epsilon": 8.0, "run.privacy.planned_rounds": 4}
    common |= {"run.model.d_model": MODEL.d_model, "run.model.context": MODEL.context, "run.train.inner_steps": 5}
    cohorts = {"run.cohorts.enabled": True, "run.cohorts.global_every": 2}

    # Execute
    plans = []
    for overrides in (common, {**common, **cohorts}):
        node = load_node_config(None, overrides)
        model = build_model(node.run.model, seed=0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        privacy = TrainerPrivacy.create(node, model, optimizer, corpus(), batch_size=4)
        assert privacy.level == "record" and privacy.dpsgd is not None and privacy.steps is not None
        plans.append((privacy.dpsgd.noise_multiplier, privacy.steps.max_steps()))

    # Assert
    assert plans[0] == plans[1]
    assert plans[0][1] == 4 * 5  # planned_rounds x inner_steps steps fit the target exactly


def test_dp_sgd_steps_at_lr_scale_and_leaves_the_schedules_lr() -> None:
    """lr_scale 2.5 moves the parameters 2.5 times as far as lr_scale 1 (no noise, plain SGD); the param
    groups keep the lr the schedule set."""
    # Prepare
    tokens, targets = RecordSampler(corpus(), MODEL.context, 4, seed=2).sample()
    moves = []

    # Execute
    for lr_scale in (1.0, 2.5):
        model, step = sgd_step(0.0, 1.0)
        step.lr_scale = lr_scale
        before = flat(model)
        step.step_on(tokens, targets)
        moves.append(flat(model) - before)
        assert [group["lr"] for group in step.optimizer.param_groups] == [1.0]

    # Assert
    torch.testing.assert_close(moves[1], 2.5 * moves[0])


def test_record_level_uses_the_dp_only_batch_and_lr_scales(tmp_path: Path) -> None:
    """DP-SGD expects batch_scale x train.batch_size records a step at lr_scale x the inner lr; out-of-range
    scales are refused naming the field."""
    # Prepare
    overrides = {"run.privacy.enabled": True, "run.privacy.noise_multiplier": 1.0, "run.privacy.batch_scale": 3}
    node = load_node_config(None, {**overrides, "run.privacy.lr_scale": 2.0, "run.model.context": MODEL.context})
    model = build_model(ModelConfig(context=MODEL.context), seed=0)

    # Execute
    privacy = TrainerPrivacy.create(node, model, torch.optim.AdamW(model.parameters()), corpus(), batch_size=4)

    # Assert
    assert privacy.dpsgd is not None and privacy.steps is not None
    records = 4000 // (MODEL.context + 1)
    assert privacy.dpsgd.sampler.sample_rate == privacy.steps.sample_rate == 12 / records
    assert privacy.dpsgd.optimizer.expected_batch_size == round(12 / records * records)
    assert privacy.dpsgd.lr_scale == 2.0
    assert privacy.step_samples(4) == 12  # the samples a step counts (weights, ledger): DP-SGD's expected batch
    assert (PrivacyConfig().batch_scale, PrivacyConfig().lr_scale) == (4, 3.0)
    for field, value in (("batch_scale", 0), ("lr_scale", 0.0)):
        with pytest.raises(ConfigError, match=f"privacy.{field} must be in"):
            load_node_config(None, {f"run.privacy.{field}": value})

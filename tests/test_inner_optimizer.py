"""The run's inner optimizer (node/training/optimizers.py): AdamW, or Muon on the blocks' matrices (MuLoCo)."""

from __future__ import annotations

import copy

import pytest
import torch

from node.config import ModelConfig, TrainConfig
from node.model import build_model
from node.training.optimizers import build_inner_optimizer

MODEL = ModelConfig(n_layer=2, n_head=2, d_model=32, context=16)


def steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, count: int, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(count):
        tokens = torch.randint(0, 256, (4, MODEL.context), generator=generator)
        loss = model(tokens, tokens)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def test_muon_takes_the_blocks_matrices_and_adamw_everything_else_once() -> None:
    model = build_model(MODEL, 0)
    optimizer = build_inner_optimizer(model, "muon", 3e-3, 0.0)
    muon, adamw = optimizer.parts
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for group in muon.param_groups for p in group["params"]}
    in_adamw = {names[id(p)] for group in adamw.param_groups for p in group["params"]}
    assert in_muon.isdisjoint(in_adamw) and in_muon | in_adamw == set(names.values())
    assert "blocks.0.qkv.weight" in in_muon and "blocks.1.mlp.2.weight" in in_muon
    assert {"wte.weight", "wpe.weight", "blocks.0.qkv.bias", "ln_f.weight"} <= in_adamw
    assert all(group["lr"] == 3e-3 for group in optimizer.param_groups)  # the schedule sets every part's lr


def test_muon_trains_and_differs_from_adamw() -> None:
    before = build_model(MODEL, 0)
    results = {}
    for kind in ("adamw", "muon"):
        model = build_model(MODEL, 0)
        steps(model, build_inner_optimizer(model, kind, 3e-3, 0.0), 5)
        results[kind] = torch.cat([p.detach().flatten() for p in model.parameters()])
    start = torch.cat([p.detach().flatten() for p in before.parameters()])
    assert not torch.equal(results["muon"], start) and not torch.equal(results["muon"], results["adamw"])


@pytest.mark.parametrize("kind", ["adamw", "muon"])
def test_a_checkpointed_optimizer_resumes_exactly(kind: str) -> None:
    model = build_model(MODEL, 0)
    optimizer = build_inner_optimizer(model, kind, 3e-3, 0.0)  # type: ignore[arg-type]
    steps(model, optimizer, 3)
    saved_params = [p.detach().clone() for p in model.parameters()]
    saved_state = copy.deepcopy(optimizer.state_dict())  # state_dict holds the live tensors
    steps(model, optimizer, 2, seed=1)
    resumed = build_model(MODEL, 1)
    with torch.no_grad():
        for param, value in zip(resumed.parameters(), saved_params, strict=True):
            param.copy_(value)
    other = build_inner_optimizer(resumed, kind, 3e-3, 0.0)  # type: ignore[arg-type]
    other.load_state_dict(saved_state)
    steps(resumed, other, 2, seed=1)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_adamw_keeps_the_state_dict_older_checkpoints_hold() -> None:
    model = build_model(MODEL, 0)
    plain = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    steps(model, plain, 2)
    ours = build_inner_optimizer(model, "adamw", 3e-3, 0.0)
    ours.load_state_dict(plain.state_dict())  # a checkpoint written before inner_optimizer existed
    assert ours.state_dict()["state"].keys() == plain.state_dict()["state"].keys()


def test_a_checkpoint_of_another_inner_optimizer_is_refused_with_the_setting_named() -> None:
    model = build_model(MODEL, 0)
    muon = build_inner_optimizer(model, "muon", 3e-3, 0.0)
    steps(model, muon, 1)
    with pytest.raises(ValueError, match=r"train\.inner_optimizer"):
        build_inner_optimizer(model, "adamw", 3e-3, 0.0).load_state_dict(muon.state_dict())


def test_an_unknown_inner_optimizer_is_a_one_line_error_naming_the_key() -> None:
    with pytest.raises(ValueError, match=r"train\.inner_optimizer must be one of 'adamw', 'muon', got 'sgd'"):
        TrainConfig(inner_optimizer="sgd")  # type: ignore[arg-type]


def test_record_level_dp_sgd_steps_through_muon() -> None:
    """Opacus' DPOptimizer wraps the composite: a noised, clipped step moves Muon's and AdamW's parameters."""
    from node.training.dpsgd import DPSGDStep, RecordSampler

    model = build_model(MODEL, 0)
    corpus = bytes(torch.randint(97, 123, (4000,), generator=torch.Generator().manual_seed(0)).tolist())
    sampler = RecordSampler(corpus, MODEL.context, 4, seed=1)
    optimizer = build_inner_optimizer(model, "muon", 3e-3, 0.0)
    step = DPSGDStep(model, optimizer, sampler, 1.0, 1.0, torch.device("cpu"))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for _ in range(2):
        step()
    after = dict(model.named_parameters())
    assert not torch.equal(after["blocks.0.qkv.weight"], before["blocks.0.qkv.weight"])  # Muon's part
    assert not torch.equal(after["wte.weight"], before["wte.weight"])  # AdamW's part


def test_the_default_keeps_the_run_hash_and_muon_changes_it() -> None:
    from node.run_config import RunConfig

    default, muon = RunConfig(), RunConfig(train=TrainConfig(inner_optimizer="muon"))
    assert "inner_optimizer" not in default.shared_dict()["train"]  # runs from before the switch keep their hash
    assert default.digest() != muon.digest()  # peers on another inner optimizer are refused by the run hash


def test_sharding_with_muon_is_refused_in_one_line() -> None:
    from node.run_config import RunConfig, ShardingConfig

    with pytest.raises(ValueError, match=r"step with AdamW only; set train\.inner_optimizer = 'adamw'"):
        RunConfig(
            model=ModelConfig(n_layer=4), train=TrainConfig(inner_optimizer="muon"), sharding=ShardingConfig(stages=2)
        )

"""Learning-rate schedule and optimizer parameter groups."""

import math

import pytest
import torch

from posttrain.config import OptimizerConfig, SchedulerConfig
from posttrain.train.optim import build_optimizer, build_scheduler, lr_multiplier, move_optimizer_state


def test_warmup_is_linear_and_reaches_peak():
    cfg = SchedulerConfig(name="cosine", warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_multiplier(s, 20, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_multiplier(4, 20, cfg) == 1.0  # decay starts from the peak


def test_cosine_midpoint_and_end():
    cfg = SchedulerConfig(name="cosine", warmup_steps=0, min_lr_ratio=0.2)
    assert lr_multiplier(0, 10, cfg) == 1.0
    assert lr_multiplier(5, 10, cfg) == pytest.approx(0.2 + 0.8 * 0.5)
    assert lr_multiplier(10, 10, cfg) == pytest.approx(0.2)
    assert lr_multiplier(50, 10, cfg) == pytest.approx(0.2)  # stays at the floor past the end
    quarter = 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 0.25))
    assert lr_multiplier(2, 8, cfg) == pytest.approx(quarter)


def test_cosine_after_warmup():
    cfg = SchedulerConfig(name="cosine", warmup_steps=2, min_lr_ratio=0.0)
    # Decay runs over the remaining 10 - 2 = 8 steps: step 6 is its midpoint.
    assert lr_multiplier(6, 10, cfg) == pytest.approx(0.5)
    assert lr_multiplier(10, 10, cfg) == pytest.approx(0.0)


def test_linear():
    cfg = SchedulerConfig(name="linear", warmup_steps=0, min_lr_ratio=0.1)
    assert lr_multiplier(0, 10, cfg) == 1.0
    assert lr_multiplier(5, 10, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_multiplier(8, 10, cfg) == pytest.approx(0.1 + 0.9 * 0.2)
    assert lr_multiplier(10, 10, cfg) == pytest.approx(0.1)


def test_constant():
    cfg = SchedulerConfig(name="constant", warmup_steps=2, min_lr_ratio=0.1)
    assert [lr_multiplier(s, 10, cfg) for s in (0, 1, 2, 9, 100)] == [0.5, 1.0, 1.0, 1.0, 1.0]


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2, bias=False))


def test_scheduler_drives_real_optimizer():
    model = tiny_model()
    opt = build_optimizer(model, OptimizerConfig(lr=1e-3))
    cfg = SchedulerConfig(name="cosine", warmup_steps=3, min_lr_ratio=0.1)
    sched = build_scheduler(opt, cfg, total_steps=10)
    seen = []
    for _ in range(6):
        seen.append([g["lr"] for g in opt.param_groups])
        model(torch.randn(2, 3)).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    for step, lrs in enumerate(seen):
        expected = 1e-3 * lr_multiplier(step, 10, cfg)
        assert lrs == pytest.approx([expected, expected])
    assert seen[0][0] == pytest.approx(1e-3 / 3)
    assert seen[2][0] == pytest.approx(1e-3)


def test_one_dimensional_params_get_no_weight_decay():
    model = tiny_model()
    opt = build_optimizer(model, OptimizerConfig(lr=1e-3, weight_decay=0.05, betas=[0.8, 0.9], eps=1e-6))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05
    assert no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model[0].bias), id(model[1].weight), id(model[1].bias)}
    assert all(p.ndim >= 2 for p in decay["params"])
    assert decay["betas"] == (0.8, 0.9)
    assert decay["eps"] == 1e-6


def test_frozen_params_are_left_out():
    model = tiny_model()
    model[0].weight.requires_grad_(False)
    opt = build_optimizer(model, OptimizerConfig())
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model[0].weight) not in ids
    assert id(model[2].weight) in ids


def test_cpu_parameters_get_the_fused_adamw():
    assert build_optimizer(tiny_model(), OptimizerConfig()).defaults["fused"]


def test_moving_optimizer_state_moves_the_moments_and_leaves_the_step_counts():
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), foreach=True)  # keeps its step counts on the CPU
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    move_optimizer_state(optimizer, "meta")  # a device other than the CPU, on any machine
    for state in optimizer.state.values():
        assert state["exp_avg"].is_meta and state["exp_avg_sq"].is_meta
        assert state["step"].device.type == "cpu"

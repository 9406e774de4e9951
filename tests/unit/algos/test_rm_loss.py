"""The Bradley-Terry reward-model loss against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.algos.rm import rm_loss, rm_objective


def test_loss_and_metrics_match_hand_computed_values():
    chosen = torch.tensor([2.0, 0.0, -1.0])
    rejected = torch.tensor([1.0, 0.0, 1.0])
    loss, m = rm_loss(chosen, rejected)
    # margins 1, 0, -2: -log sigmoid(1) = log(1 + e^-1), -log sigmoid(0) = log 2, -log sigmoid(-2) = log(1 + e^2)
    expected = (math.log1p(math.exp(-1)) + math.log(2) + math.log1p(math.exp(2))) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["accuracy"].item() == pytest.approx(1 / 3)  # the tie counts as wrong
    assert m["margin"].item() == pytest.approx(-1 / 3)
    assert m["rewards_chosen"].item() == pytest.approx(1 / 3)
    assert m["rewards_rejected"].item() == pytest.approx(2 / 3)


def test_equal_rewards_give_log_2():
    loss, m = rm_loss(torch.zeros(4), torch.zeros(4))
    assert loss.item() == pytest.approx(math.log(2))
    assert m["accuracy"].item() == 0.0


def test_gradient_pushes_chosen_up_and_rejected_down():
    chosen = torch.tensor([0.5], requires_grad=True)
    rejected = torch.tensor([0.5], requires_grad=True)
    rm_loss(chosen, rejected)[0].backward()
    # d/dm -log sigmoid(m) = -sigmoid(-m) = -0.5 at m = 0
    assert chosen.grad.item() == pytest.approx(-0.5)
    assert rejected.grad.item() == pytest.approx(0.5)


def test_micro_batches_sum_to_the_global_batch():
    torch.manual_seed(0)
    chosen, rejected = torch.randn(8), torch.randn(8)
    full_loss, full = rm_loss(chosen, rejected)
    parts = [rm_loss(chosen[i : i + 2], rejected[i : i + 2], num_pairs=8) for i in range(0, 8, 2)]
    assert sum(p[0] for p in parts).item() == pytest.approx(full_loss.item(), rel=1e-6)
    for name, value in full.items():
        assert sum(p[1][name] for p in parts).item() == pytest.approx(value.item(), rel=1e-5, abs=1e-7)


def test_objective_splits_rows_into_chosen_and_rejected_halves():
    scores = torch.tensor([3.0, 1.0, 0.0, 2.0])  # chosen [3, 1], rejected [0, 2]
    loss, m = rm_objective(scores)
    expected_loss, expected = rm_loss(torch.tensor([3.0, 1.0]), torch.tensor([0.0, 2.0]))
    assert loss.item() == pytest.approx(expected_loss.item())
    assert m["accuracy"].item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="two halves"):
        rm_objective(torch.zeros(3))
    with pytest.raises(ValueError, match="one score per row"):
        rm_objective(torch.zeros(4, 1))

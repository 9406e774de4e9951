import math

import pytest
import torch

from posttrain.algos.advantages import group_advantages, informative_groups, overlong_penalty

REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [3.0, 0.0, 0.0, 0.0]])


def test_mean_baseline_without_std():
    adv = group_advantages(REWARDS, "mean", normalize_std=False)
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0], [2.25, -0.75, -0.75, -0.75]])
    torch.testing.assert_close(adv, expected)


def test_std_normalisation_uses_the_unbiased_group_std():
    adv = group_advantages(REWARDS, "mean", normalize_std=True, eps=0.0)
    # group 0: std (ddof=1) of [1,0,0,1] = sqrt(1/3); group 2: std of [3,0,0,0] = 1.5
    assert adv[0, 0].item() == pytest.approx(0.5 / math.sqrt(1 / 3), rel=1e-6)
    assert adv[2, 0].item() == pytest.approx(2.25 / 1.5, rel=1e-6)
    # an all-equal group gives zeros, not NaN, with the default eps
    assert torch.equal(group_advantages(REWARDS)[1], torch.zeros(4))


def test_leave_one_out_compares_with_the_other_samples():
    adv = group_advantages(REWARDS, "leave_one_out", normalize_std=False)
    # sample 0 of group 2: 3 - mean(0, 0, 0) = 3; sample 1: 0 - mean(3, 0, 0) = -1
    assert adv[2, 0].item() == pytest.approx(3.0)
    assert adv[2, 1].item() == pytest.approx(-1.0)
    assert adv[0, 0].item() == pytest.approx(1 - 1 / 3)


def test_bad_shapes_and_baselines_are_rejected():
    with pytest.raises(ValueError, match="group>=2"):
        group_advantages(torch.ones(4))
    with pytest.raises(ValueError, match="unknown baseline"):
        group_advantages(REWARDS, "median")


def test_informative_groups_drops_all_equal_groups():
    assert informative_groups(REWARDS).tolist() == [True, False, True]


def test_overlong_penalty_ramps_linearly_inside_the_buffer():
    got = overlong_penalty(torch.tensor([5, 6, 8, 10, 12]), max_length=10, buffer=4, penalty=1.0)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))
    with pytest.raises(ValueError):
        overlong_penalty(torch.tensor([1]), max_length=10, buffer=0)


@pytest.mark.parametrize("baseline", ["mean", "leave_one_out"])
def test_all_equal_non_integer_rewards_give_exact_zeros(baseline):
    # The float32 mean of eleven -2.95s is not -2.95; divided by std + eps that rounding error became
    # an advantage of 0.3 for every sample.
    for group, value in [(11, -2.95), (3, -2.98), (16, 0.1), (7, 0.3)]:
        rewards = torch.full((2, group), value)
        assert torch.equal(group_advantages(rewards, baseline), torch.zeros(2, group))


@pytest.mark.parametrize("baseline", ["mean", "leave_one_out"])
@pytest.mark.parametrize("normalize_std", [False, True])
def test_invalid_samples_are_left_out_of_their_groups_baseline(baseline, normalize_std):
    # Group 0 with its third sample invalid gets exactly the advantages of [1, 0, 1] alone, whatever
    # the invalid one's reward; group 1 keeps one valid sample: nothing to compare it with.
    rewards = torch.tensor([[1.0, 0.0, -7.0, 1.0], [5.0, 0.0, 0.0, 0.0]])
    valid = torch.tensor([[True, True, False, True], [False, True, False, False]])
    adv = group_advantages(rewards, baseline, normalize_std, valid=valid)
    alone = group_advantages(torch.tensor([[1.0, 0.0, 1.0]]), baseline, normalize_std)
    torch.testing.assert_close(adv[0, [0, 1, 3]], alone[0])
    assert adv[0, 2].item() == 0.0 and torch.equal(adv[1], torch.zeros(4))
    # hand-computed, leave-one-out without std: 1 - mean(0, 1) = 0.5, 0 - mean(1, 1) = -1
    if baseline == "leave_one_out" and not normalize_std:
        torch.testing.assert_close(adv[0], torch.tensor([0.5, -1.0, 0.0, 0.5]))
    # all valid: the same as without a mask
    torch.testing.assert_close(group_advantages(REWARDS, baseline, normalize_std, valid=torch.ones(3, 4, dtype=torch.bool)),
                               group_advantages(REWARDS, baseline, normalize_std))


def test_a_group_is_informative_by_its_valid_rewards_only():
    rewards = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    valid = torch.tensor([[True, False, True], [True, True, True]])
    assert informative_groups(rewards, valid).tolist() == [False, True]

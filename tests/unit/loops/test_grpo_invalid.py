"""Invalid samples in a GRPO step: left out of the baseline and the loss, counted by reason, and a
run that keeps failing to score its samples stops with a message."""

import math
from types import SimpleNamespace

import pytest
import torch

from posttrain.config import EnvConfig, GRPORunConfig
from posttrain.data.prompts import Prompt
from posttrain.envs.base import EnvOutcome, InvalidRolloutsError
from posttrain.loops.grpo import _count_invalid_steps, _trajectories
from posttrain.rollout.base import Completion
from posttrain.rollout.collect import Group, Rollout, RolloutCollector, rollout_metrics


def _group(rewards: list[float], invalid: list[str | None]) -> Group:
    completions = [Completion([10 + j], [-1.0], "stop", str(j)) for j in range(len(rewards))]
    outcomes = [EnvOutcome(r, [], True, {"turns": 1, **({"reward_error": "ValueError('x')"} if why else {})}, why)
                for r, why in zip(rewards, invalid, strict=True)]
    return Group(Prompt([], [1, 2], {}), completions, outcomes, torch.tensor(rewards),
                 torch.tensor([why is None for why in invalid]))


def test_invalid_samples_train_on_nothing_and_count_by_reason():
    groups = [_group([1.0, 0.0, 0.0, 1.0], [None, None, "reward_error", None]), _group([1.0] * 4, ["timeout"] * 4)]
    trajectories = _trajectories(groups, GRPORunConfig())
    assert [t.response_ids for t in trajectories] == [[10], [11], [13]]  # the valid ones of group 0 only
    alone = _trajectories([_group([1.0, 0.0, 1.0], [None] * 3)], GRPORunConfig())
    assert [t.advantage for t in trajectories] == [t.advantage for t in alone]

    metrics = rollout_metrics(groups)
    assert metrics["invalid_fraction"] == 5 / 8
    assert metrics["invalid/reward_error"] == 1 and metrics["invalid/timeout"] == 4
    assert metrics["reward_mean"] == pytest.approx(2 / 3) and metrics["accuracy"] == pytest.approx(2 / 3)
    assert math.isnan(rollout_metrics(groups[1:])["reward_mean"])  # nothing valid to average


def test_a_run_stops_after_too_many_steps_with_too_many_invalid_samples():
    env = EnvConfig(max_invalid_fraction=0.5, max_invalid_steps=2)
    failing = [_group([0.0] * 4, ["reward_error"] * 3 + [None])]
    rollout = Rollout(failing, failing, {}, {})
    metrics = {f"rollout/{k}": v for k, v in rollout_metrics(failing).items()}
    assert _count_invalid_steps(0, rollout, metrics, env) == 1
    assert _count_invalid_steps(1, rollout, {**metrics, "rollout/invalid_fraction": 0.5}, env) == 0  # not above: reset
    with pytest.raises(InvalidRolloutsError, match=r"75% of this step's samples could not be scored \(reward_error: 3\), "
                                                   r"more than env\.max_invalid_fraction \(0\.5\) for 2 steps in a row.*"
                                                   r"first error: ValueError\('x'\)"):
        _count_invalid_steps(1, rollout, metrics, env)


@pytest.mark.parametrize(("policy", "valid"), [("mask", [True, False, True]), ("error_reward", [True, True, True])])
def test_the_invalid_policy_decides_what_trains(policy, valid):
    cfg = GRPORunConfig()
    cfg.env.invalid_policy = policy
    made = _group([1.0, 0.0, 0.0], [None, "reward_error", None])
    group = RolloutCollector._group(SimpleNamespace(cfg=cfg), made.prompt, made.completions, made.outcomes)
    assert group.valid.tolist() == valid
    assert len(_trajectories([group], cfg)) == sum(valid)

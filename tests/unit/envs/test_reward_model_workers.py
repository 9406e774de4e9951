"""GRPO's reward model: one copy per reward-model worker, in the policy's precision, shared by the
environment actors through plain clients; the scores equal an in-process environment's."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import ray
import torch

from posttrain.cluster.ray_cluster import WorkerGroup
from posttrain.config import EnvConfig
from posttrain.envs import make_environment
from posttrain.envs.base import EnvItem
from posttrain.envs.reward_model_env import RewardModelScorer
from posttrain.envs.worker import EnvironmentWorker

RESPONSES = ["4", "5", "The answer is 4.", "", "22 + 2 = 4, so 4", "no idea"]


def test_environment_actors_share_the_reward_model_workers_and_score_as_in_process(reward_model_dir, ray_session):
    cfg = EnvConfig(name="reward_model", reward_model_path=reward_model_dir, reward_model_batch_size=4)
    conversations = [[{"role": "user", "content": "What is 2 + 2?"}]] * len(RESPONSES)
    expected = make_environment(cfg).step(conversations, RESPONSES, [{}] * len(RESPONSES)).rewards
    assert len(set(expected)) > 1  # the head tells the responses apart

    scorers = WorkerGroup(RewardModelScorer, 2, name="reward_model", args=(reward_model_dir, "float32", 4),
                          num_cpus_per_worker=0.5)
    envs = WorkerGroup(EnvironmentWorker, 2, name="environment", args=(cfg,),
                       kwargs={"services": {"reward_model": scorers.clients()}}, num_cpus_per_worker=0.25)
    try:
        items = [EnvItem(c, r, {}) for c, r in zip(conversations, RESPONSES, strict=True)]
        rewards = [o.reward for o in envs.call_sharded("step", items)]  # 3 samples per actor, one model each
        assert rewards == pytest.approx(expected, abs=1e-5)
    finally:
        envs.shutdown()
        scorers.shutdown()


def test_a_scorer_holds_its_copy_in_the_precision_asked(reward_model_dir):
    cfg = EnvConfig(name="reward_model", reward_model_path=reward_model_dir)
    conversations = [[{"role": "user", "content": "What is 2 + 2?"}]] * len(RESPONSES)
    full = make_environment(cfg).step(conversations, RESPONSES, [{}] * len(RESPONSES)).rewards
    scorer = RewardModelScorer(reward_model_dir, "bfloat16")
    assert scorer.model.dtype == torch.bfloat16
    half = make_environment(cfg, reward_model=scorer).step(conversations, RESPONSES, [{}] * len(RESPONSES)).rewards
    assert half == pytest.approx(full, abs=0.05) and half != full  # the same model, rounded to bfloat16


class DiesWhileScoring(RewardModelScorer):
    """Exits its process in the middle of a call, once per `marker` file."""

    def __init__(self, *args, marker: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.marker = Path(marker)

    def score(self, samples):
        try:
            self.marker.unlink()
        except FileNotFoundError:
            return super().score(samples)
        os._exit(1)


@pytest.mark.parametrize("restarts", [1, 0])
def test_a_reward_model_worker_that_dies_mid_call_is_asked_again_once_restarted(reward_model_dir, ray_session,
                                                                                 tmp_path, restarts):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this module
    cfg = EnvConfig(name="reward_model", reward_model_path=reward_model_dir, reward_model_batch_size=4)
    conversations = [[{"role": "user", "content": "What is 2 + 2?"}]] * len(RESPONSES)
    expected = make_environment(cfg).step(conversations, RESPONSES, [{}] * len(RESPONSES)).rewards
    marker = tmp_path / "die"
    marker.touch()
    scorers = WorkerGroup(DiesWhileScoring, 1, name="reward_model", args=(reward_model_dir, "float32", 4),
                          kwargs={"marker": str(marker)}, num_cpus_per_worker=0.5, max_restarts=restarts)
    try:
        env = make_environment(cfg, reward_model=scorers.clients()[0])
        if restarts:
            assert env.step(conversations, RESPONSES, [{}] * len(RESPONSES)).rewards == pytest.approx(expected, abs=1e-5)
            assert not marker.exists()
        else:
            with pytest.raises(ray.exceptions.RayActorError):
                env.step(conversations, RESPONSES, [{}] * len(RESPONSES))
    finally:
        scorers.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])

"""Shared fixtures, built once per session: the tiny model (offline, loaded by path), a reward model
made from it, and one local
Ray whose workers can import the e2e tests' reward functions and environments."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from posttrain.demo.tiny_model import save_reward_model, save_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", size="test")


@pytest.fixture(scope="session")
def reward_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a fresh one-output head: a reward model as `posttrain rm` exports one."""
    return str(save_reward_model(tiny_model_dir, tmp_path_factory.mktemp("reward_model")))


def start_ray() -> None:
    """A local Ray whose workers inherit PYTHONPATH with the e2e tests' folder, so that they can
    import the modules next to the e2e tests (`grpo_reward_fns`), named by env.reward_fn and env.name."""
    import ray

    from posttrain.cluster import init_ray
    from posttrain.config import ClusterConfig

    if ray.is_initialized():  # started by someone else, without our PYTHONPATH
        ray.shutdown()
    with pytest.MonkeyPatch.context() as mp:
        e2e = str(Path(__file__).parent / "e2e")
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [e2e, os.environ.get("PYTHONPATH")])))
        init_ray(ClusterConfig())


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every test that needs one (a start costs seconds; the loops reuse a running
    Ray); its value starts it again, for a test that needed a cluster of its own meanwhile."""
    import ray

    start_ray()
    yield start_ray
    ray.shutdown()

"""env.runtime_env: the environment actors get their own dependencies (a Ray runtime environment),
which the trainer's own Python does not have."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from posttrain.cluster.ray_cluster import WorkerGroup
from posttrain.config import ConfigError, EnvConfig
from posttrain.config.eval import EvalRunConfig
from posttrain.envs.base import EnvItem
from posttrain.envs.registry import check_env_config
from posttrain.envs.worker import EnvironmentWorker


@pytest.fixture(scope="module")
def reward_wheel(tmp_path_factory):
    """A wheel of a package the main environment lacks, holding a reward function."""
    root = tmp_path_factory.mktemp("isolated")
    package = root / "src" / "posttrain_isolated_reward"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "import os\n\ndef reward(conversation, response, metadata):\n"
        "    return float(len(response)) + float(os.environ['REWARD_OFFSET'])\n")
    (root / "src" / "pyproject.toml").write_text(
        '[project]\nname = "posttrain-isolated-reward"\nversion = "0.1"\n'
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n')
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(root / "dist"), str(root / "src")], check=True, capture_output=True)
    return str(next((root / "dist").glob("*.whl")))


def test_the_environment_actors_run_with_their_own_packages(reward_wheel, ray_session):
    assert importlib.util.find_spec("posttrain_isolated_reward") is None  # not in the trainer's Python
    cfg = EnvConfig(reward_fn="posttrain_isolated_reward:reward",  # called in a time-limited child, too
                    runtime_env={"pip": [reward_wheel], "env_vars": {"REWARD_OFFSET": "0.5"}})
    check_env_config(cfg)  # the driver leaves the import to the actors
    with pytest.raises(ConfigError, match="cannot import module 'posttrain_isolated_reward'"):
        check_env_config(EnvConfig(reward_fn="posttrain_isolated_reward:reward"))
    group = WorkerGroup(EnvironmentWorker, 1, name="environment", args=(cfg,), num_cpus_per_worker=0.5,
                        runtime_env=cfg.runtime_env)
    try:
        item = EnvItem([{"role": "user", "content": "hi"}], "four", {"answer": "x"})
        [[outcome]] = group.call_all("step", [item])
        assert outcome.reward == 4.5 and outcome.invalid is None
    finally:
        group.shutdown()


def test_eval_refuses_a_runtime_env_it_cannot_apply():
    cfg = EvalRunConfig()
    cfg.generation.model_name = "m"
    cfg.env.runtime_env = {"pip": ["x"]}
    with pytest.raises(ConfigError, match="env.runtime_env sets up GRPO's environment actors"):
        cfg.check()

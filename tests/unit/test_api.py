"""The public Python API: the names the README promises, importable from `posttrain`, lazily."""

from __future__ import annotations

import subprocess
import sys

import pytest

import posttrain

PUBLIC = ["run_sft", "run_dpo", "run_rm", "run_grpo", "run_eval", "SFTRunConfig", "DPORunConfig", "RMRunConfig",
          "GRPORunConfig", "EvalRunConfig", "load_config", "ConfigError", "Environment", "EnvStepResult",
          "Invalid"]


def test_every_public_name_resolves_to_its_definition():
    from posttrain.config import GRPORunConfig
    from posttrain.envs.base import Environment
    from posttrain.loops.grpo import run_grpo

    assert sorted(posttrain.__all__) == sorted(["__version__", *PUBLIC])
    assert all(callable(getattr(posttrain, name)) for name in PUBLIC)
    assert posttrain.run_grpo is run_grpo and posttrain.GRPORunConfig is GRPORunConfig
    assert posttrain.Environment is Environment


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'run_ppo'"):
        posttrain.run_ppo  # noqa: B018


def test_importing_the_package_loads_neither_torch_nor_ray():
    code = ("import sys, posttrain; heavy = [m for m in ('torch', 'ray', 'transformers') if m in sys.modules]; "
            "print(heavy); from posttrain import GRPORunConfig; print(GRPORunConfig.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["[]", "GRPORunConfig"]

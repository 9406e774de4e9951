"""The env check run before Ray starts: every import path of the env config resolves, or the error names its key."""

from __future__ import annotations

import pytest

from posttrain.config import ConfigError, EnvConfig
from posttrain.envs.registry import check_env_config


@pytest.mark.parametrize(("fields", "message"), [
    ({"name": "chess"}, r"env\.name: unknown environment 'chess'"),
    ({"reward_fn": "posttrain_no_such_module:fn"},
     r"env\.reward_fn='posttrain_no_such_module:fn': cannot import module 'posttrain_no_such_module'"),
    ({"reward_fn": "{mod}:missing"}, r"env\.reward_fn='reward_fns_for_tests:missing': module .* has no attribute"),
    ({"reward_fn": "{mod}:NOT_CALLABLE"}, r"env\.reward_fn=.* is a int, not a function"),
    ({"tools": ["posttrain_no_such_module:tool"]}, r"env\.tools='posttrain_no_such_module:tool': cannot import"),
])
def test_each_import_path_is_resolved(reward_fns, fields, message):
    fields = {k: v.format(mod=reward_fns) if isinstance(v, str) else v for k, v in fields.items()}
    with pytest.raises(ConfigError, match=message):
        check_env_config(EnvConfig(**fields))


def test_a_config_whose_paths_resolve_passes(reward_fns):
    check_env_config(EnvConfig(name=f"{reward_fns}:EchoEnvironment", reward_fn=f"{reward_fns}:exact_match",
                               tools=[f"{reward_fns}:multiply"]))


@pytest.mark.parametrize("loop", ["grpo", "eval"])
def test_the_loops_check_the_env_before_ray_or_a_model_starts(monkeypatch, loop):
    """The Python API checks as the CLI does: a model named "x" or a Ray start would fail otherwise."""
    import ray

    from posttrain.config import EvalRunConfig, GRPORunConfig
    from posttrain.loops.eval import run_eval
    from posttrain.loops.grpo import run_grpo

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started before the env config was checked")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(ray, "remote", no_ray)
    env = EnvConfig(reward_fn="posttrain_no_such_module:fn")
    run, cfg = (run_grpo, GRPORunConfig(env=env)) if loop == "grpo" else (run_eval, EvalRunConfig(env=env))
    (cfg.policy if loop == "grpo" else cfg.generation).model_name = "x"  # else the config's own check fails first
    with pytest.raises(ConfigError, match=r"env\.reward_fn='posttrain_no_such_module:fn': cannot import"):
        run(cfg)

"""What the env config names, resolved: `env.name` to an Environment class, `env.reward_fn` and
`env.tools` to functions.

`check_env_config` resolves them all in the driver, before Ray starts, so a typo in an import
path fails at once with a message naming its key, not minutes later inside an actor. The built-in
environments are imported by name only when chosen (their modules import this one).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from transformers.utils import get_json_schema

from posttrain.config import ConfigError, EnvConfig
from posttrain.config.sections import check_judge
from posttrain.envs.base import Environment, RewardFn

BUILT_IN = {
    "math": "posttrain.envs.math_env:MathEnvironment",
    "python_tool": "posttrain.envs.python_tool:PythonToolEnvironment",
    "tools": "posttrain.envs.tool_calling:ToolCallingEnvironment",
    "code": "posttrain.envs.code_env:CodeEnvironment",
    "number_guess": "posttrain.envs.number_guess:NumberGuessEnvironment",
    "reward_model": "posttrain.envs.reward_model_env:RewardModelEnvironment",
    "judge": "posttrain.envs.judge_env:JudgeEnvironment",
    "math_judge": "posttrain.envs.judge_env:MathJudgeEnvironment",
}

NO_TOOLS = "env.name=tools needs env.tools: the functions the model may call, as 'package.module:function'"


def check_env_config(cfg: EnvConfig) -> None:
    """Import everything `cfg` names (env.name, env.reward_fn, env.tools), and try the sandbox if the
    environment runs the model's code; raises ConfigError. With `env.runtime_env`, the environment
    and reward function may need packages only the actors have: they are imported there, at start."""
    if cfg.runtime_env is None or cfg.name in BUILT_IN:
        if environment_class(cfg.name).runs_programs:
            from posttrain.envs.sandbox import check_sandbox
            check_sandbox(cfg.sandbox)
    if "judge" in services_of(cfg):
        check_judge(cfg)
    if cfg.reward_fn and cfg.runtime_env is None:
        load_reward_fn(cfg.reward_fn)
    load_tools(cfg.tools)
    if cfg.name == "tools" and not cfg.tools:
        raise ConfigError(NO_TOOLS)


def services_of(cfg: EnvConfig) -> tuple[str, ...]:
    """The models the run must serve the environment `cfg` names (its class's `services`); none for
    one of your own left to its actors by env.runtime_env, which the driver cannot import."""
    if cfg.runtime_env is not None and cfg.name not in BUILT_IN:
        return ()
    return environment_class(cfg.name).services


def make_environment(cfg: EnvConfig, *, rank: int = 0, world_size: int = 1, **services: Any) -> Environment:
    """`services`: what the environment uses that the run serves (`reward_model=` a scorer,
    `judge=` a chat model), passed on by name."""
    return environment_class(cfg.name)(cfg, rank=rank, world_size=world_size, **services)


def environment_class(name: str) -> type[Environment]:
    """A built-in environment by name, or a user's Environment subclass as "package.module:Class"."""
    if name in BUILT_IN:
        return import_object(BUILT_IN[name], "env.name")
    if ":" not in name:
        raise ConfigError(f"env.name: unknown environment {name!r}; use one of {list(BUILT_IN)} or "
                          "'package.module:Class' (a subclass of posttrain.envs.Environment)")
    cls = import_object(name, "env.name")
    if not (isinstance(cls, type) and issubclass(cls, Environment)):
        raise ConfigError(f"env.name={name!r} is not a subclass of posttrain.envs.Environment")
    return cls


def load_reward_fn(spec: str) -> RewardFn:
    """Import "package.module:function" once, with errors that name the config key."""
    fn = import_object(spec, "env.reward_fn")
    if not callable(fn):
        raise ConfigError(f"env.reward_fn={spec!r} is a {type(fn).__name__}, not a function")
    return fn


def load_tools(specs: list[str]) -> list[Callable]:
    """The functions of `env.tools`, each checked to have the schema a chat template needs."""
    tools = []
    for spec in specs:
        fn = import_object(spec, "env.tools")
        if not callable(fn):
            raise ConfigError(f"env.tools: {spec!r} is a {type(fn).__name__}, not a function")
        try:
            get_json_schema(fn)
        except Exception as err:
            raise ConfigError(f"env.tools: {spec!r} has no usable schema ({err}); a tool needs type hints and a "
                              "Google-style docstring with an Args section") from err
        tools.append(fn)
    names = [fn.__name__ for fn in tools]
    if len(set(names)) != len(names):
        raise ConfigError(f"env.tools: two tools share a name ({names}); the model calls them by name")
    return tools


def import_object(spec: str, key: str) -> Any:
    """Import "package.module:attribute", with errors that name the config key."""
    module_name, colon, attr = spec.partition(":")
    if not colon or not module_name or not attr:
        raise ConfigError(f"{key} must look like 'package.module:name', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:
        raise ConfigError(f"{key}={spec!r}: cannot import module {module_name!r}: {err!r}") from err
    if not hasattr(module, attr):
        raise ConfigError(f"{key}={spec!r}: module {module_name!r} has no attribute {attr!r}")
    return getattr(module, attr)

"""The environment interface: score a batch of responses and say what the model sees next.

A single-turn verifier is the one-step case: every sample is done and nothing is appended.
Games and tools return observations and stay open through the same call. Environments are
plain picklable objects built from config alone, because the GRPO loop builds them inside
Ray actors (which pass `rank` and `world_size`).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from posttrain.config import ConfigError, EnvConfig

Message = dict[str, str]


@dataclass
class EnvStepResult:
    rewards: list[float]
    observations: list[list[Message]]  # messages to append before the next turn; [] when done
    done: list[bool]
    metadata: list[dict[str, Any]]  # per sample, for logs: e.g. "extracted_answer", "reward_error"


class Environment(ABC):
    def __init__(self, cfg: EnvConfig, *, rank: int = 0, world_size: int = 1):
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size

    @abstractmethod
    def step(self, conversations: list[list[Message]], responses: list[str],
             metadata: list[dict[str, Any]]) -> EnvStepResult:
        """Score each sample's latest response; a failure of one sample must not fail the batch."""

    @staticmethod
    def _check_batch(conversations: list, responses: list, metadata: list) -> None:
        if not len(conversations) == len(responses) == len(metadata):
            raise ValueError(f"environment step got {len(conversations)} conversations, {len(responses)} "
                             f"responses and {len(metadata)} metadata dicts; they must match one to one")


BUILT_IN = ("math", "python_tool", "tools", "code", "number_guess", "reward_model")


def make_environment(cfg: EnvConfig, *, rank: int = 0, world_size: int = 1) -> Environment:
    return environment_class(cfg.name)(cfg, rank=rank, world_size=world_size)


def environment_class(name: str) -> type[Environment]:
    """A built-in environment by name, or a user's Environment subclass as "package.module:Class"."""
    # Imported here: the environment modules import this one for the base class.
    from posttrain.envs.code_env import CodeEnvironment
    from posttrain.envs.math_env import MathEnvironment
    from posttrain.envs.number_guess import NumberGuessEnvironment
    from posttrain.envs.python_tool import PythonToolEnvironment
    from posttrain.envs.reward_model_env import RewardModelEnvironment
    from posttrain.envs.tool_calling import ToolCallingEnvironment

    built_in = {"math": MathEnvironment, "python_tool": PythonToolEnvironment, "tools": ToolCallingEnvironment,
                "code": CodeEnvironment,
                "number_guess": NumberGuessEnvironment, "reward_model": RewardModelEnvironment}
    if name in built_in:
        return built_in[name]
    if ":" not in name:
        raise ConfigError(f"env.name: unknown environment {name!r}; use one of {list(BUILT_IN)} or "
                          "'package.module:Class' (a subclass of posttrain.envs.Environment)")
    cls = import_object(name, "env.name")
    if not (isinstance(cls, type) and issubclass(cls, Environment)):
        raise ConfigError(f"env.name={name!r} is not a subclass of posttrain.envs.Environment")
    return cls


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

"""The environment interface: score a batch of responses and say what the model sees next.

A single-turn verifier is the one-step case: every sample is done and nothing is appended.
Games and tools return observations and stay open through the same call. Environments are
plain picklable objects built from config alone, because the GRPO loop builds them inside
Ray actors (which pass `rank` and `world_size`).
"""

from __future__ import annotations

import importlib
import math
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


# Built-in environments by name, imported when used (their modules import this one).
BUILT_IN = {
    "math": "posttrain.envs.math_env:MathEnvironment",
    "python_tool": "posttrain.envs.python_tool:PythonToolEnvironment",
    "tools": "posttrain.envs.tool_calling:ToolCallingEnvironment",
    "code": "posttrain.envs.code_env:CodeEnvironment",
    "number_guess": "posttrain.envs.number_guess:NumberGuessEnvironment",
    "reward_model": "posttrain.envs.reward_model_env:RewardModelEnvironment",
}


def make_environment(cfg: EnvConfig, *, rank: int = 0, world_size: int = 1) -> Environment:
    return environment_class(cfg.name)(cfg, rank=rank, world_size=world_size)


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


def as_reward(value: Any) -> float:
    """A reward as a float: anything float() takes except text (bool, int, NumPy and torch scalars), finite."""
    if isinstance(value, str | bytes) or not hasattr(type(value), "__float__"):
        raise TypeError(f"reward function returned {type(value).__name__} {value!r}, not a number")
    reward = float(value)
    if not math.isfinite(reward):
        raise ValueError(f"reward function returned {reward}, not a finite number")
    return reward


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

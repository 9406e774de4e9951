"""The environment interface: score a batch of responses and say what the model sees next.

A single-turn verifier is the one-step case: every sample is done and nothing is appended.
Games and tools return observations and stay open through the same call. Environments are
plain picklable objects built from config alone, because the GRPO loop builds them inside
Ray actors (which pass `rank` and `world_size`).
"""

from __future__ import annotations

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


def make_environment(cfg: EnvConfig, *, rank: int = 0, world_size: int = 1) -> Environment:
    # Imported here: the environment modules import this one for the base class.
    from posttrain.envs.math_env import MathEnvironment
    from posttrain.envs.reward_model_env import RewardModelEnvironment

    environments: dict[str, type[Environment]] = {"math": MathEnvironment, "reward_model": RewardModelEnvironment}
    if cfg.name not in environments:
        raise ConfigError(f"env.name: unknown environment {cfg.name!r}; valid names: {sorted(environments)}")
    return environments[cfg.name](cfg, rank=rank, world_size=world_size)

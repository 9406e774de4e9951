"""The environment interface: score a batch of responses and say what the model sees next.

A single-turn verifier is the one-step case: every sample is done and nothing is appended.
Games and tools return observations and stay open through the same call. Environments are
plain picklable objects built from config alone, because the GRPO loop builds them inside
Ray actors (which pass `rank` and `world_size`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from posttrain.config import EnvConfig

Message = dict[str, str]
# A user's `env.reward_fn`: (conversation, response, metadata) -> a number
RewardFn = Callable[[list[Message], str, dict[str, Any]], Any]


@dataclass
class EnvStepResult:
    rewards: list[float]
    observations: list[list[Message]]  # messages to append before the next turn; [] when done
    done: list[bool]
    metadata: list[dict[str, Any]]  # per sample, for logs: e.g. "extracted_answer", "reward_error"
    # Per sample, why it could not be scored (its reward is then no measure of the response: see
    # env.invalid_policy), or None; None for the whole batch: every sample was scored. An invalid
    # sample's episode ends.
    invalid: list[str | None] | None = None


@dataclass(frozen=True)
class Invalid:
    """What a reward function returns for a sample it cannot score, with the reason (a short
    name, counted as rollout/invalid/<reason>)."""

    reason: str


class InvalidRolloutsError(RuntimeError):
    """Too many samples could not be scored for too long (env.max_invalid_fraction)."""


@dataclass
class EnvItem:
    """One sample handed to an environment worker: batches shard and gather as lists of these."""

    conversation: list[Message]
    response: str
    metadata: dict[str, Any]


@dataclass
class EnvOutcome:
    """One sample's share of an EnvStepResult, checked."""

    reward: float
    observation: list[Message]
    done: bool
    metadata: dict[str, Any]
    invalid: str | None = None  # why it could not be scored, if it could not


class Environment(ABC):
    runs_programs = False  # runs the model's code, so start-up checks that the sandbox works here
    # Models the run serves this environment in workers of their own, each passed to its
    # constructor by name: "reward_model" (a scorer), "judge" (a chat model)
    services: tuple[str, ...] = ()

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


def as_reward(value: Any) -> float:
    """A reward as a float: anything float() takes except text (bool, int, NumPy and torch scalars), finite."""
    if isinstance(value, str | bytes) or not hasattr(type(value), "__float__"):
        raise TypeError(f"reward function returned {type(value).__name__} {value!r}, not a number")
    reward = float(value)
    if not math.isfinite(reward):
        raise ValueError(f"reward function returned {reward}, not a finite number")
    return reward

"""An environment as a worker-group member: per-sample results, so batches shard and gather as lists."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from posttrain.config import EnvConfig
from posttrain.envs.base import make_environment


@dataclass
class EnvItem:
    conversation: list[dict[str, str]]
    response: str
    metadata: dict[str, Any]


@dataclass
class EnvOutcome:
    reward: float
    observation: list[dict[str, str]]
    done: bool
    metadata: dict[str, Any]


class EnvironmentWorker:
    def __init__(self, cfg: EnvConfig, *, rank: int = 0, world_size: int = 1):
        self.env = make_environment(cfg, rank=rank, world_size=world_size)

    def step(self, items: list[EnvItem]) -> list[EnvOutcome]:
        result = self.env.step([i.conversation for i in items], [i.response for i in items],
                               [i.metadata for i in items])
        return [EnvOutcome(*fields) for fields in zip(result.rewards, result.observations, result.done,
                                                      result.metadata, strict=True)]

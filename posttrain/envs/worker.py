"""An environment as a worker-group member: per-sample results, so batches shard and gather as lists."""

from __future__ import annotations

from typing import Any

from posttrain.config import EnvConfig
from posttrain.envs.base import EnvItem, EnvOutcome, EnvStepResult, as_reward
from posttrain.envs.registry import make_environment


class EnvironmentWorker:
    def __init__(self, cfg: EnvConfig, *, rank: int = 0, world_size: int = 1, services: dict[str, list] | None = None):
        """`services`: by name, clients of the workers serving a model to the environments (the
        reward model, the judge), shared round robin by rank."""
        chosen = {name: clients[rank % len(clients)] for name, clients in (services or {}).items()}
        self.env = make_environment(cfg, rank=rank, world_size=world_size, **chosen)

    def step(self, items: list[EnvItem]) -> list[EnvOutcome]:
        result = self.env.step([i.conversation for i in items], [i.response for i in items],
                               [i.metadata for i in items])
        return _outcomes(result, len(items), f"{type(self.env).__name__}.step")


def _outcomes(result: Any, n: int, where: str) -> list[EnvOutcome]:
    """Per-sample outcomes of an environment's result, checked: a user's environment that returns
    the wrong shapes or types fails here, by name, not later inside tokenization or training."""
    if not isinstance(result, EnvStepResult):
        raise TypeError(f"{where} returned {type(result).__name__}, not an EnvStepResult")
    for field in ("rewards", "observations", "done", "metadata"):
        values = getattr(result, field)
        if not isinstance(values, list | tuple) or len(values) != n:
            length = len(values) if isinstance(values, list | tuple) else type(values).__name__
            raise ValueError(f"{where} returned {field} of length {length} for {n} samples")
    invalid = [None] * n if result.invalid is None else result.invalid
    if not isinstance(invalid, list | tuple) or len(invalid) != n or not all(
            reason is None or (isinstance(reason, str) and reason) for reason in invalid):
        raise ValueError(f"{where} returned invalid={result.invalid!r}; it must be None or one entry per sample "
                         f"({n}), each None (scored) or a non-empty reason")
    outcomes = []
    for i, (reward, observation, done, metadata) in enumerate(zip(result.rewards, result.observations, result.done,
                                                                  result.metadata, strict=True)):
        try:
            value = as_reward(reward)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: sample {i} has reward {reward!r}; rewards must be finite numbers") from None
        if not isinstance(observation, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in observation):
            raise ValueError(f"{where}: sample {i} has observation {observation!r}; an observation is a list of "
                             'messages {"role": str, "content": str} ([] when done)')
        if not isinstance(metadata, dict):
            raise ValueError(f"{where}: sample {i} has metadata {metadata!r}; it must be a dict")
        # an invalid sample's episode ends: nothing after it could be scored either
        outcomes.append(EnvOutcome(value, [] if invalid[i] else observation, bool(done) or bool(invalid[i]), metadata,
                                   invalid[i]))
    return outcomes

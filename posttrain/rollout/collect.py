"""A GRPO step's rollout: G responses per prompt from the generation workers, scored (turn by
turn, for multi-turn tasks) by the environment workers, with reward shaping and DAPO's dynamic
sampling applied."""

from __future__ import annotations

import collections
import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from posttrain.algos.advantages import informative_groups, overlong_penalty
from posttrain.cluster import WorkerGroup
from posttrain.config import GRPORunConfig
from posttrain.data.prompts import Prompt, PromptDataset
from posttrain.data.sampler import EpochSampler
from posttrain.envs.base import EnvOutcome
from posttrain.rollout.base import Completion, SamplingParams
from posttrain.rollout.multi_turn import run_episodes


@dataclass
class Group:
    """One prompt and its G sampled responses."""

    prompt: Prompt
    completions: list[Completion]
    outcomes: list[EnvOutcome]
    rewards: torch.Tensor  # [G], after reward shaping
    valid: torch.Tensor  # [G] bool: what enters the baseline and the loss (env.invalid_policy)


@dataclass
class Rollout:
    """What one step trains on: the groups kept, every group sampled (for the metrics), the
    rollout's timings and the prompt sampler's position after it (what a checkpoint records)."""

    groups: list[Group]
    sampled: list[Group]
    timings: dict[str, float]
    sampler_state: dict


class RolloutCollector:
    """Draws each step's prompts from `sampler` and samples and scores them on the worker groups."""

    def __init__(self, cfg: GRPORunConfig, generators: WorkerGroup, envs: WorkerGroup, tokenizer,
                 tools: list | None, prompts: PromptDataset, sampler: EpochSampler):
        self.cfg, self.generators, self.envs = cfg, generators, envs
        self.tokenizer, self.tools, self.prompts, self.sampler = tokenizer, tools, prompts, sampler
        gen = cfg.policy.generation
        self.sampling = SamplingParams(gen.max_new_tokens, gen.temperature, gen.top_p, gen.top_k, gen.stop_strings)

    def collect(self, step: int) -> Rollout:
        """G responses per prompt, scored by the environments. With dynamic sampling (DAPO), groups
        whose rewards are all equal are dropped and more prompts are drawn."""
        grpo = self.cfg.grpo
        timings: dict[str, float] = {}
        groups: list[Group] = []
        sampled: list[Group] = []
        for batch in range(grpo.dynamic_sampling_max_gen_batches if grpo.use_dynamic_sampling else 1):
            # Seeded per step, not left to the generators' running RNG: a run resumed from a
            # checkpoint then samples exactly what the uninterrupted run did.
            params = dataclasses.replace(self.sampling, seed=sampling_seed(grpo.seed, step, batch))
            new = self.sample([self.prompts[i] for i in self.sampler.next_batch()], params,
                              grpo.num_generations_per_prompt, timings)
            sampled += new
            if not grpo.use_dynamic_sampling:
                groups = new
                break
            keep = informative_groups(torch.stack([g.rewards for g in new]), torch.stack([g.valid for g in new]))
            groups += [g for g, k in zip(new, keep.tolist(), strict=True) if k]
            if len(groups) >= grpo.num_prompts_per_step:
                groups = groups[: grpo.num_prompts_per_step]
                break
        return Rollout(groups, sampled, timings, self.sampler.state_dict())

    def sample(self, prompts: list[Prompt], params: SamplingParams, repeats: int,
               timings: dict[str, float]) -> list[Group]:
        """`repeats` episodes per prompt, turn by turn: generate for every unfinished episode, then
        let the environments score and answer. Generation and environment time add into `timings`."""
        completions, outcomes = run_episodes(
            [p for p in prompts for _ in range(repeats)],
            _timed(timings, "time/generation_s", lambda contexts, sampling:
                   self.generators.call_sharded("generate", contexts, sampling)),
            _timed(timings, "time/env_s", lambda items: self.envs.call_sharded("step", items)),
            self.tokenizer, params, self.cfg.grpo.max_rollout_turns, self.cfg.policy.max_total_sequence_length,
            self.tools,
        )
        return [self._group(prompt, completions[i * repeats : (i + 1) * repeats], outcomes[i * repeats : (i + 1) * repeats])
                for i, prompt in enumerate(prompts)]

    def _group(self, prompt: Prompt, completions: list[Completion], outcomes: list[EnvOutcome]) -> Group:
        rewards = torch.tensor([o.reward for o in outcomes], dtype=torch.float32)
        shaping = self.cfg.grpo.reward_shaping
        if shaping.enabled:
            lengths = torch.tensor([c.num_sampled for c in completions])
            rewards = rewards + overlong_penalty(
                lengths, shaping.max_response_length or self.cfg.policy.generation.max_new_tokens,
                shaping.overlong_buffer_length, shaping.overlong_buffer_penalty)
        # env.invalid_policy=error_reward trains invalid samples with the reward the environment gave them
        masked = self.cfg.env.invalid_policy == "mask"
        valid = torch.tensor([not (masked and o.invalid) for o in outcomes])
        return Group(prompt, completions, outcomes, rewards, valid)


def _timed(timings: dict[str, float], key: str, call: Callable) -> Callable:
    """`call`, adding the seconds each call takes into `timings[key]`."""
    def run(*args):
        start = time.perf_counter()
        try:
            return call(*args)
        finally:
            timings[key] = timings.get(key, 0.0) + time.perf_counter() - start
    return run


def sampling_seed(seed: int, step: int, batch: int) -> int:
    """A distinct sampling seed for each generation batch of each step of a run."""
    return int(np.random.SeedSequence([seed, step, batch]).generate_state(1, np.uint64)[0])


def rollout_metrics(groups: list[Group]) -> dict[str, float]:
    """Rewards and accuracy over the samples that enter the loss (NaN when none does); invalid
    samples counted by reason."""
    rewards = [float(r) for g in groups for r, ok in zip(g.rewards, g.valid, strict=True) if ok]
    raw = [o.reward for g in groups for o, ok in zip(g.outcomes, g.valid, strict=True) if ok]
    outcomes = [o for g in groups for o in g.outcomes]
    lengths = [c.num_sampled for g in groups for c in g.completions]
    reasons = collections.Counter(o.invalid for o in outcomes if o.invalid)
    return {
        "reward_mean": statistics.fmean(rewards) if rewards else math.nan,
        "reward_std": statistics.pstdev(rewards) if rewards else math.nan,
        # the verifier's reward is 1 for a correct answer; shaping penalties do not change correctness
        "accuracy": sum(r >= 1.0 for r in raw) / len(raw) if raw else math.nan,
        "invalid_fraction": sum(reasons.values()) / len(outcomes),
        **{f"invalid/{reason}": float(count) for reason, count in sorted(reasons.items())},
        "response_length_mean": statistics.fmean(lengths),
        "response_length_max": max(lengths),
        "truncated_fraction": sum(c.finish_reason == "length" for g in groups for c in g.completions) / len(lengths),
        "reward_errors": sum("reward_error" in o.metadata for g in groups for o in g.outcomes),
        "turns_mean": statistics.fmean(o.metadata["turns"] for g in groups for o in g.outcomes),
    }

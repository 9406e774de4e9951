"""Group Relative Policy Optimization on Ray, top to bottom.

prompts -> generation actors (G samples per prompt) -> environment actors (rewards) -> group
advantages -> policy actor (reference / old log-probs, clipped policy-gradient loss, optimizer
steps) -> weight sync to the generators -> metrics, validation, atomic checkpoints.

With `grpo.async_grpo.enabled` the next step's rollout is collected (in a driver thread: the
actors do the work) while the policy trains on this step's, so each step trains on responses
sampled with the weights of one step before.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import transformers
from rich.console import Console

from posttrain.algos.advantages import group_advantages, informative_groups, overlong_penalty
from posttrain.cluster import WorkerGroup, init_ray, shard
from posttrain.config import GRPORunConfig, save_config, to_dict
from posttrain.data.prompts import Prompt, PromptDataset
from posttrain.data.sampler import EpochSampler
from posttrain.data.sources import load_rows, load_validation_rows
from posttrain.envs.base import EnvOutcome
from posttrain.envs.registry import check_env_config, load_tools
from posttrain.envs.worker import EnvironmentWorker
from posttrain.logging import MetricsLogger, make_progress
from posttrain.rollout.base import Completion, SamplingParams
from posttrain.rollout.multi_turn import run_episodes
from posttrain.rollout.registry import backend_class
from posttrain.train.checkpoint import (
    CheckpointManager,
    check_identity,
    find_resume_checkpoint,
    model_identity,
    read_state,
    resumed_message,
    save_run_checkpoint,
    set_rng_state,
)
from posttrain.train.grpo_worker import GRPOPolicyWorker, Minibatch, Trajectory
from posttrain.train.model import load_tokenizer


@dataclass
class Group:
    """One prompt and its G sampled responses."""

    prompt: Prompt
    completions: list[Completion]
    outcomes: list[EnvOutcome]
    rewards: torch.Tensor  # [G], after reward shaping


@dataclass
class Rollout:
    """What one step trains on: the groups kept, every group sampled (for the metrics), the
    rollout's timings and the prompt sampler's position after it (what a checkpoint records)."""

    groups: list[Group]
    sampled: list[Group]
    timings: dict[str, float]
    sampler_state: dict


@dataclass
class GRPOResult:
    steps: int
    train_rewards: dict[int, float] = field(default_factory=dict)
    val_accuracy: dict[int, float] = field(default_factory=dict)
    final_model_dir: Path | None = None


def run_grpo(cfg: GRPORunConfig, console: Console | None = None, stop_at_step: int | None = None,
             on_step: Callable[[int, dict[str, float]], None] | None = None) -> GRPOResult:
    """Train; `stop_at_step` ends the run early as a preempted job would (used to test resuming).

    `on_step(step, metrics)` is called at the end of every step (benchmarks time steps with it).
    """
    check_env_config(cfg.env)  # every import path the env config names, before Ray starts
    console = console or Console()
    transformers.set_seed(cfg.grpo.seed)
    ckpt = CheckpointManager(cfg.checkpointing)
    resume_dir = find_resume_checkpoint(cfg.checkpointing, ckpt)
    identity = {**model_identity(cfg.policy, cfg.data, cfg.grpo.seed),
                "num_prompts_per_step": cfg.grpo.num_prompts_per_step}
    if resume_dir is not None:
        check_identity(read_state(resume_dir)["identity"], identity, resume_dir)

    # ---- data
    gen = cfg.policy.generation
    tokenizer = load_tokenizer(cfg.policy)
    max_prompt_length = cfg.policy.max_total_sequence_length - gen.max_new_tokens
    tools = load_tools(cfg.env.tools) or None  # functions the model may call, shown through the chat template
    data = cfg.data
    train_prompts = PromptDataset(load_rows(data.dataset_name, data.train_split, subset=data.dataset_config,
                                            arithmetic=data.arithmetic, seed=cfg.grpo.seed),
                                  tokenizer, data, max_prompt_length, tools)
    val_prompts = _validation_prompts(cfg, tokenizer, max_prompt_length, tools)
    sampler = EpochSampler(len(train_prompts), cfg.grpo.num_prompts_per_step, cfg.grpo.seed, data.shuffle)
    total_steps = min(cfg.grpo.max_num_steps, cfg.grpo.max_num_epochs * sampler.batches_per_epoch)
    group_size = cfg.grpo.num_generations_per_prompt
    optimizer_steps_per_rollout = cfg.grpo.num_prompts_per_step * group_size // cfg.policy.train_global_batch_size

    # ---- workers: policy, generation and environments are separate Ray actors
    init_ray(cfg.cluster)
    # One policy worker shares a GPU with the generators (half each). Several policy workers are FSDP2
    # ranks, which NCCL needs on GPUs of their own; then every generation worker gets a GPU too, and a
    # tensor-parallel vLLM engine always gets its own GPUs.
    if cfg.policy.num_workers == 1 and gen.gpus_per_engine == 1:
        policy_gpus, generation_gpus = 0.5, 0.5 / gen.num_workers
    else:
        policy_gpus, generation_gpus = 1.0, float(gen.gpus_per_engine)
    if cfg.cluster.gpus_per_node == 0:
        policy_gpus = generation_gpus = 0.0
    weights = str(resume_dir / "model") if resume_dir else None
    policy = WorkerGroup(GRPOPolicyWorker, cfg.policy.num_workers, name="policy",
                         args=(cfg, total_steps * optimizer_steps_per_rollout), kwargs={"weights_path": weights},
                         num_gpus_per_worker=policy_gpus)
    # Several policy workers are one FSDP2 group, meeting at an address on rank 0's node.
    policy.call_all("setup", policy.call_rank(0, "rendezvous_address") if policy.num_workers > 1 else None)
    generators = WorkerGroup(backend_class(gen.backend), gen.num_workers, name="generation", args=(cfg.policy,),
                             kwargs={"weights_path": weights}, num_gpus_per_worker=generation_gpus)
    envs = WorkerGroup(EnvironmentWorker, cfg.env.num_workers, name="environment", args=(cfg.env,),
                       num_cpus_per_worker=0.5)

    step = 0
    if resume_dir is not None:
        state = read_state(resume_dir)
        policy.call_all("load_training_state", str(resume_dir))
        sampler.load_state_dict(state["sampler"])
        set_rng_state(torch.load(resume_dir / "rng.pt", weights_only=False))
        step = state["step"]
        console.print(resumed_message(resume_dir, step, total_steps))

    save_config(cfg, Path(cfg.logger.log_dir) / "config.yaml")
    console.print(f"GRPO: {cfg.policy.model_name}; {len(train_prompts)} training prompts, {len(val_prompts)} "
                  f"validation prompts; {total_steps} steps of {cfg.grpo.num_prompts_per_step} prompts x "
                  f"{group_size} generations, {optimizer_steps_per_rollout} optimizer step(s) per rollout")

    sampling = SamplingParams(gen.max_new_tokens, gen.temperature, gen.top_p, gen.top_k, gen.stop_strings)

    def rollout(prompts: list[Prompt], params: SamplingParams, repeats: int, timings: dict) -> list[Group]:
        def timed(key: str, call: Callable) -> Callable:
            def run(*args):
                start = time.perf_counter()
                out = call(*args)
                timings[key] = timings.get(key, 0.0) + time.perf_counter() - start
                return out
            return run

        # Turn by turn: generate for every unfinished episode, then let the environments score and answer.
        completions, outcomes = run_episodes(
            [p for p in prompts for _ in range(repeats)],
            timed("time/generation_s", lambda contexts, sampling: generators.call_sharded("generate", contexts, sampling)),
            timed("time/env_s", lambda items: envs.call_sharded("step", items)),
            tokenizer, params, cfg.grpo.max_rollout_turns, cfg.policy.max_total_sequence_length, tools,
        )
        groups = []
        for i, prompt in enumerate(prompts):
            comps = completions[i * repeats : (i + 1) * repeats]
            outs = outcomes[i * repeats : (i + 1) * repeats]
            rewards = torch.tensor([o.reward for o in outs], dtype=torch.float32)
            shaping = cfg.grpo.reward_shaping
            if shaping.enabled:
                lengths = torch.tensor([c.num_sampled for c in comps])
                rewards = rewards + overlong_penalty(lengths, shaping.max_response_length or gen.max_new_tokens,
                                                     shaping.overlong_buffer_length, shaping.overlong_buffer_penalty)
            groups.append(Group(prompt, comps, outs, rewards))
        return groups

    def collect(step: int) -> Rollout:
        """G responses per prompt, scored by the environments. With dynamic sampling (DAPO), groups
        whose rewards are all equal are dropped and more prompts are drawn."""
        timings: dict[str, float] = {}
        groups: list[Group] = []
        sampled: list[Group] = []
        for batch in range(cfg.grpo.dynamic_sampling_max_gen_batches if cfg.grpo.use_dynamic_sampling else 1):
            # Seeded per step, not left to the generators' running RNG: a run resumed from a
            # checkpoint then samples exactly what the uninterrupted run did.
            params = dataclasses.replace(sampling, seed=_sampling_seed(cfg.grpo.seed, step, batch))
            new = rollout([train_prompts[i] for i in sampler.next_batch()], params, group_size, timings)
            sampled += new
            if not cfg.grpo.use_dynamic_sampling:
                groups = new
                break
            keep = informative_groups(torch.stack([g.rewards for g in new]))
            groups += [g for g, k in zip(new, keep.tolist(), strict=True) if k]
            if len(groups) >= cfg.grpo.num_prompts_per_step:
                groups = groups[: cfg.grpo.num_prompts_per_step]
                break
        return Rollout(groups, sampled, timings, sampler.state_dict())

    def validate() -> dict[str, float]:
        params = SamplingParams(gen.max_new_tokens, cfg.grpo.val_temperature, gen.top_p, gen.top_k, gen.stop_strings)
        groups = rollout(val_prompts, params, 1, {})
        return {f"val/{k}": v for k, v in _rollout_metrics(groups).items()}

    def another_step_follows(step: int) -> bool:
        return step < total_steps and (stop_at_step is None or step < stop_at_step)

    result = GRPOResult(steps=step)
    # Async: one rollout collected ahead. The first step (also after a resume) collects its own.
    prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout") if cfg.grpo.async_grpo.enabled else None
    ahead: Future | None = None
    try:
        with MetricsLogger(cfg.logger, to_dict(cfg), console=console,
                           resumed_at=step if resume_dir else None) as logger, make_progress(console) as progress:
            if val_prompts and cfg.grpo.val_at_start and step == 0:
                metrics = validate()
                result.val_accuracy[0] = metrics["val/accuracy"]
                logger.log(metrics, step=0)
            task = progress.add_task("GRPO", total=total_steps, completed=step, info="")
            while another_step_follows(step):
                step += 1
                step_start = time.perf_counter()

                # 1. rollout (async: collected during the previous step, then the next one is started,
                #    with the weights the generators hold now, i.e. before this step's update)
                current = ahead.result() if ahead is not None else collect(step)
                ahead = None
                if prefetch is not None and another_step_follows(step):
                    ahead = prefetch.submit(collect, step + 1)
                groups, sampled, timings = current.groups, current.sampled, current.timings
                metrics = {f"rollout/{k}": v for k, v in _rollout_metrics(sampled).items()}
                if cfg.grpo.use_dynamic_sampling:
                    metrics["rollout/dynamic_sampling_batches"] = len(sampled) // cfg.grpo.num_prompts_per_step
                    metrics["rollout/kept_groups"] = len(groups)
                result.train_rewards[step] = metrics["rollout/reward_mean"]

                # 2. advantages: each response against its own group
                if groups:
                    advantages = group_advantages(
                        torch.stack([g.rewards for g in groups]),
                        "leave_one_out" if cfg.grpo.use_leave_one_out_baseline else "mean",
                        normalize_std=cfg.grpo.normalize_rewards,
                    )
                    trajectories = [
                        Trajectory(g.prompt.token_ids, c.token_ids, c.logprobs, float(advantages[i, j]), c.mask)
                        for i, g in enumerate(groups) for j, c in enumerate(g.completions)
                    ]

                    # 3. policy update: one optimizer step per train_global_batch_size trajectories
                    minibatch_size = cfg.policy.train_global_batch_size
                    chunks = [trajectories[i : i + minibatch_size] for i in range(0, len(trajectories), minibatch_size)]
                    per_rank = [[] for _ in range(policy.num_workers)]
                    for chunk in chunks:
                        tokens = float(sum(t.num_trained for t in chunk))
                        for rank, part in enumerate(shard(chunk, policy.num_workers)):
                            per_rank[rank].append(Minibatch(part, tokens, float(len(chunk))))
                    metrics.update(policy.call_each("train", [(mbs,) for mbs in per_rank])[0])
                else:
                    console.print(f"step {step}: no group had differing rewards; skipped the update")
                if ahead is not None:  # the next rollout ends with the weights it began with (and before validation)
                    start = time.perf_counter()
                    ahead.exception()
                    timings["time/rollout_wait_s"] = time.perf_counter() - start
                if groups:
                    # 4. weight sync: the object store carries the state dict; the driver never copies it
                    start = time.perf_counter()
                    generators.call_all("update_weights", policy.call_all_async("state_dict")[0])
                    timings["time/weight_sync_s"] = time.perf_counter() - start

                # 5. validation, logs, checkpoint
                if val_prompts and ((cfg.grpo.val_period and step % cfg.grpo.val_period == 0) or step == total_steps):
                    metrics.update(validate())
                    result.val_accuracy[step] = metrics["val/accuracy"]
                timings["time/step_s"] = time.perf_counter() - step_start
                metrics.update(timings)
                logger.log(metrics, step=step)
                if cfg.checkpointing.enabled and (step % cfg.checkpointing.save_period == 0 or step == total_steps):
                    # The sampler's position after this step's rollout: a collected-ahead one is redrawn on resume.
                    save_run_checkpoint(ckpt, step, lambda d: policy.call_all("save", str(d)), current.sampler_state,
                                        identity, metrics)
                progress.update(task, advance=1, info=f"reward {metrics['rollout/reward_mean']:.3f}")
                if on_step is not None:
                    on_step(step, metrics)

        result.steps = step
        if step == total_steps:
            final = Path(cfg.checkpointing.checkpoint_dir) / "final_model"
            result.final_model_dir = Path(policy.call_all("export_hf", str(final))[0])  # a gather: every rank
            console.print(f"Exported the final model to {result.final_model_dir}")
    finally:
        if prefetch is not None:
            prefetch.shutdown(cancel_futures=True)
        for group in (policy, generators, envs):
            group.shutdown()
    return result


def _sampling_seed(seed: int, step: int, batch: int) -> int:
    """A distinct sampling seed for each generation batch of each step of a run."""
    return int(np.random.SeedSequence([seed, step, batch]).generate_state(1, np.uint64)[0])


def _rollout_metrics(groups: list[Group]) -> dict[str, float]:
    rewards = [float(r) for g in groups for r in g.rewards]
    raw = [o.reward for g in groups for o in g.outcomes]
    lengths = [c.num_sampled for g in groups for c in g.completions]
    return {
        "reward_mean": statistics.fmean(rewards),
        "reward_std": statistics.pstdev(rewards),
        # the verifier's reward is 1 for a correct answer; shaping penalties do not change correctness
        "accuracy": sum(r >= 1.0 for r in raw) / len(raw),
        "response_length_mean": statistics.fmean(lengths),
        "response_length_max": max(lengths),
        "truncated_fraction": sum(c.finish_reason == "length" for g in groups for c in g.completions) / len(lengths),
        "reward_errors": sum("reward_error" in o.metadata for g in groups for o in g.outcomes),
        "turns_mean": statistics.fmean(o.metadata["turns"] for g in groups for o in g.outcomes),
    }


def _validation_prompts(cfg: GRPORunConfig, tokenizer, max_prompt_length: int, tools: list | None) -> list[Prompt]:
    rows = load_validation_rows(cfg.data, seed=cfg.grpo.seed)
    if rows is None:
        return []
    dataset = PromptDataset(rows, tokenizer, cfg.data, max_prompt_length, tools)
    return [dataset[i] for i in range(min(len(dataset), cfg.grpo.max_val_samples))]


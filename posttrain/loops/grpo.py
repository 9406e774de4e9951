"""Group Relative Policy Optimization on Ray, top to bottom.

Set-up: prompts, then the workers (policy ranks, generation and environment actors). Each step:
1. rollout: G responses per prompt from the generation actors, scored by the environment actors;
2. advantages: each response's reward against its own group's;
3. log-probs: the frozen reference's (KL penalty) and, when the rollout feeds several optimizer
   steps, the pre-update policy's (the importance ratio's denominator);
4. train: clipped policy-gradient optimizer steps through the same Policy API as SFT and DPO;
5. weight sync to the generators, then validation, metrics and an atomic checkpoint.

With `grpo.async_grpo.enabled` the rollout source collects the next step's rollout while the
policy trains on this one's, so each step trains on responses sampled one update earlier.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from rich.console import Console

from posttrain.algos.advantages import group_advantages
from posttrain.algos.grpo import GRPOObjective
from posttrain.cluster import SharedBundles, WorkerGroup, alive_nodes, cluster_name, init_ray
from posttrain.cluster.plan import ResourcePlan, RolePlan, check_engine_memory
from posttrain.config import EnvConfig, GRPORunConfig, PolicyConfig, save_config, to_dict
from posttrain.data.prompts import Prompt, PromptDataset
from posttrain.data.sampler import EpochSampler, plan_steps
from posttrain.data.sources import load_rows, load_validation_rows
from posttrain.data.trajectories import Trajectory, collate_trajectories, packing_cost_ratio
from posttrain.envs.base import InvalidRolloutsError
from posttrain.envs.registry import check_env_config, load_tools, services_of
from posttrain.envs.reward_model_env import RewardModelScorer
from posttrain.envs.worker import EnvironmentWorker
from posttrain.logging import MetricsLogger, make_progress
from posttrain.logging.throughput import Throughput
from posttrain.rollout.chat_model import ChatModel
from posttrain.rollout.collect import Group, Rollout, RolloutCollector, rollout_metrics
from posttrain.rollout.colocation import Colocation
from posttrain.rollout.registry import backend_class
from posttrain.rollout.sources import make_rollout_source
from posttrain.rollout.weight_sync import WeightSync
from posttrain.train.checkpoint import (
    CheckpointManager,
    check_identity,
    find_resume_checkpoint,
    model_identity,
    read_state,
    resume_training,
    save_run_checkpoint,
)
from posttrain.train.logprobs import response_logprobs
from posttrain.train.model import load_tokenizer
from posttrain.train.policy import add_metrics
from posttrain.train.policy_group import PolicyGroup

# Each optimizer step's micro-batches and its objective (normalised by that step's token count).
OptimizerStep = tuple[list[dict[str, torch.Tensor]], GRPOObjective]


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
    cfg.check()  # a config built in Python is checked as a loaded one is
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
    tools = load_tools(cfg.env.tools) or None  # functions the model may call, shown through the chat template
    train_prompts, val_prompts = _prompts(cfg, tokenizer, tools)
    sampler = EpochSampler(len(train_prompts), cfg.grpo.num_prompts_per_step, cfg.grpo.seed, cfg.data.shuffle)
    total_steps, steps_note = plan_steps(sampler, cfg.grpo.max_num_steps, cfg.grpo.max_num_epochs, "grpo")
    group_size = cfg.grpo.num_generations_per_prompt
    optimizer_steps_per_rollout = cfg.grpo.num_prompts_per_step * group_size // cfg.policy.train_global_batch_size

    # ---- workers: policy ranks, generation and environments are separate Ray actors
    plan = _resource_plan(cfg)
    init_ray(cfg.cluster, num_cpus=math.ceil(plan.cpus))
    plan.check_fits(alive_nodes(), cluster_name(cfg.cluster))
    shared = None
    # Whatever is started is stopped again, however the run ends (set-up failing half way included).
    with contextlib.ExitStack() as stop:
        # Colocated: one bundle per policy rank, holding it and the generation workers beside it.
        if gen.colocated.enabled:
            shared = SharedBundles(plan.shared_bundles, name="colocated", strategy=plan.role("policy").strategy)
            stop.callback(shared.remove)
        weights = str(resume_dir / "model") if resume_dir else None
        policy = PolicyGroup(cfg.policy, cfg.cluster, total_steps * optimizer_steps_per_rollout, seed=cfg.grpo.seed,
                             weights_path=weights, with_reference=cfg.loss_fn.reference_policy_kl_penalty > 0,
                             placement=plan.placement("policy", shared))
        stop.callback(policy.close)
        restarts = cfg.cluster.max_worker_restarts
        generators = WorkerGroup(backend_class(gen.backend), gen.num_workers, name="generation", args=(cfg.policy,),
                                 kwargs={"weights_path": weights}, max_restarts=restarts,
                                 **plan.placement("generation", shared))
        stop.callback(generators.shutdown)
        services = _start_services(cfg, plan, restarts, stop)
        envs = WorkerGroup(EnvironmentWorker, cfg.env.num_workers, name="environment", args=(cfg.env,),
                           kwargs={"services": {name: group.clients() for name, group in services.items()}},
                           max_restarts=restarts, runtime_env=cfg.env.runtime_env,
                           **plan.placement("environment", shared))
        stop.callback(envs.shutdown)
        plan.placements = {"policy": policy.workers.placements(), "generation": generators.placements(),
                           "environment": envs.placements()} | {name: g.placements() for name, g in services.items()}
        throughput = Throughput(policy.model_config, policy.device_name, cfg.policy.num_workers)
        weight_sync = WeightSync(policy, generators, gen.transport, gen.refit_bucket_mb,
                                 colocated_ranks=plan.role("generation").bundles)
        turns = Colocation(policy, generators, gen.colocated.enabled)
        collector = RolloutCollector(cfg, generators, envs, tokenizer, tools, train_prompts, sampler)
        rollouts = make_rollout_source(collector, cfg.grpo.async_grpo.enabled)
        stop.callback(rollouts.close)
        # The trainer scores tokens at the sampling temperature, as the generators do.
        objective = GRPOObjective.from_config(
            cfg.loss_fn, functools.partial(response_logprobs, temperature=gen.temperature, entropy=True),
            max_response_length=min(gen.max_new_tokens * cfg.grpo.max_rollout_turns, cfg.policy.max_total_sequence_length))
        step = resume_training(resume_dir, policy, sampler, total_steps, console)

        save_config(cfg, Path(cfg.logger.log_dir) / "config.yaml")
        (Path(cfg.logger.log_dir) / "resource_plan.json").write_text(json.dumps(plan.to_dict(), indent=2))
        console.print(f"GRPO: {cfg.policy.model_name}; {len(train_prompts)} training prompts, {len(val_prompts)} "
                      f"validation prompts; {total_steps} steps{steps_note} of {cfg.grpo.num_prompts_per_step} prompts "
                      f"x {group_size} generations, {optimizer_steps_per_rollout} optimizer step(s) per rollout\n"
                      f"{plan.describe()}")

        def another_step_follows(step: int) -> bool:
            return step < total_steps and (stop_at_step is None or step < stop_at_step)

        result = GRPOResult(steps=step)
        invalid_steps = 0  # steps in a row with more than env.max_invalid_fraction of the samples invalid
        with MetricsLogger(cfg.logger, to_dict(cfg), console=console,
                           resumed_at=step if resume_dir else None) as logger, make_progress(console) as progress:
            if val_prompts and cfg.grpo.val_at_start and step == 0:
                metrics = _validate(collector, val_prompts, cfg)
                result.val_accuracy[0] = metrics["val/accuracy"]
                logger.log(metrics, step=0)
            task = progress.add_task("GRPO", total=total_steps, completed=step, info="")
            while another_step_follows(step):
                step += 1
                step_start = time.perf_counter()
                # 1. rollout
                rollout = rollouts.next(step, another_follows=another_step_follows(step))
                timings = rollout.timings
                metrics = _rollout_step_metrics(rollout, cfg, generators, envs)
                result.train_rewards[step] = metrics["rollout/reward_mean"]
                invalid_steps = _count_invalid_steps(invalid_steps, rollout, metrics, cfg.env)
                # 2. advantages
                trajectories = _trajectories(rollout.groups, cfg) if rollout.groups else []
                if trajectories:
                    timings.update(turns.prepare_for_training())
                    # 3. log-probs of the weights before this rollout's updates
                    steps = _optimizer_steps(trajectories, policy, cfg.policy, tokenizer.pad_token_id, objective)
                    _score_before_update(policy, steps, gen.temperature, timings)
                    # 4. train
                    metrics.update(_train(policy, steps, timings))
                    metrics.update(throughput([len(t.prompt_ids) + len(t.response_ids) for t in trajectories],
                                              timings["time/training_s"]))
                else:
                    console.print(f"step {step}: no group had differing rewards among valid samples; skipped the update")
                rollouts.settle(timings)  # async: the rollout in flight ends with the weights it began with
                # 5. weight sync, validation, logs, checkpoint
                if trajectories:
                    timings.update(turns.prepare_for_generation())
                    timings.update(weight_sync.sync())
                if val_prompts and ((cfg.grpo.val_period and step % cfg.grpo.val_period == 0) or step == total_steps):
                    metrics.update(_validate(collector, val_prompts, cfg))
                    result.val_accuracy[step] = metrics["val/accuracy"]
                timings["time/step_s"] = time.perf_counter() - step_start
                metrics.update(timings)
                logger.log(metrics, step=step)
                if cfg.checkpointing.enabled and (step % cfg.checkpointing.save_period == 0 or step == total_steps):
                    # The sampler's position after this step's rollout: a collected-ahead one is redrawn on resume.
                    save_run_checkpoint(ckpt, step, policy.save, rollout.sampler_state, identity, metrics)
                invalid = metrics["rollout/invalid_fraction"]
                progress.update(task, advance=1, info=f"reward {metrics['rollout/reward_mean']:.3f}"
                                + (f", {invalid:.0%} invalid" if invalid else ""))
                if on_step is not None:
                    on_step(step, metrics)

        result.steps = step
        if step == total_steps:
            result.final_model_dir = policy.export_hf(Path(cfg.checkpointing.checkpoint_dir) / "final_model")
            console.print(f"Exported the final model to {result.final_model_dir}")
    return result


def _prompts(cfg: GRPORunConfig, tokenizer, tools: list | None) -> tuple[PromptDataset, list[Prompt]]:
    """The training prompts, and up to `grpo.max_val_samples` validation prompts."""
    data = cfg.data
    max_prompt_length = cfg.policy.max_total_sequence_length - cfg.policy.generation.max_new_tokens
    rows = load_rows(data.dataset_name, data.train_split, subset=data.dataset_config, arithmetic=data.arithmetic,
                     seed=cfg.grpo.seed)
    train = PromptDataset(rows, tokenizer, data, max_prompt_length, tools)
    val_rows = load_validation_rows(data, seed=cfg.grpo.seed)
    if val_rows is None:
        return train, []
    val = PromptDataset(val_rows, tokenizer, data, max_prompt_length, tools)
    return train, [val[i] for i in range(min(len(val), cfg.grpo.max_val_samples))]


def _resource_plan(cfg: GRPORunConfig) -> ResourcePlan:
    """What each role asks Ray for, and where. Colocated: generation worker j shares policy rank
    j % policy.num_workers's bundle (its node, and its GPU half and half: the two take turns).
    Dedicated: a GPU per policy rank, `tensor_parallel_size` per engine; with
    `colocated.resources` set, each role packed onto nodes of its own (the config check made sure
    the counts split). vLLM engines sharing a GPU are checked to fit it."""
    gen, cluster = cfg.policy.generation, cfg.cluster
    ranks, engines, on_gpus = cfg.policy.num_workers, gen.num_workers, cluster.gpus_per_node > 0
    # Over several nodes, each role's workers go across them (the policy's ranks gather per layer
    # over the network either way; generators spread out leave each node's CPUs to its environment).
    spread = "SPREAD" if cluster.num_nodes > 1 else "PACK"
    if gen.colocated.enabled:
        per_gpu = math.ceil(engines / ranks)
        if gen.backend == "vllm" and on_gpus:
            check_engine_memory(per_gpu, gen.vllm.gpu_memory_utilization, beside_trainer=True)
        policy_gpus, generation_gpus = (0.5, 0.5 / per_gpu) if on_gpus else (0.0, 0.0)
        policy_bundles, generation_bundles = list(range(ranks)), [j % ranks for j in range(engines)]
    else:
        if gen.backend == "vllm" and on_gpus:
            check_engine_memory(1, gen.vllm.gpu_memory_utilization, beside_trainer=False)
        policy_gpus, generation_gpus = (1.0, float(gen.gpus_per_engine)) if on_gpus else (0.0, 0.0)
        policy_bundles = generation_bundles = None
        if gen.colocated.resources.gpus_per_node is not None:
            spread = "PACK"  # each role on as few nodes as it fills: the generators' nodes apart from the policy's
    roles = [
        RolePlan("policy", ranks, 1.0, policy_gpus, "policy.num_workers", spread, policy_bundles),
        RolePlan("generation", engines, 1.0, generation_gpus, "policy.generation.num_workers", spread,
                 generation_bundles),
        RolePlan("environment", cfg.env.num_workers, 0.5, 0.0, "env.num_workers", spread)]
    # The models the environments use: one copy per worker, shared by the environment actors.
    needed = services_of(cfg.env)
    if "reward_model" in needed:
        roles.append(RolePlan("reward_model", cfg.env.reward_model_workers, 1.0,
                              cfg.env.reward_model_gpus if on_gpus else 0.0, "env.reward_model_workers", spread))
    if "judge" in needed:
        roles.append(RolePlan("judge", cfg.env.judge.workers, 1.0, cfg.env.judge.gpus if on_gpus else 0.0,
                              "env.judge.workers", spread))
    return ResourcePlan(roles)


def _start_services(cfg: GRPORunConfig, plan: ResourcePlan, restarts: int,
                    stop: contextlib.ExitStack) -> dict[str, WorkerGroup]:
    """The models the environments use (a reward model, a judge), each in workers of its own, by
    service name; stopped with the run."""
    groups, needed = {}, services_of(cfg.env)
    if "reward_model" in needed:
        groups["reward_model"] = WorkerGroup(
            RewardModelScorer, cfg.env.reward_model_workers, name="reward_model", max_restarts=restarts,
            args=(cfg.env.reward_model_path, cfg.policy.precision, cfg.env.reward_model_batch_size),
            **plan.placement("reward_model"))
        stop.callback(groups["reward_model"].shutdown)
    if "judge" in needed:
        groups["judge"] = WorkerGroup(ChatModel, cfg.env.judge.workers, name="judge", max_restarts=restarts,
                                      args=(cfg.env.judge, cfg.policy.precision), **plan.placement("judge"))
        stop.callback(groups["judge"].shutdown)
    return groups


def _rollout_step_metrics(rollout: Rollout, cfg: GRPORunConfig, generators: WorkerGroup,
                          envs: WorkerGroup) -> dict[str, float]:
    metrics = {f"rollout/{k}": v for k, v in rollout_metrics(rollout.sampled).items()}
    # Workers restarted after their process died, since the start (each time, its batch was retried).
    metrics["faults/generation_restarts"] = float(generators.restarts)
    metrics["faults/environment_restarts"] = float(envs.restarts)
    if cfg.grpo.use_dynamic_sampling:
        metrics["rollout/dynamic_sampling_batches"] = len(rollout.sampled) // cfg.grpo.num_prompts_per_step
        metrics["rollout/kept_groups"] = len(rollout.groups)
    return metrics


def _trajectories(groups: list[Group], cfg: GRPORunConfig) -> list[Trajectory]:
    """Every valid response with its advantage over its own group's valid rewards (an invalid one
    enters neither the baseline nor the loss)."""
    valid = torch.stack([g.valid for g in groups])
    advantages = group_advantages(torch.stack([g.rewards for g in groups]),
                                  "leave_one_out" if cfg.grpo.use_leave_one_out_baseline else "mean",
                                  normalize_std=cfg.grpo.normalize_rewards, valid=valid)
    return [Trajectory(g.prompt.token_ids, c.token_ids, c.logprobs, float(advantages[i, j]), c.mask)
            for i, g in enumerate(groups) for j, c in enumerate(g.completions) if valid[i, j]]


def _count_invalid_steps(steps_so_far: int, rollout: Rollout, metrics: dict[str, float], env: EnvConfig) -> int:
    """Steps in a row with more than `env.max_invalid_fraction` of the samples invalid, this one
    included; the run stops when they reach `env.max_invalid_steps`."""
    fraction = metrics["rollout/invalid_fraction"]
    if fraction <= env.max_invalid_fraction:
        return 0
    if steps_so_far + 1 < env.max_invalid_steps:
        return steps_so_far + 1
    reasons = ", ".join(f"{key.removeprefix('rollout/invalid/')}: {int(count)}" for key, count in metrics.items()
                        if key.startswith("rollout/invalid/"))
    errors = [o.metadata["reward_error"] for g in rollout.sampled for o in g.outcomes if "reward_error" in o.metadata]
    raise InvalidRolloutsError(
        f"{fraction:.0%} of this step's samples could not be scored ({reasons}), more than "
        f"env.max_invalid_fraction ({env.max_invalid_fraction:g}) for {env.max_invalid_steps} steps in a row: the "
        "reward function or environment is failing, not the model"
        + (f" (first error: {errors[0]})" if errors else "") + "; fix it, or raise env.max_invalid_fraction")


def _optimizer_steps(trajectories: list[Trajectory], policy: PolicyGroup, cfg: PolicyConfig, pad_token_id: int,
                     objective: GRPOObjective) -> list[OptimizerStep]:
    """One optimizer step per `policy.train_global_batch_size` trajectories, each cut into
    micro-batches of `policy.train_micro_batch_size` in arrival order (a group's responses stay
    together and share their prompt where the attention implementation allows it)."""
    cost_ratio = packing_cost_ratio(policy.model_config)
    steps = []
    for start in range(0, len(trajectories), cfg.train_global_batch_size):
        chunk = trajectories[start : start + cfg.train_global_batch_size]
        micro_batches = [collate_trajectories(chunk[i : i + cfg.train_micro_batch_size], pad_token_id,
                                              policy.supports_shared_prefix, cost_ratio)
                         for i in range(0, len(chunk), cfg.train_micro_batch_size)]
        steps.append((micro_batches, objective.for_step(float(sum(t.num_trained for t in chunk)), float(len(chunk)))))
    return steps


def _logprobs(temperature: float, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return response_logprobs(model, batch, temperature)[0]


def _score_before_update(policy: PolicyGroup, steps: list[OptimizerStep], temperature: float,
                         timings: dict[str, float]) -> None:
    """Adds to each micro-batch the log-probs that must come from the weights before any update of
    this rollout: the reference's, for the KL penalty, and, when the rollout feeds several optimizer
    steps, the current policy's (with one step the ratio is 1 and the objective needs none)."""
    start = time.perf_counter()
    batches = [batch for micro_batches, _ in steps for batch in micro_batches]
    score = functools.partial(_logprobs, temperature)
    if policy.with_reference:
        for batch, logprobs in zip(batches, policy.reference_outputs(batches, score), strict=True):
            batch["ref_logprobs"] = logprobs
    if len(steps) > 1:
        for batch, logprobs in zip(batches, policy.policy_outputs(batches, score), strict=True):
            batch["old_logprobs"] = logprobs
    timings["time/logprobs_s"] = time.perf_counter() - start


def _train(policy: PolicyGroup, steps: list[OptimizerStep], timings: dict[str, float]) -> dict[str, float]:
    """The optimizer steps, and their metrics: per-token means over every trained token of the rollout."""
    start = time.perf_counter()
    outs = [policy.train_step(micro_batches, objective) for micro_batches, objective in steps]
    timings["time/training_s"] = time.perf_counter() - start
    sums: dict[str, float] = {}
    for out in outs:
        add_metrics(sums, out["metrics"])
    tokens = max(sums["tokens"], 1.0)
    return {
        "train/loss": statistics.fmean(out["loss"] for out in outs),
        "train/grad_norm": statistics.fmean(out["grad_norm"] for out in outs),
        "train/lr": outs[-1]["lr"],
        "train/optimizer_steps": len(steps),
        "train/clip_fraction": sums["clipped_tokens"] / tokens,
        "train/ratio_mean": sums["ratio_sum"] / tokens,
        "train/kl": sums.get("kl_sum", 0.0) / tokens,
        "train/entropy": sums["entropy_sum"] / tokens,
        "train/gen_logprob_mismatch": sums["mismatch_sum"] / tokens,
        "train/gen_logprob_mismatch_max": sums["mismatch_max"],
        "train/importance_weight_mean": sums["importance_weight_sum"] / tokens,
    }


def _validate(collector: RolloutCollector, val_prompts: list[Prompt], cfg: GRPORunConfig) -> dict[str, float]:
    """One response per validation prompt, sampled as in training but at `grpo.val_temperature`."""
    params = dataclasses.replace(collector.sampling, temperature=cfg.grpo.val_temperature)
    groups = collector.sample(val_prompts, params, 1, {})
    return {f"val/{k}": v for k, v in rollout_metrics(groups).items()}

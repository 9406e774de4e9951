"""Reward-model training, top to bottom.

preference pairs -> micro-batches of [chosen; rejected] rows -> one scalar score per row (a
sequence-classification head on the policy backbone) -> Bradley-Terry loss -> optimizer step ->
validation -> logs -> atomic checkpoint; resumes exactly from the latest checkpoint. The final
model is exported in Hugging Face format, loadable with AutoModelForSequenceClassification and by
the `reward_model` environment of GRPO.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from rich.console import Console

from posttrain.algos.rm import rm_objective
from posttrain.config import RMRunConfig, save_config, to_dict
from posttrain.data.preference import (
    PreferenceDataset,
    PreferencePair,
    load_validation_pairs,
    make_pair_micro_batches,
    pair_lengths,
    pair_step_metrics,
)
from posttrain.data.sampler import EpochSampler, plan_steps
from posttrain.data.sources import load_rows
from posttrain.logging import MetricsLogger, make_progress
from posttrain.logging.throughput import Throughput
from posttrain.train.checkpoint import (
    CheckpointManager,
    check_identity,
    find_resume_checkpoint,
    read_state,
    resume_training,
    run_identity,
    save_run_checkpoint,
)
from posttrain.train.model import load_tokenizer
from posttrain.train.policy import describe_parameters
from posttrain.train.policy_group import make_policy
from posttrain.train.reward_model import has_reward_head, load_reward_model, sequence_scores

METRICS = ("loss", "accuracy", "margin", "rewards_chosen", "rewards_rejected")


@dataclass
class RMResult:
    steps: int
    train_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    val_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    final_model_dir: Path | None = None


def run_rm(cfg: RMRunConfig, console: Console | None = None, stop_at_step: int | None = None) -> RMResult:
    """Train; `stop_at_step` ends the run early as a preempted job would (used to test resuming)."""
    cfg.check()  # a config built in Python is checked as a loaded one is
    console = console or Console()
    transformers.set_seed(cfg.rm.seed)
    ckpt = CheckpointManager(cfg.checkpointing)
    resume_dir = find_resume_checkpoint(cfg.checkpointing, ckpt)
    identity = run_identity(cfg.policy, cfg.data, cfg.rm.seed)
    if resume_dir is not None:  # before anything is loaded from it
        check_identity(read_state(resume_dir)["identity"], identity, resume_dir)

    # ---- data
    tokenizer = load_tokenizer(cfg.policy)
    max_len = cfg.policy.max_total_sequence_length
    data = cfg.data
    train_rows = load_rows(data.dataset_name, data.train_split, subset=data.dataset_config,
                           arithmetic=data.arithmetic, seed=cfg.rm.seed)
    train_set = PreferenceDataset(train_rows, tokenizer, data, max_len)
    val_pairs = load_validation_pairs(data, tokenizer, max_len, cfg.rm.seed)
    sampler = EpochSampler(len(train_set), cfg.policy.train_global_batch_size, cfg.rm.seed, data.shuffle)
    total_steps, steps_note = plan_steps(sampler, cfg.rm.max_num_steps, cfg.rm.max_num_epochs, "rm")

    # ---- model, optimizer, resume
    loader = functools.partial(load_reward_model, pad_token_id=tokenizer.pad_token_id)
    # One local Policy, or policy.num_workers FSDP2 ranks on Ray behind the same calls.
    policy = make_policy(cfg.policy, cfg.cluster, total_steps, seed=cfg.rm.seed, tokenizer=tokenizer,
                         model_loader=loader, weights_path=resume_dir / "model" if resume_dir else None)
    throughput = Throughput(policy.model_config, policy.device_name, cfg.policy.num_workers)
    step = resume_training(resume_dir, policy, sampler, total_steps, console)
    if resume_dir is None and not has_reward_head(cfg.policy.model_name, cfg.policy.trust_remote_code):
        console.print(f"Reward head: {cfg.policy.model_name} is not a sequence-classification model; "
                      "its backbone is kept and the scalar `score` head is newly initialised")

    log_dir = Path(cfg.logger.log_dir)
    save_config(cfg, log_dir / "config.yaml")
    console.print(f"RM: {cfg.policy.model_name} ({describe_parameters(policy)}) on "
                  f"{policy.device}; {len(train_set)} training pairs, {len(val_pairs)} validation pairs, "
                  f"{total_steps} steps of {cfg.policy.train_global_batch_size} pairs{steps_note}")

    def micro_batches(pairs: list[PreferencePair], size: int, training: bool) -> list[dict[str, torch.Tensor]]:
        # The loss mask is not needed: a reward model scores whole sequences.
        budget = cfg.policy.token_budget(size, rows_per_item=2, training=training)
        return [{k: v for k, v in batch.items() if k != "loss_mask"}
                for batch in make_pair_micro_batches(pairs, size, tokenizer.pad_token_id, budget)]

    def objective_of(num_pairs: int):
        return lambda model, batch: rm_objective(sequence_scores(model, batch), num_pairs)

    if cfg.rm.val_batches:
        val_pairs = val_pairs[: cfg.rm.val_batches * cfg.rm.val_global_batch_size]
    val_batches = micro_batches(val_pairs, cfg.rm.val_micro_batch_size, training=False) if val_pairs else []

    def validate() -> dict[str, float]:
        out = policy.evaluate(val_batches, objective_of(len(val_pairs)))
        totals = {"loss": out["loss"], **out["metrics"]}
        return {f"val/{name}": totals[name] for name in METRICS}

    result = RMResult(steps=step)
    with MetricsLogger(cfg.logger, to_dict(cfg), console=console, resumed_at=step if resume_dir else None) as logger, \
            make_progress(console) as progress, contextlib.closing(policy):
        if val_pairs and cfg.rm.val_at_start and step == 0:
            result.val_metrics[0] = validate()
            logger.log(result.val_metrics[0], step=0)
        task = progress.add_task("RM", total=total_steps, completed=step, info="")
        while step < total_steps and (stop_at_step is None or step < stop_at_step):
            step += 1
            start = time.perf_counter()
            pairs = [train_set[i] for i in sampler.next_batch()]
            batches = micro_batches(pairs, cfg.policy.train_micro_batch_size, training=True)
            out = policy.train_step(batches, objective_of(len(pairs)))
            totals = out["metrics"]
            elapsed = time.perf_counter() - start
            metrics = {
                "train/loss": out["loss"],
                **{f"train/{name}": totals[name] for name in METRICS[1:]},
                "train/grad_norm": out["grad_norm"],
                "train/lr": out["lr"],
                **pair_step_metrics(pairs, len(batches), elapsed),
                **throughput(pair_lengths(pairs), elapsed),
                "train/epoch": sampler.epoch,
            }
            result.train_metrics[step] = {k: v for k, v in metrics.items() if k.removeprefix("train/") in METRICS}
            if val_pairs and ((cfg.rm.val_period and step % cfg.rm.val_period == 0) or step == total_steps):
                result.val_metrics[step] = validate()
                metrics.update(result.val_metrics[step])
            logger.log(metrics, step=step)
            if cfg.checkpointing.enabled and (step % cfg.checkpointing.save_period == 0 or step == total_steps):
                save_run_checkpoint(ckpt, step, policy.save, sampler.state_dict(), identity, metrics)
            progress.update(task, advance=1, info=f"loss {out['loss']:.4f} acc {totals['accuracy']:.2f}")

        result.steps = step
        if step == total_steps:
            result.final_model_dir = policy.export_hf(Path(cfg.checkpointing.checkpoint_dir) / "final_model")
            console.print(f"Exported the final reward model to {result.final_model_dir}")
    return result


"""Direct preference optimisation, top to bottom.

preference pairs -> micro-batches of [chosen; rejected] rows -> reference log-probs (frozen
starting model, no grad; none for SimPO and ORPO) -> preference loss (+ optional SFT term) ->
optimizer step -> validation -> logs -> atomic checkpoint; resumes exactly from the latest checkpoint.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from rich.console import Console

from posttrain.algos.dpo import dpo_objective
from posttrain.config import REFERENCE_FREE_DPO_LOSSES, DPORunConfig, save_config, to_dict
from posttrain.data.preference import (
    PreferenceDataset,
    PreferencePair,
    load_validation_pairs,
    make_pair_micro_batches,
    make_shared_prefix_micro_batches,
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
from posttrain.train.logprobs import sequence_logprobs, shared_prefix_logprobs
from posttrain.train.model import load_tokenizer
from posttrain.train.policy import describe_parameters
from posttrain.train.policy_group import make_policy

METRICS = ("loss", "rewards_chosen", "rewards_rejected", "reward_accuracy", "margin")


@dataclass
class DPOResult:
    steps: int
    train_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    val_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    final_model_dir: Path | None = None


def run_dpo(cfg: DPORunConfig, console: Console | None = None, stop_at_step: int | None = None,
            on_step: Callable[[int, dict[str, float]], None] | None = None) -> DPOResult:
    """Train; `stop_at_step` ends the run early as a preempted job would (used to test resuming).

    `on_step(step, metrics)` is called at the end of every training step (benchmarks time steps with it).
    """
    cfg.check()  # a config built in Python is checked as a loaded one is
    console = console or Console()
    transformers.set_seed(cfg.dpo.seed)
    ckpt = CheckpointManager(cfg.checkpointing)
    resume_dir = find_resume_checkpoint(cfg.checkpointing, ckpt)
    identity = run_identity(cfg.policy, cfg.data, cfg.dpo.seed)
    if resume_dir is not None:  # before anything is loaded from it
        check_identity(read_state(resume_dir)["identity"], identity, resume_dir)

    # ---- data
    tokenizer = load_tokenizer(cfg.policy)
    max_len = cfg.policy.max_total_sequence_length
    data = cfg.data
    train_rows = load_rows(data.dataset_name, data.train_split, subset=data.dataset_config,
                           arithmetic=data.arithmetic, seed=cfg.dpo.seed)
    train_set = PreferenceDataset(train_rows, tokenizer, data, max_len)
    val_pairs = load_validation_pairs(data, tokenizer, max_len, cfg.dpo.seed)
    sampler = EpochSampler(len(train_set), cfg.policy.train_global_batch_size, cfg.dpo.seed, data.shuffle)
    total_steps, steps_note = plan_steps(sampler, cfg.dpo.max_num_steps, cfg.dpo.max_num_epochs, "dpo")

    # ---- model, frozen reference, optimizer, resume
    # One local Policy, or policy.num_workers FSDP2 ranks on Ray behind the same calls; either holds
    # the frozen reference, the starting model (policy.model_name) also when resuming. A
    # reference-free loss (SimPO, ORPO) loads none.
    with_reference = cfg.dpo.loss_type not in REFERENCE_FREE_DPO_LOSSES
    policy = make_policy(cfg.policy, cfg.cluster, total_steps, seed=cfg.dpo.seed, tokenizer=tokenizer,
                         weights_path=resume_dir / "model" if resume_dir else None, with_reference=with_reference)
    throughput = Throughput(policy.model_config, policy.device_name, cfg.policy.num_workers)
    step = resume_training(resume_dir, policy, sampler, total_steps, console)

    log_dir = Path(cfg.logger.log_dir)
    save_config(cfg, log_dir / "config.yaml")
    console.print(f"DPO: {cfg.policy.model_name} ({describe_parameters(policy)}) on "
                  f"{policy.device}; {len(train_set)} training pairs, {len(val_pairs)} validation pairs, "
                  f"{total_steps} steps of {cfg.policy.train_global_batch_size} pairs{steps_note}, "
                  f"beta {cfg.dpo.reference_policy_kl_penalty}")

    # The prompt once per pair (rows [shared; rest of chosen; rest of rejected]), or padded
    # [chosen; rejected] rows where the attention implementation cannot take the custom mask.
    shared = cfg.dpo.share_prompt_prefix and policy.supports_shared_prefix
    make_batches = make_shared_prefix_micro_batches if shared else make_pair_micro_batches
    logprobs_of = shared_prefix_logprobs if shared else sequence_logprobs

    def micro_batches(pairs: list[PreferencePair], size: int, training: bool) -> list[dict[str, torch.Tensor]]:
        """Micro-batches of `size` pairs (or their token budget), carrying the reference model's per-token
        log-probs where the loss has a reference."""
        budget = cfg.policy.token_budget(size, rows_per_item=2, training=training)
        batches = make_batches(pairs, size, tokenizer.pad_token_id, budget)
        if with_reference:
            references = policy.reference_outputs(batches, lambda reference, batch: logprobs_of(reference, batch)[0])
            for batch, reference_logprobs in zip(batches, references, strict=True):
                batch["reference_logprobs"] = reference_logprobs
        return batches

    loss = {"beta": cfg.dpo.reference_policy_kl_penalty, "loss_type": cfg.dpo.loss_type,
            "label_smoothing": cfg.dpo.label_smoothing, "simpo_gamma": cfg.dpo.simpo_gamma,
            "average_log_probs": cfg.dpo.preference_average_log_probs, "sft_loss_weight": cfg.dpo.sft_loss_weight,
            "sft_average_log_probs": cfg.dpo.sft_average_log_probs}

    def objective_of(num_pairs: int):
        def objective(model, batch):
            logprobs, mask = logprobs_of(model, batch)
            return dpo_objective(logprobs, batch.get("reference_logprobs"), mask, num_pairs, **loss)
        return objective

    # Validation pairs and their reference log-probs are fixed: computed once, reused every time.
    if cfg.dpo.val_batches:
        val_pairs = val_pairs[: cfg.dpo.val_batches * cfg.dpo.val_global_batch_size]
    val_batches = micro_batches(val_pairs, cfg.dpo.val_micro_batch_size, training=False) if val_pairs else []

    def validate() -> dict[str, float]:
        out = policy.evaluate(val_batches, objective_of(len(val_pairs)))
        totals = {"loss": out["loss"], **out["metrics"]}
        return {f"val/{name}": totals[name] for name in METRICS}

    result = DPOResult(steps=step)
    with MetricsLogger(cfg.logger, to_dict(cfg), console=console, resumed_at=step if resume_dir else None) as logger, \
            make_progress(console) as progress, contextlib.closing(policy):
        if val_pairs and cfg.dpo.val_at_start and step == 0:
            result.val_metrics[0] = validate()
            logger.log(result.val_metrics[0], step=0)
        task = progress.add_task("DPO", total=total_steps, completed=step, info="")
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
                "train/preference_loss": totals["preference_loss"],
                "train/sft_loss": totals["sft_loss"],
                "train/grad_norm": out["grad_norm"],
                "train/lr": out["lr"],
                **pair_step_metrics(pairs, len(batches), elapsed),
                **throughput(pair_lengths(pairs), elapsed),
                "train/epoch": sampler.epoch,
            }
            result.train_metrics[step] = {k: v for k, v in metrics.items() if k.removeprefix("train/") in METRICS}
            if val_pairs and ((cfg.dpo.val_period and step % cfg.dpo.val_period == 0) or step == total_steps):
                result.val_metrics[step] = validate()
                metrics.update(result.val_metrics[step])
            logger.log(metrics, step=step)
            if cfg.checkpointing.enabled and (step % cfg.checkpointing.save_period == 0 or step == total_steps):
                save_run_checkpoint(ckpt, step, policy.save, sampler.state_dict(), identity, metrics)
            progress.update(task, advance=1, info=f"loss {out['loss']:.4f} acc {totals['reward_accuracy']:.2f}")
            if on_step is not None:
                on_step(step, metrics)

        result.steps = step
        if step == total_steps:
            result.final_model_dir = policy.export_hf(Path(cfg.checkpointing.checkpoint_dir) / "final_model")
            console.print(f"Exported the final model to {result.final_model_dir}")
    return result


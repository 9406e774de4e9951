"""Supervised fine-tuning, top to bottom.

data -> micro-batches (padded or packed) -> per-token NLL on assistant tokens -> optimizer step
-> validation -> logs -> atomic checkpoint; resumes exactly from the latest checkpoint.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import transformers
from rich.console import Console

from posttrain.algos.sft import nll_loss
from posttrain.config import SFTRunConfig, save_config, to_dict
from posttrain.data.collate import make_micro_batches
from posttrain.data.conversations import Sample, SFTDataset
from posttrain.data.sampler import EpochSampler, plan_steps
from posttrain.data.sources import load_rows, load_validation_rows
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
from posttrain.train.logprobs import sequence_logprobs
from posttrain.train.model import load_tokenizer
from posttrain.train.policy import describe_parameters
from posttrain.train.policy_group import make_policy


@dataclass
class SFTResult:
    steps: int
    train_losses: dict[int, float] = field(default_factory=dict)
    val_losses: dict[int, float] = field(default_factory=dict)
    final_model_dir: Path | None = None


def run_sft(cfg: SFTRunConfig, console: Console | None = None, stop_at_step: int | None = None,
            on_step: Callable[[int, dict[str, float]], None] | None = None) -> SFTResult:
    """Train; `stop_at_step` ends the run early as a preempted job would (used to test resuming).

    `on_step(step, metrics)` is called at the end of every training step (benchmarks time steps with it).
    """
    cfg.check()  # a config built in Python is checked as a loaded one is
    console = console or Console()
    transformers.set_seed(cfg.sft.seed)
    ckpt = CheckpointManager(cfg.checkpointing)
    resume_dir = find_resume_checkpoint(cfg.checkpointing, ckpt)
    identity = run_identity(cfg.policy, cfg.data, cfg.sft.seed)
    if resume_dir is not None:  # before anything is loaded from it
        check_identity(read_state(resume_dir)["identity"], identity, resume_dir)

    # ---- data
    tokenizer = load_tokenizer(cfg.policy)
    max_len = cfg.policy.max_total_sequence_length
    data = cfg.data
    train_rows = load_rows(data.dataset_name, data.train_split, subset=data.dataset_config,
                           arithmetic=data.arithmetic, seed=cfg.sft.seed)
    train_set = SFTDataset(train_rows, tokenizer, data, max_len)
    val_samples = _validation_samples(cfg, tokenizer)
    sampler = EpochSampler(len(train_set), cfg.policy.train_global_batch_size, cfg.sft.seed, data.shuffle)
    total_steps, steps_note = plan_steps(sampler, cfg.sft.max_num_steps, cfg.sft.max_num_epochs, "sft")
    pack = None
    if cfg.policy.sequence_packing.enabled:
        pack = (max_len, cfg.policy.sequence_packing.train_mb_tokens or cfg.policy.train_micro_batch_size * max_len)
    train_budget = cfg.policy.token_budget(cfg.policy.train_micro_batch_size)
    val_budget = cfg.policy.token_budget(cfg.sft.val_micro_batch_size, training=False)

    # ---- model, optimizer, resume
    # One local Policy, or policy.num_workers FSDP2 ranks on Ray behind the same calls.
    policy = make_policy(cfg.policy, cfg.cluster, total_steps, seed=cfg.sft.seed, tokenizer=tokenizer,
                         weights_path=resume_dir / "model" if resume_dir else None)
    throughput = Throughput(policy.model_config, policy.device_name, cfg.policy.num_workers)
    step = resume_training(resume_dir, policy, sampler, total_steps, console)

    log_dir = Path(cfg.logger.log_dir)
    save_config(cfg, log_dir / "config.yaml")
    console.print(f"SFT: {cfg.policy.model_name} ({describe_parameters(policy)}) on "
                  f"{policy.device}; {len(train_set)} training rows, {len(val_samples)} validation rows, "
                  f"{total_steps} steps of {cfg.policy.train_global_batch_size} sequences{steps_note}")

    def loss_of(num_targets: float):
        return lambda model, batch: nll_loss(*sequence_logprobs(model, batch), num_targets)

    def validate() -> float:
        samples = val_samples
        if cfg.sft.val_batches:
            samples = samples[: cfg.sft.val_batches * cfg.sft.val_global_batch_size]
        n = sum(sum(s.loss_mask[1:]) for s in samples)
        batches = make_micro_batches(samples, cfg.sft.val_micro_batch_size, tokenizer.pad_token_id,
                                     token_budget=val_budget)
        return policy.evaluate(batches, loss_of(n))["loss"]

    result = SFTResult(steps=step)
    with MetricsLogger(cfg.logger, to_dict(cfg), console=console, resumed_at=step if resume_dir else None) as logger, \
            make_progress(console) as progress, contextlib.closing(policy):
        if val_samples and cfg.sft.val_at_start and step == 0:
            result.val_losses[0] = validate()
            logger.log({"val/loss": result.val_losses[0]}, step=0)
        task = progress.add_task("SFT", total=total_steps, completed=step, info="")
        while step < total_steps and (stop_at_step is None or step < stop_at_step):
            step += 1
            start = time.perf_counter()
            samples: list[Sample] = [train_set[i] for i in sampler.next_batch()]
            num_targets = sum(sum(s.loss_mask[1:]) for s in samples)
            micro_batches = make_micro_batches(samples, cfg.policy.train_micro_batch_size,
                                               tokenizer.pad_token_id, pack, train_budget)
            out = policy.train_step(micro_batches, loss_of(num_targets))
            elapsed = time.perf_counter() - start
            metrics = {
                "train/loss": out["loss"],
                "train/grad_norm": out["grad_norm"],
                "train/lr": out["lr"],
                "train/num_target_tokens": num_targets,
                "train/num_micro_batches": len(micro_batches),
                **throughput([len(s.input_ids) for s in samples], elapsed),
                "train/step_time_s": elapsed,
                "train/truncated_fraction": sum(s.truncated for s in samples) / len(samples),
                "train/epoch": sampler.epoch,
            }
            result.train_losses[step] = out["loss"]
            if val_samples and ((cfg.sft.val_period and step % cfg.sft.val_period == 0) or step == total_steps):
                metrics["val/loss"] = result.val_losses[step] = validate()
            logger.log(metrics, step=step)
            if cfg.checkpointing.enabled and (step % cfg.checkpointing.save_period == 0 or step == total_steps):
                save_run_checkpoint(ckpt, step, policy.save, sampler.state_dict(), identity, metrics)
            progress.update(task, advance=1, info=f"loss {out['loss']:.4f}")
            if on_step is not None:
                on_step(step, metrics)

        result.steps = step
        if step == total_steps:
            result.final_model_dir = policy.export_hf(Path(cfg.checkpointing.checkpoint_dir) / "final_model")
            console.print(f"Exported the final model to {result.final_model_dir}")
    return result


def _validation_samples(cfg: SFTRunConfig, tokenizer) -> list[Sample]:
    rows = load_validation_rows(cfg.data, seed=cfg.sft.seed)
    if rows is None:
        return []
    dataset = SFTDataset(rows, tokenizer, cfg.data, cfg.policy.max_total_sequence_length)
    return [dataset[i] for i in range(len(dataset))]


"""`posttrain demo`: a tiny model learns integer arithmetic on a laptop CPU, first by SFT, then GRPO.

The SFT demonstrations come from a sloppy teacher: most of its answers are off by one. SFT
imitates the slip, as it imitates everything in its data. GRPO needs no teacher: an exact
verifier rewards the right answer, and the model unlearns the slip. That is the case RL with
verifiable rewards exists for, shown in a few minutes on two CPU cores.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from posttrain.config import GRPORunConfig, PolicyConfig, SFTRunConfig, load_config
from posttrain.data.arithmetic import is_correct, make_problems
from posttrain.data.conversations import tokenize_prompt
from posttrain.demo.tiny_model import save_tiny_model
from posttrain.logging import plot_metrics
from posttrain.loops.grpo import run_grpo
from posttrain.loops.sft import run_sft
from posttrain.rollout.base import SamplingParams
from posttrain.rollout.hf import HFGenerationBackend

# The demo's recipe, as the dotted overrides a user would type. Both stages see the same task.
TASK_OVERRIDES = [
    "data.arithmetic.max_operand=19",
    "data.arithmetic.num_train=40000",
    "data.arithmetic.num_val=84",  # every held-out problem of this size, none of which SFT or GRPO sees
    "data.arithmetic.teacher_error_rate=0.8",
    "policy.max_total_sequence_length=64",
    "logger.tensorboard_enabled=false",
    "checkpointing.keep_top_k=1",
    "checkpointing.resume=never",
]
SFT_OVERRIDES = [
    "policy.train_global_batch_size=64",
    "policy.train_micro_batch_size=64",
    "policy.optimizer.lr=3e-3",
    "policy.optimizer.weight_decay=0.0",
    "policy.optimizer.betas=[0.9,0.98]",
    "policy.scheduler.warmup_steps=30",
    "policy.scheduler.min_lr_ratio=0.05",
    "sft.max_num_steps=600",
    "sft.val_period=100",
    "sft.val_global_batch_size=64",
    "sft.val_micro_batch_size=64",
    "logger.console_period=50",
    "checkpointing.save_period=200",
]
GRPO_OVERRIDES = [
    "grpo.num_prompts_per_step=32",
    "grpo.num_generations_per_prompt=8",
    "grpo.max_num_steps=30",
    "grpo.val_period=10",
    "grpo.max_val_samples=84",
    "loss_fn.reference_policy_kl_penalty=0.0",
    "policy.train_global_batch_size=256",
    "policy.train_micro_batch_size=128",
    "policy.optimizer.lr=2e-4",
    "policy.optimizer.weight_decay=0.0",
    "policy.scheduler.name=constant",
    "policy.generation.max_new_tokens=8",
    "policy.generation.batch_size=256",
    "logger.console_period=10",
    "checkpointing.save_period=50",
]


@dataclass
class DemoResult:
    accuracy_before: float
    accuracy_after_sft: float
    accuracy_after_grpo: float | None
    seconds: float
    grpo_rewards: dict[int, float] = field(default_factory=dict)  # mean training reward per GRPO step
    reward_curve: Path | None = None


def held_out_accuracy(model_dir: Path, problems: list[dict]) -> float:
    """Greedy exact match, through the same generation backend GRPO uses."""
    backend = HFGenerationBackend(PolicyConfig(model_name=str(model_dir), device="cpu"))
    prompts = [tokenize_prompt(backend.tokenizer, [{"role": "user", "content": p["prompt"]}]) for p in problems]
    completions = backend.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0.0))
    return sum(is_correct(c.text, p["answer"]) for c, p in zip(completions, problems, strict=True)) / len(problems)


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """`sft:key=value` goes to the SFT stage, `grpo:key=value` to GRPO, a bare `key=value` to both."""
    sft, grpo = [], []
    for item in overrides:
        stage, sep, rest = item.partition(":")
        if sep and stage in ("sft", "grpo") and "=" in rest:
            (sft if stage == "sft" else grpo).append(rest)
        else:
            sft.append(item)
            grpo.append(item)
    return sft, grpo


def run_demo(workdir: str | Path = "runs/demo", overrides: list[str] | None = None,
             console: Console | None = None, with_grpo: bool = True) -> DemoResult:
    console = console or Console()
    start = time.perf_counter()
    workdir = Path(workdir)
    for stale in ("sft", "grpo"):
        shutil.rmtree(workdir / stale, ignore_errors=True)
    model_dir = workdir / "tiny-model"
    sft_overrides, grpo_overrides = split_overrides(overrides or [])
    console.rule("[bold]posttrain demo: a tiny model learns arithmetic")
    console.print(f"Building the tiny tokenizer and model in {model_dir} (no network needed)")
    save_tiny_model(model_dir, size="demo")

    sft_cfg = load_config(SFTRunConfig, None, [
        f"policy.model_name={model_dir}",
        f"logger.log_dir={workdir / 'sft' / 'logs'}",
        f"checkpointing.checkpoint_dir={workdir / 'sft' / 'checkpoints'}",
        *TASK_OVERRIDES, *SFT_OVERRIDES, *sft_overrides,
    ])
    problems = make_problems(sft_cfg.data.arithmetic, "validation", seed=sft_cfg.sft.seed)
    before = held_out_accuracy(model_dir, problems)
    console.print(f"Held-out exact-match accuracy before training: [bold]{before:.1%}[/]")

    console.rule("SFT on a sloppy teacher's demonstrations")
    console.print(f"{sft_cfg.data.arithmetic.teacher_error_rate:.0%} of the teacher's answers are off by one; "
                  "SFT learns to imitate them.")
    sft = run_sft(sft_cfg, console=console)
    after_sft = held_out_accuracy(sft.final_model_dir, problems)
    console.print(f"Held-out exact-match accuracy after SFT: [bold]{after_sft:.1%}[/]")
    plot_metrics(sft_cfg.logger.log_dir)

    after_grpo, reward_curve, rewards = None, None, {}
    if with_grpo:
        console.rule("GRPO with an exact verifier as the reward")
        grpo_cfg = load_config(GRPORunConfig, None, [
            f"policy.model_name={sft.final_model_dir}",
            f"logger.log_dir={workdir / 'grpo' / 'logs'}",
            f"checkpointing.checkpoint_dir={workdir / 'grpo' / 'checkpoints'}",
            *TASK_OVERRIDES, *GRPO_OVERRIDES, *grpo_overrides,
        ])
        grpo = run_grpo(grpo_cfg, console=console)
        rewards = grpo.train_rewards
        after_grpo = held_out_accuracy(grpo.final_model_dir, problems)
        plots = plot_metrics(grpo_cfg.logger.log_dir)
        reward_curve = next((p for p in plots if p.stem == "rollout_reward_mean"), None)

    table = Table(title=f"Held-out accuracy on {len(problems)} unseen problems (greedy, exact match)")
    table.add_column("stage")
    table.add_column("exact match", justify="right")
    table.add_row("before training", f"{before:.1%}")
    table.add_row("after SFT", f"{after_sft:.1%}")
    if after_grpo is not None:
        table.add_row("after GRPO", f"{after_grpo:.1%}")
    console.print(table)
    console.print(f"Logs and curves: {workdir / 'sft' / 'logs'}, {workdir / 'grpo' / 'logs'}")
    if reward_curve is not None:
        console.print(f"Reward curve: {reward_curve}")
    seconds = time.perf_counter() - start
    console.print(f"Demo finished in {seconds / 60:.1f} minutes.")
    return DemoResult(before, after_sft, after_grpo, seconds, rewards, reward_curve)

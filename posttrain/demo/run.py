"""`posttrain demo`: a tiny model learns integer arithmetic on a laptop CPU.

Builds the tiny model and tokenizer locally, measures held-out exact-match accuracy, runs SFT
on the built-in arithmetic task and measures again. Later stages (GRPO) build on this.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from posttrain.config import PolicyConfig, SFTRunConfig, load_config
from posttrain.data.arithmetic import is_correct, make_problems
from posttrain.data.formats import tokenize_prompt
from posttrain.demo.tiny_model import save_tiny_model
from posttrain.logging import plot_metrics
from posttrain.loops.sft import run_sft
from posttrain.rollout.base import SamplingParams
from posttrain.rollout.hf import HFGenerationBackend

# The demo's recipe, as the dotted overrides a user would type.
DEMO_OVERRIDES = [
    "policy.train_global_batch_size=64",
    "policy.train_micro_batch_size=64",
    "policy.max_total_sequence_length=64",
    "policy.optimizer.lr=3e-3",
    "policy.optimizer.weight_decay=0.0",
    "policy.optimizer.betas=[0.9,0.98]",
    "policy.scheduler.warmup_steps=30",
    "policy.scheduler.min_lr_ratio=0.05",
    "data.arithmetic.num_train=40000",
    "data.arithmetic.num_val=300",
    "sft.max_num_steps=600",
    "sft.val_period=100",
    "sft.val_global_batch_size=64",
    "sft.val_micro_batch_size=64",
    "logger.tensorboard_enabled=false",
    "logger.console_period=50",
    "checkpointing.save_period=200",
    "checkpointing.keep_top_k=1",
    "checkpointing.resume=never",
]


@dataclass
class DemoResult:
    accuracy_before: float
    accuracy_after: float
    seconds: float


def held_out_accuracy(model_dir: Path, problems: list[dict]) -> float:
    """Greedy exact match, through the same generation backend GRPO uses."""
    backend = HFGenerationBackend(PolicyConfig(model_name=str(model_dir), device="cpu"))
    prompts = [tokenize_prompt(backend.tokenizer, [{"role": "user", "content": p["prompt"]}]) for p in problems]
    completions = backend.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0.0))
    return sum(is_correct(c.text, p["answer"]) for c, p in zip(completions, problems, strict=True)) / len(problems)


def run_demo(workdir: str | Path = "runs/demo", overrides: list[str] | None = None,
             console: Console | None = None) -> DemoResult:
    console = console or Console()
    start = time.perf_counter()
    workdir = Path(workdir)
    for stale in ("checkpoints", "logs"):
        shutil.rmtree(workdir / stale, ignore_errors=True)
    model_dir = workdir / "tiny-model"
    console.rule("[bold]posttrain demo: a tiny model learns arithmetic")
    console.print(f"Building the tiny tokenizer and model in {model_dir} (no network needed)")
    save_tiny_model(model_dir, size="demo")

    cfg = load_config(SFTRunConfig, None, [
        f"policy.model_name={model_dir}",
        f"logger.log_dir={workdir / 'logs'}",
        f"checkpointing.checkpoint_dir={workdir / 'checkpoints'}",
        *DEMO_OVERRIDES,
        *(overrides or []),
    ])
    problems = make_problems(cfg.data.arithmetic, "validation", seed=cfg.sft.seed)
    before = held_out_accuracy(model_dir, problems)
    console.print(f"Held-out exact-match accuracy before training: [bold]{before:.1%}[/]")

    console.rule("SFT")
    result = run_sft(cfg, console=console)
    after = held_out_accuracy(result.final_model_dir, problems)
    plots = plot_metrics(cfg.logger.log_dir)

    table = Table(title=f"Held-out accuracy on {len(problems)} unseen problems")
    table.add_column("stage")
    table.add_column("exact match", justify="right")
    table.add_row("before training", f"{before:.1%}")
    table.add_row("after SFT", f"{after:.1%}")
    console.print(table)
    console.print(f"Metrics: {Path(cfg.logger.log_dir) / 'metrics.jsonl'}; curves: {plots[0].parent if plots else '-'}")
    seconds = time.perf_counter() - start
    console.print(f"Demo finished in {seconds / 60:.1f} minutes.")
    return DemoResult(before, after, seconds)

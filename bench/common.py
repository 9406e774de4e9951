"""Shared pieces of the side-by-side benchmarks: flags, machine info, step timing, alternating repeats.

Throughput is measured in steady state: the wall time from the end of the last warm-up step to
the end of the last step, so model loading, data preparation and the first steps (lazy
initialisation, allocator growth) are left out, while everything a training loop does between
two steps (data, forward/backward, optimizer, logging) is counted, for both libraries alike.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch


def add_common_args(parser: argparse.ArgumentParser, *, lr: float) -> argparse.ArgumentParser:
    """The flags both benchmarks share; every one applies to both libraries."""
    parser.add_argument("--size", default="demo", help="tiny model size: test, demo or small")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="leading steps left out of the timing")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each library, alternating")
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads for both (default 1: a model this small gains little from "
                             "more, and on a busy shared CPU, OpenMP threads waiting for each other slow every "
                             "op down several-fold, which would measure the neighbours, not the libraries)")
    parser.add_argument("--workdir", default=None, help="model and run folders (default: a temporary folder)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile in both: posttrain's policy.torch_compile (each decoder layer) and TRL's "
                             "torch_compile (the whole model); compiling happens in the first steps of each run, so "
                             "give it --warmup steps")
    return parser


def machine_info() -> dict[str, str]:
    """What a reader needs to compare these numbers with their own."""

    def installed(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "load_avg": " ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1/5/15 min, at start)",
        "python": platform.python_version(),
        **{package: installed(package) for package in ("torch", "transformers", "trl", "posttrain")},
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def print_machine_info(info: dict[str, str]) -> None:
    for key, value in info.items():
        print(f"  {key:<13} {value}")


@dataclass
class StepClock:
    """Wall-clock time at the end of every optimizer step (fed by each library's step hook)."""

    start: float = field(default_factory=time.perf_counter)  # just before the library is called
    ends: list[float] = field(default_factory=list)

    def tick(self) -> None:
        self.ends.append(time.perf_counter())

    def rate(self, units_per_step: list[float], warmup: int) -> float:
        """Units per second over steps warmup+1..n: their units / (end of step n - end of step warmup).

        A run too short for that (a smoke test) keeps as much warm-up as it can, and a single step
        is timed from `start`, start-up included: such a number only shows the plumbing works.
        """
        n = len(self.ends)
        if n == 0 or n != len(units_per_step):
            raise ValueError(f"{n} step ends recorded for {len(units_per_step)} steps")
        skip = min(warmup, n - 1)
        since = self.ends[skip - 1] if skip else self.start
        return sum(units_per_step[skip:]) / (self.ends[-1] - since)


def alternate(runners: dict[str, Callable[[], dict]], repeats: int) -> dict[str, list[dict]]:
    """Run each runner `repeats` times, interleaved and in a swapped order every other repeat
    (A B, B A, A B, ...), so a slow drift of the machine (a shared CPU) hits both alike."""
    names = list(runners)
    results: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            threads = torch.get_num_threads()
            results[name].append(runners[name]())
            if torch.get_num_threads() != threads:  # would skew every later run
                raise RuntimeError(f"{name} changed torch's thread count from {threads} to {torch.get_num_threads()}")
            gc.collect()
            print(f"  [repeat {r + 1}/{repeats}] {name:<9} {results[name][-1]['rate']:9.1f} "
                  f"{results[name][-1]['unit']}", flush=True)
    return results


def compare(title: str, setup: dict[str, str], runners: dict[str, Callable[[], dict]], repeats: int,
            metrics: list[str], result_heading: str) -> dict:
    """Print the title, machine and setup, run posttrain and TRL alternately, then print and return
    the summary (with the machine info)."""
    info = machine_info()
    print(title)
    print_machine_info(info)
    print_machine_info(setup)
    runs = alternate(runners, repeats)
    summary = summarize(runs, "posttrain", "trl", metrics)
    print(result_heading)
    print_summary(summary, "posttrain", "trl", metrics)
    return {"machine": info, **summary}


def summarize(results: dict[str, list[dict]], ours: str, theirs: str, metrics: list[str]) -> dict:
    """Median rate per library, the ratio ours/theirs, and the last repeat's training metrics."""
    summary: dict = {}
    for name, runs in results.items():
        summary[name] = {
            "rates": [run["rate"] for run in runs],
            "median_rate": statistics.median(run["rate"] for run in runs),
            "unit": runs[0]["unit"],
            **{m: runs[-1][m] for m in metrics},
        }
    summary["ratio"] = summary[ours]["median_rate"] / summary[theirs]["median_rate"]
    return summary


def print_summary(summary: dict, ours: str, theirs: str, metrics: list[str]) -> None:
    unit = summary[ours]["unit"]
    for name in (ours, theirs):
        s = summary[name]
        runs = ", ".join(f"{r:.1f}" for r in s["rates"])
        extra = "  ".join(f"{m} {s[m]:.4f}" for m in metrics)
        print(f"  {name:<9} median {s['median_rate']:9.1f} {unit}  (runs: {runs})  {extra}")
    print(f"  ratio {ours}/{theirs}: {summary['ratio']:.2f}x")


def fresh(parent: Path, prefix: str) -> Path:
    """A new, empty run folder, so no run resumes from or reads another's files."""
    return Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=parent))


def train_trl(trainer) -> tuple[StepClock, list[dict]]:
    """Run a TRL trainer with a step clock and without console output; (clock, log history)."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    clock = StepClock()

    class Tick(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            clock.tick()

    trainer.add_callback(Tick())
    for printer in (PrinterCallback, ProgressCallback):  # posttrain's console is quiet too
        trainer.remove_callback(printer)
    clock.start = time.perf_counter()
    trainer.train()
    return clock, trainer.state.log_history


def quiet_hf() -> None:
    """No progress bars or deprecation warnings from datasets/transformers/TRL in the output."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Both libraries run with `n` intra-op threads; the caller's setting is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def posttrain_overrides(args: argparse.Namespace, model_dir: Path, out: Path) -> list[str]:
    """posttrain settings the SFT and DPO benchmarks share, set to TRL's defaults where they differ."""
    return [
        f"policy.model_name={model_dir}",
        "policy.device=cpu",
        "policy.precision=float32",
        f"policy.train_global_batch_size={args.global_batch}",
        f"policy.train_micro_batch_size={args.micro_batch}",
        f"policy.max_total_sequence_length={args.max_length}",
        f"policy.optimizer.lr={args.lr}",
        "policy.optimizer.weight_decay=0.0",  # TRL's default
        "policy.scheduler.name=linear",  # = TRL's default: linear to 0, no warm-up
        "policy.scheduler.warmup_steps=0",
        "policy.scheduler.min_lr_ratio=0.0",
        "policy.max_grad_norm=1.0",
        "data.val_split=null",  # no validation, as no eval for TRL
        "logger.tensorboard_enabled=false",
        "logger.console_period=0",
        f"logger.log_dir={out / 'logs'}",
        "checkpointing.enabled=false",
        "checkpointing.resume=never",
        f"checkpointing.checkpoint_dir={out / 'ckpt'}",
        f"policy.torch_compile={str(args.compile).lower()}",
    ]


def trl_arguments(args: argparse.Namespace, out: Path) -> dict:
    """TRL TrainingArguments the SFT and DPO benchmarks share: the same batches, schedule and
    precision as posttrain, posttrain's batch order, and no saving, evaluation or reporting."""
    return dict(
        output_dir=str(out), max_steps=args.steps, seed=args.seed,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.global_batch // args.micro_batch,
        learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        max_length=args.max_length,
        use_cpu=True, bf16=False, activation_checkpointing=False, model_init_kwargs={"dtype": "float32"},
        train_sampling_strategy="sequential",
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none",
        torch_compile=args.compile,
    )


def sampled_indices(size: int, cfg, seed: int, steps: int) -> list[list[int]]:
    """The dataset indices posttrain's sampler draws for each of the first `steps` steps."""
    from posttrain.data.sampler import EpochSampler

    sampler = EpochSampler(size, cfg.policy.train_global_batch_size, seed, cfg.data.shuffle)
    return [sampler.next_batch() for _ in range(steps)]

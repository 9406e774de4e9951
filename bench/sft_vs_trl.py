"""SFT throughput, posttrain vs Hugging Face TRL's SFTTrainer, on identical tokens and settings.

    python -m bench.sft_vs_trl [--size demo] [--steps 30] [--repeats 3] [--micro-batch 8] ...

Both train the same locally built tiny model on the built-in arithmetic task, batch for batch:
TRL gets posttrain's rows as a conversational prompt/completion dataset *in the order posttrain's
sampler draws them* (read sequentially), so every optimizer step sees the same 32 sequences. The
tokens are checked to be identical (same chat template, loss on the assistant reply and its
end-of-turn marker only, same truncation), and so are global batch, micro-batch, AdamW settings,
linear LR decay without warm-up, gradient clipping, fp32 on CPU and seed. The final losses should
therefore agree closely: speed must not be bought with different math.

Throughput counts the non-pad tokens (prompt + reply) of each step's sequences, the same count
for both, over the steady-state steps (see bench/common.py).

posttrain runs with one setting beyond its defaults: `policy.dynamic_batching.enabled=true`, which
fills each micro-batch with length-sorted sequences up to micro-batch x max length padded tokens
(the memory bound of the fixed micro-batch) instead of a fixed count; the math is unchanged.

TRL settings beyond its defaults, and why: `use_cpu=True, bf16=False` (fp32, as posttrain);
`activation_checkpointing=False` (TRL turns gradient checkpointing on by default; posttrain does not, so this is the
like-for-like and faster choice for TRL); `train_sampling_strategy="sequential"` (the shared batch
order above); `logging_steps=1`, `save_strategy="no"`, `eval_strategy="no"`, `report_to="none"`
and no console progress output, as for posttrain. Everything else (fused AdamW, no packing,
padding to the longest sequence of each micro-batch, chunked log-prob LM head) is TRL's default.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from rich.console import Console

from bench.common import (
    StepClock,
    add_common_args,
    compare,
    fresh,
    posttrain_overrides,
    quiet_hf,
    sampled_indices,
    torch_threads,
    train_trl,
    trl_arguments,
)
from posttrain.config import SFTRunConfig, load_config
from posttrain.data.conversations import Sample, SFTDataset
from posttrain.data.sources import load_rows
from posttrain.demo.tiny_model import save_tiny_model
from posttrain.loops.sft import run_sft
from posttrain.train.model import load_tokenizer

METRICS = ["first_loss", "final_loss"]
POSTTRAIN_SETTINGS = ("defaults (padded micro-batches sorted by length, fused AdamW, LM head on target positions "
                      "only) with the shared settings above, and dynamic batching on (micro-batches of up to "
                      "micro-batch x max length padded tokens, the memory bound of the fixed micro-batch); "
                      "no validation, checkpointing off, tensorboard off, quiet console")
TRL_SETTINGS = ("SFTConfig defaults (optim adamw_torch_fused, packing off, padding to the longest in the micro-batch, "
                "completion-only loss) except use_cpu=True, bf16=False, activation_checkpointing=False, "
                "train_sampling_strategy='sequential', logging_steps=1, save/eval off, no console output")


def posttrain_config(args: argparse.Namespace, model_dir: Path, out: Path) -> SFTRunConfig:
    return load_config(SFTRunConfig, None, [
        *posttrain_overrides(args, model_dir, out),
        "data.dataset_name=arithmetic",
        "policy.dynamic_batching.enabled=true",
        f"sft.max_num_steps={args.steps}",
        "sft.max_num_epochs=1000",
        f"sft.seed={args.seed}",
    ])


def step_batches(cfg: SFTRunConfig, steps: int) -> tuple[list[dict], list[list[Sample]]]:
    """The rows posttrain trains on, step by step, and their posttrain tokenization."""
    tokenizer = load_tokenizer(cfg.policy)
    rows = load_rows(cfg.data.dataset_name, cfg.data.train_split, arithmetic=cfg.data.arithmetic, seed=cfg.sft.seed)
    dataset = SFTDataset(rows, tokenizer, cfg.data, cfg.policy.max_total_sequence_length)
    ordered_rows, batches = [], []
    for indices in sampled_indices(len(dataset), cfg, cfg.sft.seed, steps):
        ordered_rows += [rows.rows[i] for i in indices]
        batches.append([dataset[i] for i in indices])
    return ordered_rows, batches


def run_posttrain(cfg: SFTRunConfig, tokens_per_step: list[int], warmup: int) -> dict:
    clock = StepClock()
    result = run_sft(cfg, console=Console(quiet=True), on_step=lambda step, metrics: clock.tick())
    losses = result.train_losses
    return {"rate": clock.rate(tokens_per_step, warmup), "unit": "tokens/s",
            "first_loss": losses[min(losses)], "final_loss": losses[max(losses)]}


def run_trl(args: argparse.Namespace, model_dir: Path, out: Path, rows: list[dict],
            samples: list[Sample], tokens_per_step: list[int]) -> dict:
    import datasets
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    conversational = datasets.Dataset.from_list([
        {"prompt": [{"role": "user", "content": row["prompt"]}],
         "completion": [{"role": "assistant", "content": row["completion"]}]}
        for row in rows
    ])
    config = SFTConfig(**trl_arguments(args, out), packing=False)
    trainer = SFTTrainer(model=str(model_dir), args=config, train_dataset=conversational,
                         processing_class=AutoTokenizer.from_pretrained(model_dir))
    check_same_tokens(trainer.train_dataset, samples)
    clock, history = train_trl(trainer)
    losses = [entry["loss"] for entry in history if "loss" in entry]
    return {"rate": clock.rate(tokens_per_step, args.warmup), "unit": "tokens/s",
            "first_loss": losses[0], "final_loss": losses[-1]}


def check_same_tokens(trl_dataset, samples: list[Sample]) -> None:
    """TRL's prepared sequences must be posttrain's, token for token and target for target."""
    if len(trl_dataset) != len(samples):
        raise AssertionError(f"TRL has {len(trl_dataset)} rows, posttrain {len(samples)}")
    for i, (theirs, ours) in enumerate(zip(trl_dataset, samples, strict=True)):
        targets = [int(label != -100) for label in theirs["labels"]]
        if theirs["input_ids"] != ours.input_ids or targets != ours.loss_mask:
            raise AssertionError(f"row {i}: TRL and posttrain tokenize differently:\n"
                                 f"  TRL       {theirs['input_ids']} targets {targets}\n"
                                 f"  posttrain {ours.input_ids} targets {ours.loss_mask}")


def main(argv: list[str] | None = None) -> dict:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]), lr=1e-3)
    args = parser.parse_args(argv)
    if args.global_batch % args.micro_batch:
        parser.error("--global-batch must be a multiple of --micro-batch")
    quiet_hf()
    with tempfile.TemporaryDirectory(prefix="bench-sft-") as tmp, torch_threads(args.threads):
        work = Path(args.workdir or tmp)
        model_dir = save_tiny_model(work / "model", size=args.size)
        cfg = posttrain_config(args, model_dir, work / "posttrain")
        rows, batches = step_batches(cfg, args.steps)
        samples = [s for batch in batches for s in batch]
        tokens_per_step = [sum(len(s.input_ids) for s in batch) for batch in batches]

        return compare("SFT: posttrain vs TRL SFTTrainer", {
            "setup": f"tiny '{args.size}' model (qwen2), arithmetic task, {args.steps} steps of {args.global_batch} "
                     f"sequences (micro-batch {args.micro_batch}), lr {args.lr} linear decay, max length "
                     f"{args.max_length}, fp32, seed {args.seed}; timed steps {args.warmup + 1}..{args.steps}"
                     + ("; torch.compile in both" if args.compile else ""),
            "tokens": f"{sum(tokens_per_step)} non-pad tokens in all, {sum(sum(s.loss_mask) for s in samples)} of "
                      "them trained on; TRL's tokenization is checked to be posttrain's before each TRL run",
            "posttrain": POSTTRAIN_SETTINGS,
            "TRL": TRL_SETTINGS,
        }, {
            "posttrain": lambda: run_posttrain(posttrain_config(args, model_dir, fresh(work, "posttrain")),
                                               tokens_per_step, args.warmup),
            "trl": lambda: run_trl(args, model_dir, fresh(work, "trl"), rows, samples, tokens_per_step),
        }, args.repeats, METRICS,
            "Result (training tokens/s: non-pad tokens of the timed steps / their wall time):")


if __name__ == "__main__":
    main()

"""DPO throughput, posttrain vs Hugging Face TRL's DPOTrainer, on identical pairs and settings.

    python -m bench.dpo_vs_trl [--size demo] [--steps 30] [--repeats 3] [--beta 0.1] ...

Both train the same locally built tiny model (randomly initialised: the speed is what is measured;
the metrics show both learn alike) on the built-in `arithmetic_preference` pairs, batch for batch:
TRL gets posttrain's rows as a conversational prompt/chosen/rejected dataset in the order
posttrain's sampler draws them (read sequentially). The tokens are checked to be identical, and
so are the sigmoid loss and its beta, the reference model (a frozen copy of the starting model,
scored every step), global batch and micro-batch (in pairs), AdamW settings, linear LR decay
without warm-up, gradient clipping, fp32 on CPU and seed.

Throughput is preference pairs per second over the steady-state steps (see bench/common.py).
By default posttrain puts each pair in one row with the prompt scored once
(`dpo.share_prompt_prefix`, same per-token log-probs), while TRL pads chosen and rejected as two
rows; the identical losses and reward accuracies printed at the end show the math is the same.

TRL settings beyond its defaults, and why: `use_cpu=True, bf16=False` (fp32, as posttrain);
`activation_checkpointing=False` (TRL turns gradient checkpointing on by default; posttrain does
not, so this is the like-for-like and faster choice for TRL); `train_sampling_strategy="sequential"`
(the shared batch order); `beta` (posttrain's value; TRL's default is 0.1); `logging_steps=1`,
`save_strategy="no"`, `eval_strategy="no"`, `report_to="none"` and no console progress output,
as for posttrain. Everything else is TRL's default: `loss_type=["sigmoid"]`, reference log-probs
computed on the fly (`precompute_ref_log_probs=False`), fused AdamW, padding to the longest
sequence of each micro-batch.
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
from posttrain.config import DPORunConfig, load_config
from posttrain.data.preference import PreferenceDataset, PreferencePair
from posttrain.data.sources import load_rows
from posttrain.demo.tiny_model import save_tiny_model
from posttrain.loops.dpo import run_dpo
from posttrain.train.model import load_tokenizer

METRICS = ["final_loss", "final_reward_accuracy"]
POSTTRAIN_SETTINGS = ("defaults (prompt scored once per pair: dpo.share_prompt_prefix=true; reference "
                      "log-probs computed every step under no_grad; fused AdamW) with the shared settings above, "
                      "no validation, checkpointing off, tensorboard off, quiet console")
TRL_SETTINGS = ("DPOConfig defaults (loss_type ['sigmoid'], reference model = a fresh copy of the start model, "
                "reference log-probs computed every step, optim adamw_torch_fused, padding to the longest in the "
                "micro-batch) except use_cpu=True, bf16=False, activation_checkpointing=False, "
                "train_sampling_strategy='sequential', beta as posttrain, logging_steps=1, save/eval off, "
                "no console output")


def posttrain_config(args: argparse.Namespace, model_dir: Path, out: Path) -> DPORunConfig:
    return load_config(DPORunConfig, None, [
        *posttrain_overrides(args, model_dir, out),
        "data.dataset_name=arithmetic_preference",
        f"dpo.reference_policy_kl_penalty={args.beta}",
        f"dpo.max_num_steps={args.steps}",
        "dpo.max_num_epochs=1000",
        f"dpo.seed={args.seed}",
    ])


def step_pairs(cfg: DPORunConfig, steps: int) -> tuple[list[dict], list[PreferencePair]]:
    """The rows posttrain trains on, in step order, and their posttrain tokenization."""
    tokenizer = load_tokenizer(cfg.policy)
    rows = load_rows(cfg.data.dataset_name, cfg.data.train_split, arithmetic=cfg.data.arithmetic, seed=cfg.dpo.seed)
    dataset = PreferenceDataset(rows, tokenizer, cfg.data, cfg.policy.max_total_sequence_length)
    indices = [i for step in sampled_indices(len(dataset), cfg, cfg.dpo.seed, steps) for i in step]
    return [rows.rows[i] for i in indices], [dataset[i] for i in indices]


def run_posttrain(cfg: DPORunConfig, pairs_per_step: list[int], warmup: int) -> dict:
    clock = StepClock()
    result = run_dpo(cfg, console=Console(quiet=True), on_step=lambda step, metrics: clock.tick())
    last = result.train_metrics[max(result.train_metrics)]
    return {"rate": clock.rate(pairs_per_step, warmup), "unit": "pairs/s",
            "final_loss": last["train/loss"], "final_reward_accuracy": last["train/reward_accuracy"]}


def run_trl(args: argparse.Namespace, model_dir: Path, out: Path, rows: list[dict],
            pairs: list[PreferencePair], pairs_per_step: list[int]) -> dict:
    import datasets
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    conversational = datasets.Dataset.from_list([
        {"prompt": [{"role": "user", "content": row["prompt"]}],
         "chosen": [{"role": "assistant", "content": row["chosen"]}],
         "rejected": [{"role": "assistant", "content": row["rejected"]}]}
        for row in rows
    ])
    config = DPOConfig(**trl_arguments(args, out), beta=args.beta, loss_type=["sigmoid"])
    trainer = DPOTrainer(model=str(model_dir), args=config, train_dataset=conversational,
                         processing_class=AutoTokenizer.from_pretrained(model_dir))
    check_same_tokens(trainer.train_dataset, pairs)
    clock, history = train_trl(trainer)
    last = [entry for entry in history if "loss" in entry][-1]
    return {"rate": clock.rate(pairs_per_step, args.warmup), "unit": "pairs/s",
            "final_loss": last["loss"], "final_reward_accuracy": last["rewards/accuracies"]}


def check_same_tokens(trl_dataset, pairs: list[PreferencePair]) -> None:
    """TRL's prepared pairs must be posttrain's, token for token and target for target."""
    if len(trl_dataset) != len(pairs):
        raise AssertionError(f"TRL has {len(trl_dataset)} pairs, posttrain {len(pairs)}")
    for i, (theirs, ours) in enumerate(zip(trl_dataset, pairs, strict=True)):
        prompt = theirs["prompt_ids"]
        for side, sample in (("chosen", ours.chosen), ("rejected", ours.rejected)):
            reply = theirs[f"{side}_ids"]
            targets = [0] * len(prompt) + [1] * len(reply)
            if prompt + reply != sample.input_ids or targets != sample.loss_mask:
                raise AssertionError(f"pair {i} ({side}): TRL and posttrain tokenize differently:\n"
                                     f"  TRL       {prompt + reply} targets {targets}\n"
                                     f"  posttrain {sample.input_ids} targets {sample.loss_mask}")


def main(argv: list[str] | None = None) -> dict:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]), lr=5e-4)
    parser.add_argument("--beta", type=float, default=0.1, help="DPO beta (scale of the implicit reward)")
    args = parser.parse_args(argv)
    if args.global_batch % args.micro_batch:
        parser.error("--global-batch must be a multiple of --micro-batch")
    quiet_hf()
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp, torch_threads(args.threads):
        work = Path(args.workdir or tmp)
        model_dir = save_tiny_model(work / "model", size=args.size)
        cfg = posttrain_config(args, model_dir, work / "posttrain")
        rows, pairs = step_pairs(cfg, args.steps)
        pairs_per_step = [args.global_batch] * args.steps
        tokens = sum(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in pairs)

        return compare("DPO: posttrain vs TRL DPOTrainer", {
            "setup": f"tiny '{args.size}' model (qwen2, random init), arithmetic_preference pairs, {args.steps} steps "
                     f"of {args.global_batch} pairs (micro-batch {args.micro_batch} pairs), sigmoid loss, beta "
                     f"{args.beta}, lr {args.lr} linear decay, max length {args.max_length}, fp32, seed {args.seed}; "
                     f"timed steps {args.warmup + 1}..{args.steps}"
                     + ("; torch.compile in both" if args.compile else ""),
            "tokens": f"{len(pairs)} pairs, {tokens} non-pad tokens (chosen + rejected); TRL's tokenization is "
                      "checked to be posttrain's before each TRL run",
            "posttrain": POSTTRAIN_SETTINGS,
            "TRL": TRL_SETTINGS,
        }, {
            "posttrain": lambda: run_posttrain(posttrain_config(args, model_dir, fresh(work, "posttrain")),
                                               pairs_per_step, args.warmup),
            "trl": lambda: run_trl(args, model_dir, fresh(work, "trl"), rows, pairs, pairs_per_step),
        }, args.repeats, METRICS, "Result (preference pairs/s over the timed steps):")


if __name__ == "__main__":
    main()

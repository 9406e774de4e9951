"""GRPO step time, posttrain vs Hugging Face TRL's GRPOTrainer (use_vllm off), same model, task and settings.

    python -m bench.grpo_vs_trl [--size demo] [--steps 10] [--repeats 3] [--sft-steps 300] ...

Both start from the same locally built tiny model, first taught the arithmetic task by a short
SFT on the demo's sloppy teacher (so the reward can rise; `--sft-steps 0` starts from the random
model), and train on the same prompts with the same reward: posttrain's math verifier, called in
posttrain's environment actor and, for TRL, in its reward function. The settings are the same:
prompts per step, generations per prompt, max completion length, temperature 1, learning rate
(constant), AdamW betas/eps, no weight decay, gradient clipping, beta (KL), clip epsilon, one pass
over each rollout split into `--minibatches` optimizer steps, group-normalised advantages with the
group mean as baseline, token-level loss over the batch (TRL's `dapo`), fp32 on CPU, seed.

Step time is the wall time between consecutive step ends (generation, scoring, advantages,
training, weight sync, logging), median over the timed steps; Ray and model start-up are left
out. The reward each library reaches is printed beside it, so speed is not bought with worse
learning (the two sample differently, so rewards agree only statistically).

TRL settings beyond its defaults, and why: `use_cpu=True, bf16=False` (fp32, as posttrain);
`activation_checkpointing=False` (on by default in TRL, off in posttrain: the like-for-like and
faster choice for TRL);
`loss_type="dapo"`, `scale_rewards="group"`, `beta` and `epsilon` spelled out although they are
TRL's defaults; `lr_scheduler_type="constant"`, `weight_decay=0`; `logging_steps=1`,
`save_strategy="no"`, `report_to="none"` and no console progress output, as for posttrain.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from rich.console import Console

from bench.common import (
    StepClock,
    alternate,
    fresh,
    machine_info,
    print_machine_info,
    quiet_hf,
    torch_threads,
    train_trl,
)
from posttrain.config import EnvConfig, GRPORunConfig, SFTRunConfig, load_config
from posttrain.data.prompts import PromptDataset
from posttrain.data.sources import load_rows
from posttrain.demo.run import SFT_OVERRIDES, TASK_OVERRIDES
from posttrain.demo.tiny_model import save_tiny_model
from posttrain.envs import make_environment
from posttrain.loops.grpo import run_grpo
from posttrain.loops.sft import run_sft
from posttrain.train.model import load_tokenizer

MAX_GRAD_NORM = 1.0
BETAS = (0.9, 0.999)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="demo", help="tiny model size: test, demo or small")
    parser.add_argument("--sft-steps", type=int, default=300, help="SFT steps before GRPO (0: the random model)")
    parser.add_argument("--steps", type=int, default=20, help="GRPO steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="leading steps left out of the timing")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each library, alternating")
    parser.add_argument("--prompts", type=int, default=32, help="prompts per step")
    parser.add_argument("--generations", type=int, default=8, help="generations per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="max completion length")
    parser.add_argument("--minibatches", type=int, default=1, help="optimizer steps per rollout")
    parser.add_argument("--micro-batch", type=int, default=128, help="sequences per forward/backward")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--beta", type=float, default=0.0, help="KL penalty (0: no reference model)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (each posttrain actor too)")
    parser.add_argument("--workdir", default=None, help="model and run folders (default: a temporary folder)")
    parser.add_argument("--backend", default="hf", choices=["hf", "vllm"], help="posttrain's generation backend")
    args = parser.parse_args(argv)
    rollout = args.prompts * args.generations
    if rollout % args.minibatches or (rollout // args.minibatches) % args.micro_batch:
        parser.error("prompts x generations must split into --minibatches of whole --micro-batch sizes")
    return args


def starting_model(args: argparse.Namespace, work: Path) -> Path:
    """The tiny model, after `--sft-steps` of the demo's SFT (the same start for both libraries)."""
    model_dir = save_tiny_model(work / "model", size=args.size)
    if args.sft_steps == 0:
        return model_dir
    cfg = load_config(SFTRunConfig, None, [
        f"policy.model_name={model_dir}", *TASK_OVERRIDES, *SFT_OVERRIDES,
        f"sft.max_num_steps={args.sft_steps}", "sft.val_period=0", "logger.console_period=0",
        f"logger.log_dir={work / 'sft' / 'logs'}", f"checkpointing.checkpoint_dir={work / 'sft' / 'checkpoints'}",
    ])
    return run_sft(cfg, console=Console(quiet=True)).final_model_dir


def posttrain_config(args: argparse.Namespace, model_dir: Path, out: Path) -> GRPORunConfig:
    rollout = args.prompts * args.generations
    return load_config(GRPORunConfig, None, [
        f"policy.model_name={model_dir}", *TASK_OVERRIDES,
        "policy.device=cpu",
        "policy.precision=float32",
        f"policy.train_global_batch_size={rollout // args.minibatches}",
        f"policy.train_micro_batch_size={args.micro_batch}",
        f"policy.max_grad_norm={MAX_GRAD_NORM}",
        f"policy.optimizer.lr={args.lr}",
        "policy.optimizer.weight_decay=0.0",
        f"policy.optimizer.betas=[{BETAS[0]},{BETAS[1]}]",
        "policy.scheduler.name=constant",
        f"policy.generation.max_new_tokens={args.max_new_tokens}",
        "policy.generation.temperature=1.0",
        f"policy.generation.batch_size={rollout}",
        f"policy.generation.backend={args.backend}",
        "policy.generation.vllm.enforce_eager=true",  # a CPU: no compilation
        f"grpo.num_prompts_per_step={args.prompts}",
        f"grpo.num_generations_per_prompt={args.generations}",
        f"grpo.max_num_steps={args.steps}",
        "grpo.use_leave_one_out_baseline=false",  # TRL's baseline is the group mean
        "grpo.normalize_rewards=true",
        "grpo.val_period=0",
        "grpo.val_at_start=false",
        f"grpo.seed={args.seed}",
        f"loss_fn.reference_policy_kl_penalty={args.beta}",
        "loss_fn.ratio_clip_min=0.2",
        "loss_fn.ratio_clip_max=0.2",
        "loss_fn.token_level_loss=true",
        "logger.console_period=0",
        "logger.tensorboard_enabled=false",  # TRL reports nowhere either (report_to="none")
        f"logger.log_dir={out / 'logs'}",
        f"checkpointing.checkpoint_dir={out / 'checkpoints'}",
        "checkpointing.enabled=false",
    ])


def step_seconds(clock: StepClock, warmup: int) -> float:
    """Median wall time between consecutive step ends, after `warmup` steps (a 1-step run: its whole time)."""
    ends = [clock.start, *clock.ends]
    durations = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    return statistics.median(durations[min(warmup, len(durations) - 1):])


def reward_summary(rewards: list[float]) -> dict[str, float]:
    head = rewards[: max(1, len(rewards) // 3)]
    tail = rewards[-max(1, len(rewards) // 3):]
    return {"reward_start": statistics.fmean(head), "reward_end": statistics.fmean(tail)}


def run_posttrain(args: argparse.Namespace, model_dir: Path, out: Path) -> dict:
    clock = StepClock()
    result = run_grpo(posttrain_config(args, model_dir, out), console=Console(quiet=True),
                      on_step=lambda step, metrics: clock.tick())
    rewards = [result.train_rewards[s] for s in sorted(result.train_rewards)]
    return {"rate": step_seconds(clock, args.warmup), "unit": "s/step", **reward_summary(rewards)}


def run_trl(args: argparse.Namespace, model_dir: Path, out: Path, cfg: GRPORunConfig) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = load_tokenizer(cfg.policy)
    max_prompt = cfg.policy.max_total_sequence_length - args.max_new_tokens
    prompts = PromptDataset(load_rows(cfg.data.dataset_name, cfg.data.train_split, arithmetic=cfg.data.arithmetic,
                                      seed=cfg.grpo.seed), tokenizer, cfg.data, max_prompt)
    dataset = datasets.Dataset.from_list([{"prompt": prompts[i].messages, "answer": prompts[i].metadata["answer"]}
                                          for i in range(len(prompts))])
    env = make_environment(EnvConfig(name="math"))  # posttrain's verifier, the same reward for both

    def verifier_reward(prompts, completions, answer, **_) -> list[float]:
        responses = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return env.step(prompts, responses, [{"answer": a} for a in answer]).rewards

    rollout = args.prompts * args.generations
    accumulation = rollout // args.minibatches // args.micro_batch
    config = GRPOConfig(
        output_dir=str(out), use_cpu=True, bf16=False, activation_checkpointing=False, seed=args.seed, max_steps=args.steps * args.minibatches,
        per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=accumulation,
        steps_per_generation=accumulation * args.minibatches,  # one rollout of prompts x generations
        num_generations=args.generations, max_completion_length=args.max_new_tokens, temperature=1.0,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=1e-8, max_grad_norm=MAX_GRAD_NORM,
        beta=args.beta, epsilon=0.2, num_iterations=1, loss_type="dapo", scale_rewards="group",
        use_vllm=False, logging_steps=1, save_strategy="no", report_to="none",
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    trainer = GRPOTrainer(model=model, reward_funcs=verifier_reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer)
    clock, history = train_trl(trainer)
    if args.minibatches > 1:  # TRL ticks per optimizer step; a GRPO step is one rollout
        clock.ends = clock.ends[args.minibatches - 1 :: args.minibatches]
    rewards = [entry["reward"] for entry in history if "reward" in entry][:: args.minibatches]
    return {"rate": step_seconds(clock, args.warmup), "unit": "s/step", **reward_summary(rewards)}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    quiet_hf()
    with tempfile.TemporaryDirectory(prefix="bench-grpo-") as tmp, torch_threads(args.threads):
        work = Path(args.workdir or tmp)
        info = machine_info()
        print(f"GRPO: posttrain ({args.backend} generation) vs TRL GRPOTrainer (use_vllm off)")
        print_machine_info(info)
        model_dir = starting_model(args, work)
        cfg = posttrain_config(args, model_dir, work / "posttrain")
        print(f"  setup         tiny '{args.size}' model (qwen2) after {args.sft_steps} SFT steps; arithmetic task; "
              f"{args.steps} steps of {args.prompts} prompts x {args.generations} generations, max {args.max_new_tokens} "
              f"new tokens, {args.minibatches} optimizer step(s) per rollout (micro-batch {args.micro_batch}), lr "
              f"{args.lr} constant, beta {args.beta}, fp32, seed {args.seed}; timed steps {args.warmup + 1}..{args.steps}")
        runs = alternate({
            "posttrain": lambda: run_posttrain(args, model_dir, fresh(work, "posttrain")),
            "trl": lambda: run_trl(args, model_dir, fresh(work, "trl"), cfg),
        }, args.repeats)
    summary = {}
    for name, results in runs.items():
        summary[name] = {"seconds_per_step": [r["rate"] for r in results],
                         "median_seconds_per_step": statistics.median(r["rate"] for r in results),
                         "reward_start": statistics.fmean(r["reward_start"] for r in results),
                         "reward_end": statistics.fmean(r["reward_end"] for r in results)}
    summary["ratio"] = summary["posttrain"]["median_seconds_per_step"] / summary["trl"]["median_seconds_per_step"]
    third = max(1, args.steps // 3)
    print(f"Result (median seconds per GRPO step; mean training reward of the first and last {third} steps, "
          f"averaged over repeats):")
    for name in ("posttrain", "trl"):
        s = summary[name]
        runs_text = ", ".join(f"{x:.2f}" for x in s["seconds_per_step"])
        print(f"  {name:<9} median {s['median_seconds_per_step']:6.2f} s/step  (runs: {runs_text})  "
              f"reward {s['reward_start']:.3f} -> {s['reward_end']:.3f}")
    print(f"  step time posttrain/trl: {summary['ratio']:.2f} (target <= 0.5)")
    return {"machine": info, **summary}


if __name__ == "__main__":
    main()

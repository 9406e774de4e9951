"""GRPO on one GPU with a ~0.5B locally built model: generation and training tokens/s, MFU, weight sync.

    python -m bench.gpu_grpo [--backend vllm] [--steps 5] [--prompts 64] [--generations 8] [--max-new-tokens 256]

Runs the real GRPO loop (Ray actors for policy, generation and environment; the Hugging Face or
vLLM generation backend; bf16) for a few steps and reads the per-step timings it logs. The model is built
locally (Qwen2 architecture, 0.48B parameters, the tiny 512-token vocabulary), so no hub access
is needed; a random model rarely stops early, so responses run close to `--max-new-tokens`.

- generation tokens/s: response tokens of the step / `time/generation_s`
- training tokens/s: prompt + response tokens of the step / `time/training_s` (forward, backward
  and optimizer; each group's prompt is packed once, but counted once per response here, as a
  trainer without packing would process it)
- MFU: 6 x parameters x tokens actually processed per second (each group's prompt once) / the
  GPU's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s)
- weight sync: `time/weight_sync_s`, policy actor -> object store -> generation actor

`--device cpu --size test` runs the same code on a CPU (the smoke test does); MFU is then not printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from rich.console import Console

from bench.common import machine_info, print_machine_info
from posttrain.config import GRPORunConfig, load_config
from posttrain.demo.tiny_model import save_tiny_model
from posttrain.logging.throughput import gpu_peak_flops
from posttrain.loops.grpo import run_grpo


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="0.5b", help="locally built model size (see posttrain tiny-model)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--backend", default="hf", choices=["hf", "vllm"], help="generation backend")
    parser.add_argument("--steps", type=int, default=5, help="GRPO steps; the first is left out as warm-up")
    parser.add_argument("--prompts", type=int, default=64, help="prompts per step")
    parser.add_argument("--generations", type=int, default=8, help="generations per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=32, help="sequences per forward/backward")
    parser.add_argument("--generation-batch", type=int, default=256, help="sequences per generate call")
    parser.add_argument("--workdir", default=None)
    return parser.parse_args(argv)


def config(args: argparse.Namespace, model_dir: Path, out: Path) -> GRPORunConfig:
    gpu = args.device == "cuda"
    rollout = args.prompts * args.generations
    return load_config(GRPORunConfig, None, [
        f"policy.model_name={model_dir}",
        f"policy.device={args.device}",
        f"policy.precision={'bfloat16' if gpu else 'float32'}",
        f"policy.max_total_sequence_length={64 + args.max_new_tokens}",
        f"policy.train_global_batch_size={rollout}",
        f"policy.train_micro_batch_size={args.micro_batch}",
        "policy.optimizer.lr=1e-6",
        "policy.scheduler.name=constant",
        f"policy.generation.max_new_tokens={args.max_new_tokens}",
        f"policy.generation.batch_size={args.generation_batch}",
        f"policy.generation.backend={args.backend}",
        f"policy.generation.vllm.enforce_eager={not gpu}",  # on a CPU, compiling costs more than it saves
        "policy.generation.temperature=1.0",
        f"data.arithmetic.num_train={rollout * args.steps}",
        f"grpo.num_prompts_per_step={args.prompts}",
        f"grpo.num_generations_per_prompt={args.generations}",
        f"grpo.max_num_steps={args.steps}",
        "grpo.val_period=0",
        "grpo.val_at_start=false",
        "loss_fn.reference_policy_kl_penalty=0.0",
        f"cluster.gpus_per_node={1 if gpu else 0}",
        "logger.console_period=0",
        "logger.tensorboard_enabled=false",
        f"logger.log_dir={out / 'logs'}",
        "checkpointing.enabled=false",
        f"checkpointing.checkpoint_dir={out / 'checkpoints'}",
    ])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --device cpu --size test for a smoke run")
    with tempfile.TemporaryDirectory(prefix="bench-gpu-grpo-") as tmp:
        work = Path(args.workdir or tmp)
        model_dir = save_tiny_model(work / "model", size=args.size)
        num_params = _count_parameters(model_dir)
        info = machine_info()
        device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
        info["device"] = device_name
        print(f"GRPO on one accelerator: posttrain, {args.backend} generation backend")
        print_machine_info(info)
        print(f"  setup         locally built qwen2 '{args.size}' ({num_params / 1e6:,.1f}M parameters), "
              f"{args.prompts} prompts x {args.generations} generations, max {args.max_new_tokens} new tokens, "
              f"micro-batch {args.micro_batch}, {args.steps} steps (first left out)")
        cfg = config(args, model_dir, work / "run")
        prompt_tokens = _mean_prompt_length(cfg)
        run_grpo(cfg, console=Console(quiet=True))
        steps = [json.loads(line) for line in (Path(cfg.logger.log_dir) / "metrics.jsonl").read_text().splitlines()]
    timed = [s for s in steps if "time/training_s" in s][1:] or [s for s in steps if "time/training_s" in s]
    rollout = args.prompts * args.generations
    gen_rates, train_rates, processed_rates, syncs, step_times = [], [], [], [], []
    for s in timed:
        response_tokens = s["rollout/response_length_mean"] * rollout
        gen_rates.append(response_tokens / s["time/generation_s"])
        train_rates.append((response_tokens + prompt_tokens * rollout) / s["time/training_s"])
        processed_rates.append((response_tokens + prompt_tokens * args.prompts) / s["time/training_s"])
        syncs.append(s["time/weight_sync_s"])
        step_times.append(s["time/step_s"])
    result = {
        "machine": info,
        "parameters": num_params,
        "generation_tokens_per_s": statistics.median(gen_rates),
        "training_tokens_per_s": statistics.median(train_rates),
        "weight_sync_s": statistics.median(syncs),
        "step_s": statistics.median(step_times),
        "response_length_mean": statistics.fmean(s["rollout/response_length_mean"] for s in timed),
    }
    peak = gpu_peak_flops(device_name) if args.device == "cuda" else None
    # MFU from the tokens the GPU actually processed: each group's prompt once (it is packed).
    result["mfu"] = 6 * num_params * statistics.median(processed_rates) / peak if peak else None
    print("Result (medians over the timed steps):")
    print(f"  generation     {result['generation_tokens_per_s']:12.0f} tokens/s  "
          f"(mean response {result['response_length_mean']:.0f} tokens)")
    print(f"  training       {result['training_tokens_per_s']:12.0f} tokens/s"
          + (f"  MFU {result['mfu']:.1%}" if result["mfu"] is not None else ""))
    print(f"  weight sync    {result['weight_sync_s']:12.3f} s")
    print(f"  whole step     {result['step_s']:12.2f} s")
    return result


def _mean_prompt_length(cfg: GRPORunConfig) -> float:
    from posttrain.data.prompts import PromptDataset
    from posttrain.data.sources import load_rows
    from posttrain.train.model import load_tokenizer

    prompts = PromptDataset(load_rows(cfg.data.dataset_name, cfg.data.train_split, arithmetic=cfg.data.arithmetic),
                            load_tokenizer(cfg.policy), cfg.data, cfg.policy.max_total_sequence_length)
    return statistics.fmean(len(prompts[i].token_ids) for i in range(len(prompts)))


def _count_parameters(model_dir: Path) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    main()

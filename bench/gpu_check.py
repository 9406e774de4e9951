"""What only a GPU can show, on a machine with torch, transformers and peft but no Ray and no vLLM.

    python -m bench.gpu_check [--out results.json] [--size 0.5b]
    python -m bench.gpu_check --device cpu --size test --length 64   (a dry run of the same code, as the tests do)

Each check runs posttrain's own layers directly (no Ray actors) and records its figures; a check
that raises is recorded as failed and the others still run. The exit status is 1 when any failed.

1. collectives: a 1-rank NCCL group under the collective checker (every tensor must be on CUDA):
   the Policy's all-reduces, FSDP2's gathers and reduce-scatters, the weight-transfer group.
2. training: `Policy` SFT and GRPO-objective steps in bf16 on the locally built model; tokens/s, MFU.
3. log-probs: peak GPU memory of the GRPO log-prob forward and backward over one micro-batch.
4. generation: Hugging Face generation tokens/s in bf16, and the generator/trainer log-prob mismatch.
5. colocation: the policy's optimizer state off the GPU and back (memory freed, seconds), and one
   colocated weight sync of the model to a second process through CUDA IPC handles, checked
   tensor by tensor, with its time.
6. environment models, as GRPO's own workers hold them: a reward model's copy in bf16 on the GPU
   (its scores against an fp32 copy) and the judge's chat replies.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoTokenizer

from posttrain.algos.grpo import GRPOObjective
from posttrain.algos.sft import nll_loss
from posttrain.config import GRPORunConfig, JudgeConfig, PolicyConfig
from posttrain.data.collate import make_micro_batches
from posttrain.data.conversations import Sample
from posttrain.data.trajectories import Trajectory, collate_trajectories
from posttrain.demo.tiny_model import save_reward_model, save_tiny_model
from posttrain.envs.reward_model_env import RewardModelScorer
from posttrain.logging.throughput import gpu_peak_flops
from posttrain.rollout.base import SamplingParams
from posttrain.rollout.chat_model import ChatModel
from posttrain.rollout.hf import HFGenerationBackend
from posttrain.train import weight_transfer
from posttrain.train.collective_check import checked_collectives
from posttrain.train.fsdp import full_model_state, shard_model
from posttrain.train.logprobs import response_logprobs, sequence_logprobs
from posttrain.train.model import load_model
from posttrain.train.policy import Policy


def _samples(count: int, length: int, vocab: int) -> list[Sample]:
    generator = torch.Generator().manual_seed(0)
    return [Sample(torch.randint(3, vocab, (length,), generator=generator).tolist(), [0] * 8 + [1] * (length - 8))
            for _ in range(count)]


def _trajectories(groups: int, size: int, prompt: int, response: int, vocab: int) -> list[Trajectory]:
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(groups):
        prompt_ids = torch.randint(3, vocab, (prompt,), generator=generator).tolist()
        for j in range(size):
            ids = torch.randint(3, vocab, (response,), generator=generator).tolist()
            out.append(Trajectory(prompt_ids, ids, [-1.0] * response, 1.0 if j % 2 else -1.0))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of `fn()` over `repeats` runs after one warm-up, with the GPU synchronised."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def check_collectives(small_model: Path, device: torch.device) -> dict:
    if device.type == "cuda":
        dist.init_process_group("nccl", init_method=weight_transfer.local_address(), rank=0, world_size=1, device_id=device)
    else:
        dist.init_process_group("gloo", init_method=weight_transfer.local_address(), rank=0, world_size=1)
    try:
        cfg = PolicyConfig(model_name=str(small_model), precision="bfloat16")
        policy = Policy(cfg, 4, device=device, process_group=dist.group.WORLD)
        batches = make_micro_batches(_samples(4, 32, 400), 2, policy.tokenizer.pad_token_id)
        objective = lambda m, b: nll_loss(*sequence_logprobs(m, b), 4 * 24)  # noqa: E731
        sharded = load_model(cfg, device)
        shard_model(sharded, dist.group.WORLD, device)  # FSDP2 on a 1-rank mesh: its NCCL collectives
        with checked_collectives() as log:
            policy.train_step(batches, objective)
            policy.evaluate(batches, objective)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                objective(sharded, {k: v.to(device) for k, v in batches[0].items()}).backward()
            full_model_state(sharded)
            tensors = dict(policy.generator_tensors())
            specs = [weight_transfer.TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
            group = weight_transfer.open_group(weight_transfer.local_address(), 0, 1, device)
            buckets = weight_transfer.plan_buckets(specs, 2**20)
            weight_transfer.send_buckets(group, iter(tensors.items()), buckets, device)
        return {"calls": sorted(set(log.calls)), "transfer_bytes": sum(map(weight_transfer.bucket_nbytes, buckets))}
    finally:
        dist.destroy_process_group()


def check_training(model_dir: Path, repeats: int, device: torch.device, length: int) -> dict:
    """`length`: tokens per SFT sequence and per GRPO episode (a quarter of it the shared prompt)."""
    cfg = PolicyConfig(model_name=str(model_dir), precision="bfloat16")
    policy = Policy(cfg, 100, device=device)
    params, vocab = policy.num_parameters, policy.model.config.vocab_size
    peak = gpu_peak_flops(torch.cuda.get_device_name()) if device.type == "cuda" else None
    out = {"parameters": params}
    samples = _samples(16, length, vocab)
    batches = make_micro_batches(samples, 4, policy.tokenizer.pad_token_id)
    tokens = sum(len(s.input_ids) for s in samples)
    objective = lambda m, b: nll_loss(*sequence_logprobs(m, b), tokens)  # noqa: E731
    seconds = _timed(lambda: policy.train_step(batches, objective), repeats, device)
    out["sft_tokens_per_s"] = tokens / seconds
    prompt = length // 4
    trajectories = _trajectories(4, 8, prompt, length - prompt, vocab)
    grpo = GRPOObjective.from_config(GRPORunConfig().loss_fn, functools.partial(response_logprobs, entropy=True),
                                     max_response_length=length - prompt)
    micro = [collate_trajectories(trajectories[i:i + 8], policy.tokenizer.pad_token_id, policy.supports_shared_prefix)
             for i in range(0, len(trajectories), 8)]
    step = grpo.for_step(float(sum(t.num_trained for t in trajectories)), float(len(trajectories)))
    seconds = _timed(lambda: policy.train_step(micro, step), repeats, device)
    counted = sum(len(t.prompt_ids) + len(t.response_ids) for t in trajectories)
    processed = 4 * prompt + sum(len(t.response_ids) for t in trajectories)  # each group's prompt once
    out["grpo_tokens_per_s"] = counted / seconds
    if peak:
        out["sft_mfu"] = 6 * params * out["sft_tokens_per_s"] / peak
        out["grpo_mfu"] = 6 * params * processed / seconds / peak
    return out


def check_logprob_memory(model_dir: Path, device: torch.device) -> dict:
    if device.type != "cuda":
        return {"skipped": "GPU memory only"}
    cfg = PolicyConfig(model_name=str(model_dir), precision="bfloat16")
    policy = Policy(cfg, 1, device=device)
    vocab = policy.model.config.vocab_size
    batch = collate_trajectories(_trajectories(1, 8, 256, 1024, vocab), policy.tokenizer.pad_token_id,
                                 policy.supports_shared_prefix)
    batch = {k: v.to(device) for k, v in batch.items()}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logprobs, _ = response_logprobs(policy.model, batch)
    logprobs.sum().backward()
    torch.cuda.synchronize()
    positions = int(batch["loss_mask"].sum())
    return {"positions": positions, "vocab": vocab, "peak_above_model_gb": (torch.cuda.max_memory_allocated() - before) / 1e9,
            "fp32_logits_copy_gb": positions * vocab * 4 / 1e9}


def check_generation(model_dir: Path, device: torch.device, length: int) -> dict:
    cfg = PolicyConfig(model_name=str(model_dir), precision="bfloat16")
    cfg.generation.batch_size = 64
    backend = HFGenerationBackend(cfg, device=device)
    vocab = backend.model.config.vocab_size
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, vocab, (64,), generator=generator).tolist() for _ in range(64)]
    params = SamplingParams(max_new_tokens=length // 4, temperature=1.0, seed=0)
    backend.generate(prompts[:4], params)  # warm-up
    _sync(device)
    start = time.perf_counter()
    completions = backend.generate(prompts, params)
    _sync(device)
    seconds = time.perf_counter() - start
    new_tokens = sum(len(c.token_ids) for c in completions)
    trajectories = [Trajectory(p, c.token_ids, c.logprobs, 0.0) for p, c in zip(prompts, completions, strict=True)]
    policy = Policy(cfg, 1, device=device)
    policy.model.eval()
    differences = []
    for i in range(0, len(trajectories), 16):
        batch = collate_trajectories(trajectories[i:i + 16], policy.tokenizer.pad_token_id, policy.supports_shared_prefix)
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            trainer, _ = response_logprobs(policy.model, batch)
        mask = batch["loss_mask"].bool()
        differences.append((trainer - batch["generator_logprobs"]).abs()[mask])
    difference = torch.cat(differences)
    return {"generation_tokens_per_s": new_tokens / seconds, "new_tokens": new_tokens,
            "logprob_mismatch_mean": float(difference.mean()), "logprob_mismatch_max": float(difference.max())}


def _colocated_generator(address: str, key: bytes, buckets: list, queue) -> None:
    """A colocated generator's side of one weight sync: each tensor read in place, its checksum sent back."""
    store = weight_transfer.connect_store(address, timeout_s=120)
    queue.put({name: float(view.double().sum())
               for name, view in weight_transfer.receive_shared_buckets(store, key, buckets, 1, slot=0)})


def check_colocation(model_dir: Path, device: torch.device) -> dict:
    """The colocated step's two hand-overs on one device: the policy's optimizer state off the GPU
    and back (`Policy.offload_optimizer`), and one weight sync in place to a second process through
    `weight_transfer.share_buckets` (CUDA IPC on a GPU, shared memory on a CPU)."""
    cfg = PolicyConfig(model_name=str(model_dir), precision="bfloat16")
    policy = Policy(cfg, 10, device=device)
    batches = make_micro_batches(_samples(2, 64, policy.model.config.vocab_size), 2, policy.tokenizer.pad_token_id)
    policy.train_step(batches, lambda m, b: nll_loss(*sequence_logprobs(m, b), 2 * 56))  # the optimizer state exists
    out: dict = {}
    allocated = (lambda: torch.cuda.memory_allocated(device)) if device.type == "cuda" else (lambda: 0)
    _sync(device)
    before, start = allocated(), time.perf_counter()
    policy.offload_optimizer()
    _sync(device)
    out["offload_s"], out["offload_freed_gb"] = time.perf_counter() - start, (before - allocated()) / 1e9
    start = time.perf_counter()
    policy.onload_optimizer()
    _sync(device)
    out["onload_s"] = time.perf_counter() - start
    policy.offload_optimizer()  # as before a sync in a colocated step

    specs = [weight_transfer.TensorSpec(n, tuple(t.shape), t.dtype) for n, t in policy.generator_tensors()]
    buckets = weight_transfer.plan_buckets(specs, 512 * 2**20)
    address, key = weight_transfer.local_address(), weight_transfer.new_key()
    store = weight_transfer.serve_store(address, timeout_s=120)
    context = mp.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_colocated_generator, args=(address, key, buckets, queue))
    child.start()
    try:
        start = time.perf_counter()
        weight_transfer.share_buckets(store, key, policy.generator_tensors(), buckets, device, 1, receivers=1)
        out["weight_sync_s"] = time.perf_counter() - start
        received = queue.get(timeout=120)
    finally:
        child.join(timeout=60)
    expected = {name: float(tensor.double().sum()) for name, tensor in policy.generator_tensors()}
    wrong = [name for name in expected if abs(received.get(name, float("nan")) - expected[name])
             > 1e-6 * max(1.0, abs(expected[name]))]
    if wrong or list(received) != list(expected):
        raise RuntimeError(f"the colocated generator read other weights than the policy's: {wrong[:5]}")
    out["weight_sync_bytes"] = sum(weight_transfer.bucket_nbytes(b) for b in buckets)
    return out


def check_environment_models(small_model: Path) -> dict:
    """A reward model (the small model with a fresh score head) scored in bf16 and fp32 on the
    default device, as a reward-model worker loads it, and the judge's replies to eight questions."""
    folder = save_reward_model(small_model, small_model.parent / "reward_model")
    samples = _samples(8, 32, AutoTokenizer.from_pretrained(folder).vocab_size)
    half, full = RewardModelScorer(str(folder), "bfloat16", 8), RewardModelScorer(str(folder), "float32", 8)
    difference = max(abs(a - b) for a, b in zip(half.score(samples), full.score(samples), strict=True))
    judge = ChatModel(JudgeConfig(model_name=str(small_model), max_new_tokens=16), "bfloat16")
    start = time.perf_counter()
    replies = judge.chat([[{"role": "user", "content": f"Is {i} + {i} = {2 * i}?"}] for i in range(8)])
    return {"reward_model_device": str(half.device), "reward_bf16_vs_fp32_max_diff": difference,
            "judge_device": str(judge.backend.device), "judge_replies": len(replies),
            "judge_s": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="0.5b")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--length", type=int, default=512, help="tokens per training sequence")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: this check is for a GPU machine (--device cpu: a dry run)", file=sys.stderr)
        return 2
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    workdir = Path(tempfile.mkdtemp(prefix="posttrain-gpu-check-"))
    small = save_tiny_model(workdir / "test", size="test")
    model = save_tiny_model(workdir / args.size, size=args.size)
    results: dict = {"torch": torch.__version__, "cuda": torch.version.cuda,
                     "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}
    checks = {"collectives": lambda: check_collectives(small, device),
              "training": lambda: check_training(model, args.repeats, device, args.length),
              "logprob_memory": lambda: check_logprob_memory(model, device),
              "generation": lambda: check_generation(model, device, args.length), "colocation": lambda: check_colocation(model, device),
              "environment_models": lambda: check_environment_models(small)}
    failed = []
    for name, check in checks.items():
        start = time.perf_counter()
        try:
            results[name] = {**check(), "ok": True}
        except Exception as err:  # noqa: BLE001 - every check runs; each failure is recorded with its traceback
            failed.append(name)
            results[name] = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        results[name]["check_seconds"] = time.perf_counter() - start
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps({name: results[name]}, default=str), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print("FAILED: " + ", ".join(failed) if failed else "all checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

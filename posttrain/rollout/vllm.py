"""Generation with vLLM: paged KV cache, continuous batching, prefix caching; weights updated in place.

The engine runs inside this process (a generation actor), not in a child process of its own, so
`load_weights` hands the trainer's tensors to the model directly as they arrive (bucket by bucket
from the weight-transfer group, see `posttrain.train.weight_transfer`), with no serialisation. A
tensor-parallel engine (`vllm.tensor_parallel_size` > 1) runs its shards in worker processes of
its own, which vLLM cannot pass tensors to, so this process hands each bucket on to them in
place, as a colocated policy rank does to its generators (shared memory on a CPU, CUDA IPC on a
GPU; at most two buckets out at once), and each shard loads its part of it. (vLLM's own
weight-transfer engines serve only its GPU workers, not the CPU build this is tested with.) vLLM
is optional (`pip install 'posttrain[vllm]'`) and imported only when this backend is built.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable

import numpy as np
import torch
from transformers import AutoConfig, GenerationConfig

from posttrain.config import VLLM_INSTALL_HINT, PolicyConfig
from posttrain.rollout.base import Completion, GenerationBackend, SamplingParams, stop_token_ids
from posttrain.train import weight_transfer
from posttrain.train.model import load_tokenizer, tokenizer_source, weights_source


class VLLMGenerationBackend(GenerationBackend):
    """A generation worker; `rank`/`world_size` let a worker group run several data-parallel copies.
    `device` is taken for the HF backend's signature only: vLLM runs on the platform it was built for."""

    def __init__(self, cfg: PolicyConfig, *, rank: int = 0, world_size: int = 1, weights_path: str | None = None,
                 device: torch.device | None = None):
        # Before vLLM reads its settings: the engine in this process (see the module docstring), and
        # its per-request log lines off (a rollout makes thousands).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        try:
            import vllm
            from vllm.platforms import current_platform
        except ImportError as err:
            raise ImportError(f"{VLLM_INSTALL_HINT} ({err})") from err
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.tokenizer = load_tokenizer(cfg)
        model = weights_source(cfg, weights_path)
        try:
            checkpoint_generation = GenerationConfig.from_pretrained(model)
        except OSError:  # a checkpoint without generation_config.json
            checkpoint_generation = GenerationConfig()
        self.stop_token_ids = stop_token_ids(self.tokenizer, checkpoint_generation, cfg.generation.stop_token_ids)
        options = cfg.generation.vllm
        self.tensor_parallel_size = options.tensor_parallel_size
        if self.tensor_parallel_size > 1:  # the shards' weights come through this actor's store (_load_into_shards)
            self.shard_address, self.shard_key = weight_transfer.local_address(), weight_transfer.new_key()
            self.shard_store, self.shard_syncs = weight_transfer.serve_store(self.shard_address), 0
        # Colocated with the trainer on a GPU: vLLM's sleep mode, so that it can give its memory back
        # while the policy trains (not on a CPU, where there is nothing to give back).
        self.sleep_mode = cfg.generation.colocated.enabled and not current_platform.is_cpu()
        kv_cache_gb, cpu_settings = options.kv_cache_memory_gb, {}
        if current_platform.is_cpu() and self.tensor_parallel_size > 1:
            # vLLM binds each shard's threads to a NUMA node by default and refuses when there are
            # fewer nodes than shards: give each shard an equal part of this process's cores instead.
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", _split_cores(self.tensor_parallel_size))
        if current_platform.is_cpu():
            # vLLM's CPU build would take gpu_memory_utilization of the RAM for its KV cache.
            kv_cache_gb = kv_cache_gb or 1.0
            # It also fails on a seeded request whose prompt is prefilled over several engine steps
            # ("CPU Generator does not use offset"): prefill whole prompts, one step holding a longest one.
            context = options.max_model_len or getattr(
                AutoConfig.from_pretrained(model, trust_remote_code=cfg.trust_remote_code), "max_position_embeddings", 0)
            cpu_settings = {"enable_chunked_prefill": False, "max_num_batched_tokens": max(4096, context)}
        self.llm = vllm.LLM(
            model=model,
            tokenizer=tokenizer_source(cfg),
            dtype=cfg.precision,
            max_model_len=options.max_model_len,
            seed=rank,
            trust_remote_code=cfg.trust_remote_code,
            gpu_memory_utilization=options.gpu_memory_utilization,
            enforce_eager=options.enforce_eager,
            enable_prefix_caching=options.enable_prefix_caching,
            kv_cache_memory_bytes=None if kv_cache_gb is None else int(kv_cache_gb * 2**30),
            # The log-probs of the distribution sampled from (after temperature), as the trainer scores them.
            logprobs_mode="processed_logprobs",
            # Sampling follows SamplingParams alone, not the checkpoint's generation_config.json (whose
            # extras, e.g. a repetition penalty, would change the distribution away from the policy's).
            generation_config="vllm",
            tensor_parallel_size=self.tensor_parallel_size,
            distributed_executor_backend="mp" if self.tensor_parallel_size > 1 else None,
            enable_sleep_mode=self.sleep_mode,
            **cpu_settings,
        )
        self.context_length = self.llm.llm_engine.model_config.max_model_len
        self.sampling_params_cls = vllm.SamplingParams

    @property
    def transfer_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    def sleep(self, level: int) -> None:
        """vLLM's own sleep: the KV cache freed, the weights kept in CPU memory (level 1) or dropped (2)."""
        if self.sleep_mode:
            self.llm.sleep(level=level)

    def wake_up(self) -> None:
        if self.sleep_mode:
            self.llm.wake_up()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]],
                     buckets: list[list[weight_transfer.TensorSpec]] | None = None) -> None:
        # reload_weights copies into the engine's tensors in place (fused QKV and MLP included, under
        # the checkpoint's names) as it consumes the iterator; the prefix cache holds KV computed
        # with the old weights.
        if self.tensor_parallel_size == 1:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights),
                                                              "is_checkpoint_format": True})
        else:
            self._load_into_shards(weights, buckets)
        self.llm.reset_prefix_cache()

    def _load_into_shards(self, weights: Iterable[tuple[str, torch.Tensor]],
                          buckets: list[list[weight_transfer.TensorSpec]] | None) -> None:
        """Each bucket shared in place with every shard process, which loads its part of it: a
        thread here packs the buckets while the shards read them (`_reload_in_shard`)."""
        if buckets is None:  # a whole state dict (the object-store path): planned here
            weights = list(weights)
            specs = [weight_transfer.TensorSpec(name, tuple(t.shape), t.dtype) for name, t in weights]
            buckets = weight_transfer.plan_buckets(specs, self.cfg.generation.refit_bucket_mb * 2**20)
        self.shard_syncs += 1
        failure: list[BaseException] = []

        def share() -> None:
            try:
                weight_transfer.share_buckets(self.shard_store, self.shard_key, iter(weights), buckets,
                                              self.transfer_device, self.shard_syncs, self.tensor_parallel_size)
            except BaseException as err:  # noqa: BLE001 - raised again in the calling thread
                failure.append(err)

        sharer = threading.Thread(target=share, name="posttrain-shard-weights")
        sharer.start()
        try:
            self.llm.collective_rpc(_reload_in_shard, args=(self.shard_address, self.shard_key, buckets,
                                                            self.shard_syncs))
        except BaseException:
            # The shards stopped reading: their unread buckets are given up, so that the sharer ends.
            for slot in range(self.tensor_parallel_size):
                weight_transfer.give_up_buckets(self.shard_store, self.shard_syncs, len(buckets), slot)
            raise
        finally:
            sharer.join()
        if failure:
            raise failure[0]

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        if not prompts:
            return []
        greedy = sampling.temperature == 0
        # One seed per request: its samples depend only on (seed, rank, position in the call), not on
        # how the engine happens to batch requests together.
        seeds = ([None] * len(prompts) if sampling.seed is None else
                 np.random.SeedSequence([sampling.seed, self.rank]).generate_state(len(prompts), np.uint32).tolist())
        params = [self.sampling_params_cls(
            max_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p,
            top_k=0 if greedy or not sampling.top_k else sampling.top_k,
            stop=sampling.stop_strings or None,
            include_stop_str_in_output=True,
            stop_token_ids=self.stop_token_ids,
            logprobs=0,  # the sampled token's only
            seed=seed,
        ) for seed in seeds]
        requests = [{"prompt_token_ids": list(prompt)} for prompt in prompts]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        completions = []
        for output in outputs:
            sample = output.outputs[0]
            ids = list(sample.token_ids)
            logprobs = [step[token].logprob for step, token in zip(sample.logprobs, ids, strict=True)]
            if sample.finish_reason not in ("stop", "length"):  # aborted or failed in the engine
                raise RuntimeError(f"vLLM ended a request with finish_reason={sample.finish_reason!r}")
            reason = sample.finish_reason
            completions.append(Completion(ids, logprobs, reason, self.tokenizer.decode(ids, skip_special_tokens=True)))
        return completions


def _split_cores(parts: int) -> str:
    """This process's cores in `parts` equal runs, as VLLM_CPU_OMP_THREADS_BIND takes them ("0,1|2,3")."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < parts:
        raise ValueError(f"policy.generation.vllm.tensor_parallel_size={parts} needs a core per shard, "
                         f"this process may use {len(cores)}")
    share = len(cores) // parts
    return "|".join(",".join(map(str, cores[i * share:(i + 1) * share])) for i in range(parts))


def _reload_in_shard(worker, address: str, key: bytes, buckets: list[list[weight_transfer.TensorSpec]],
                     sync_id: int) -> None:
    """Runs in each tensor-parallel shard's process (vLLM's `collective_rpc`): the sync's buckets,
    read in place as the engine's actor shares them, loaded into this shard's part of the model."""
    weights = weight_transfer.receive_shared_buckets(weight_transfer.connect_store(address), key, buckets, sync_id,
                                                     worker.rank)
    worker.reload_weights(weights_iterator=weights, is_checkpoint_format=True)

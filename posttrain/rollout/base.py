"""The generation backend interface shared by Hugging Face generate and vLLM."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from posttrain.train import weight_transfer


@dataclass
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int | None = None
    stop_strings: list[str] | None = None
    # When set, the backend reseeds its sampler at the start of the call, so the samples are a pure
    # function of (seed, prompts, weights, worker rank): a resumed run draws what the uninterrupted one did.
    seed: int | None = None


@dataclass
class Completion:
    """One response. Log-probs are of the sampled tokens under the temperature-scaled distribution
    (Hugging Face: before top-p/top-k filtering; vLLM: after it, so GRPO with vLLM allows no
    filter): the same quantity the trainer computes."""

    token_ids: list[int]  # ends with EOS when the model stopped by itself
    logprobs: list[float]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    text: str
    # A multi-turn episode (posttrain.rollout.multi_turn): 1 at sampled tokens, 0 at the environment's
    # (whose log-probs are 0); None when every token was sampled
    mask: list[int] | None = None

    @property
    def num_sampled(self) -> int:
        """Tokens the model sampled, over all turns (not the environment's)."""
        return len(self.token_ids) if self.mask is None else sum(self.mask)


class GenerationBackend(ABC):
    tokenizer: PreTrainedTokenizerBase
    context_length: int | None  # the most tokens a prompt and its response may hold; None if unknown

    @abstractmethod
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        """Complete token-id prompts; one Completion per prompt, in order (so worker groups can shard)."""

    @abstractmethod
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]],
                     buckets: list[list[weight_transfer.TensorSpec]] | None = None) -> None:
        """Load the trainer's latest weights (same architecture and parameter names), consuming
        `weights` one tensor at a time: every weight once, a tied pair through either name.
        `buckets`: the plan they arrive in, when they stream (for a backend that passes them on)."""

    @property
    def transfer_device(self) -> torch.device:
        """Where this worker receives weight buckets: its GPU (NCCL), else the CPU (gloo)."""
        return torch.device("cpu")

    def update_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """The weights as one dict, from Ray's object store (`policy.generation.refit_transport=object_store`)."""
        self.load_weights(state_dict.items())

    def join_weight_transfer(self, address: str, rank: int, world_size: int,
                             buckets: list[list[weight_transfer.TensorSpec]]) -> None:
        """Joins the trainer's transfer group (`posttrain.train.weight_transfer`) as `rank`."""
        self.transfer = weight_transfer.open_group(address, rank, world_size, self.transfer_device), buckets

    def receive_weights(self) -> None:
        """One weight sync over the transfer group, loaded bucket by bucket."""
        group, buckets = self.transfer
        self.load_weights(weight_transfer.receive_buckets(group, buckets, self.transfer_device), buckets)

    def join_shared_weights(self, address: str, key: bytes, slot: int,
                            buckets: list[list[weight_transfer.TensorSpec]]) -> None:
        """Colocated: finds the buckets of the policy rank beside it through that rank's store at
        `address` (announcements signed with `key`), as its `slot`-th receiver."""
        self.shared = weight_transfer.connect_store(address), key, slot, buckets

    def receive_shared_weights(self, sync_id: int) -> None:
        """One colocated weight sync, each bucket read in place (CUDA IPC, or shared memory on a CPU)."""
        store, key, slot, buckets = self.shared
        self.load_weights(weight_transfer.receive_shared_buckets(store, key, buckets, sync_id, slot), buckets)

    @abstractmethod
    def sleep(self, level: int) -> None:
        """Colocated, while the policy trains on this GPU: give its memory back. Level 1 keeps the
        weights (in CPU memory), level 2 drops them (a weight sync follows before the next
        generation). Nothing to give back on a CPU."""

    @abstractmethod
    def wake_up(self) -> None:
        """Ready to generate again after `sleep`."""


def stop_token_ids(tokenizer, checkpoint_generation_config, extra: list[int] | None) -> list[int]:
    """The tokens that end a response: the tokenizer's EOS, the checkpoint's own EOS ids (an instruct
    model's end-of-turn token, e.g. Llama-3's <|eot_id|>) and `policy.generation.stop_token_ids`
    (for a base model whose chat template ends turns with a token its config does not name)."""
    configured = checkpoint_generation_config.eos_token_id
    configured = [configured] if isinstance(configured, int) else list(configured or [])
    ids = [tokenizer.eos_token_id, *configured, *(extra or [])]
    return list(dict.fromkeys(i for i in ids if i is not None))


"""Generation with Hugging Face `generate`: batched, KV cache, left-padded prompts."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.modeling_outputs import CausalLMOutputWithPast

from posttrain.config import PolicyConfig
from posttrain.rollout.base import Completion, GenerationBackend, SamplingParams, stop_token_ids
from posttrain.train import weight_transfer
from posttrain.train.model import DTYPES, load_model, load_tokenizer, resolve_device

# transformers 5.24 renamed the KV cache argument and output field `past_key_values` to `cache`
# (the old name goes in 5.40); use whichever this version has.
CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class StopOnStrings(StoppingCriteria):
    """Stops a row once its *response* contains a stop string.

    transformers' own `stop_strings` also match text that straddles the prompt (a response "\n"
    after a prompt ending in "\n" already "ends with" "\n\n"); vLLM looks at the response only,
    and both backends must agree.
    """

    def __init__(self, tokenizer, stop_strings: list[str], prompt_width: int):
        self.tokenizer, self.stop_strings, self.prompt_width = tokenizer, stop_strings, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width:])
        return torch.tensor([any(s in t for s in self.stop_strings) for t in texts], device=input_ids.device)


class SampledTokenLogprobs:
    """Log-probs of the sampled tokens under the raw logits / temperature, gathered step by step.

    `output_logits=True` would hold a [B, V] tensor per new token until `generate` returns
    (gigabytes with a 150K vocabulary and long responses). Hooks on the model instead keep one
    step's log-softmax until the next forward pass, whose input is the token sampled from it.
    Use as a context manager around `generate` (the hooks are removed on exit), then `of(new_tokens)`.
    """

    def __init__(self, model, temperature: float):
        self.model, self.temperature = model, temperature
        self.pending: torch.Tensor | None = None  # [B, V] of the last forward, its token not yet seen
        self.picked: list[torch.Tensor] = []
        self.hooks: list = []

    def __enter__(self) -> SampledTokenLogprobs:
        self.hooks = [self.model.register_forward_pre_hook(self._on_input, with_kwargs=True),
                      self.model.register_forward_hook(self._on_output, with_kwargs=True)]
        return self

    def __exit__(self, *exc) -> None:
        for hook in self.hooks:
            hook.remove()

    def _on_input(self, module, args, kwargs) -> None:
        if self.pending is not None:
            sampled = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
            self.picked.append(self.pending.gather(-1, sampled[:, -1:]).squeeze(-1))
            self.pending = None

    def _on_output(self, module, args, kwargs, output) -> None:
        self.pending = (output.logits[:, -1].float() / self.temperature).log_softmax(-1)

    def of(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """[B, new] log-probs of the `new_tokens` [B, new] that `generate` returned."""
        if self.pending is not None:  # the last token: no forward pass consumed it
            self.picked.append(self.pending.gather(-1, new_tokens[:, -1:].to(self.pending.device)).squeeze(-1))
            self.pending = None
        if len(self.picked) != new_tokens.shape[1]:
            raise RuntimeError(f"{len(self.picked)} log-probs gathered for {new_tokens.shape[1]} new tokens")
        return torch.stack(self.picked, dim=1).cpu()


class HFGenerationBackend(GenerationBackend):
    """A generation worker; `rank`/`world_size` let a worker group run several data-parallel copies."""

    def __init__(self, cfg: PolicyConfig, *, rank: int = 0, world_size: int = 1, weights_path: str | None = None,
                 device: torch.device | None = None):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device = device or resolve_device(cfg.device)
        self.tokenizer = load_tokenizer(cfg)
        # Generation holds no optimizer state, so it runs directly in the compute precision.
        self.model = load_model(cfg, self.device, path=weights_path, dtype=DTYPES[cfg.precision]).eval()
        self.stop_token_ids = stop_token_ids(self.tokenizer, self.model.generation_config, cfg.generation.stop_token_ids)
        self.context_length = getattr(self.model.config, "max_position_embeddings", None)
        # Sampling follows SamplingParams alone: `generate` fills what it is not given from the checkpoint's
        # generation_config.json, whose extras (Qwen2.5-Instruct's repetition_penalty) would change the
        # distribution sampled from, away from the policy whose log-probs are reported and trained on.
        self.model.generation_config = GenerationConfig()
        self.batch_size = cfg.generation.batch_size

    @property
    def transfer_device(self) -> torch.device:
        return self.device

    def sleep(self, level: int) -> None:
        """On a GPU the weights go to CPU memory at either level (a Hugging Face model cannot be
        rebuilt without them) and the allocator's cache is released."""
        if self.device.type == "cuda":
            self.model.to("cpu")
            torch.cuda.empty_cache()

    def wake_up(self) -> None:
        if self.device.type == "cuda":
            self.model.to(self.device)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]],
                     buckets: list[list[weight_transfer.TensorSpec]] | None = None) -> None:
        targets = self.model.state_dict(keep_vars=True)  # a tied pair is one tensor under two names
        loaded: set[int] = set()
        for name, tensor in weights:
            if name not in targets:
                raise KeyError(f"the trainer sent {name!r}, which the generation model does not have: the "
                               "generators must load the policy's architecture (policy.model_name)")
            targets[name].copy_(tensor)
            loaded.add(id(targets[name]))
        missing: dict[int, str] = {}
        for name, target in targets.items():
            if id(target) not in loaded:
                missing.setdefault(id(target), name)
        if missing:
            raise ValueError(f"the trainer's weights left {len(missing)} tensor(s) of the generation model "
                             f"unset, e.g. {list(missing.values())[:3]}")

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        if sampling.seed is not None:
            # `generate` samples from the global RNG (this actor's own); each rank draws its own stream.
            seed = np.random.SeedSequence([sampling.seed, self.rank]).generate_state(1, np.uint64)[0]
            torch.manual_seed(int(seed))
        out: list[Completion] = []
        for start in range(0, len(prompts), self.batch_size):
            out += self._generate_batch(prompts[start : start + self.batch_size], sampling)
        return out

    def _generate_batch(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        pad = self.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, prompt in enumerate(prompts):  # left padding: responses start right after each prompt
            input_ids[row, width - len(prompt):] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt):] = 1
        greedy = sampling.temperature == 0
        shared_cache = self._shared_prompt_cache(prompts, input_ids, attention_mask)
        with SampledTokenLogprobs(self.model, 1.0 if greedy else sampling.temperature) as sampled:
            sequences = self.model.generate(
                **{CACHE: shared_cache},
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                max_new_tokens=sampling.max_new_tokens,
                do_sample=not greedy,
                temperature=None if greedy else sampling.temperature,
                top_p=None if greedy else sampling.top_p,
                top_k=None if greedy else (sampling.top_k or 0),
                stopping_criteria=StoppingCriteriaList(
                    [StopOnStrings(self.tokenizer, sampling.stop_strings, width)] if sampling.stop_strings else []),
                eos_token_id=self.stop_token_ids,
                pad_token_id=pad,
                use_cache=True,
            )
        new_tokens = sequences[:, width:].cpu()
        logprobs = sampled.of(new_tokens)
        out = []
        for row in range(len(prompts)):
            ids, reason = self._trim(new_tokens[row].tolist(), sampling)
            out.append(Completion(ids, logprobs[row, : len(ids)].tolist(), reason,
                                  self.tokenizer.decode(ids, skip_special_tokens=True)))
        return out

    def _shared_prompt_cache(self, prompts: list[list[int]], input_ids: torch.Tensor,
                             attention_mask: torch.Tensor):
        """The KV cache of all but the last prompt column, computed once per distinct prompt.

        GRPO asks for G samples of every prompt, and prefill (the prompt's forward pass) is most
        of the cost when responses are short: each distinct prompt is run once and its cache
        copied to its G rows. `generate` then runs only the last column and the new tokens, with
        the positions it derives from the attention mask, which the prefill uses too. None when
        every prompt is distinct.
        """
        unique_of: dict[tuple[int, ...], int] = {}  # prompt -> its number among the distinct ones
        first_rows: list[int] = []
        source = []
        for row, prompt in enumerate(prompts):
            if tuple(prompt) not in unique_of:
                unique_of[tuple(prompt)] = len(first_rows)
                first_rows.append(row)
            source.append(unique_of[tuple(prompt)])
        if len(first_rows) == len(prompts) or input_ids.shape[1] < 2:
            return None
        unique = torch.tensor(first_rows)
        ids, mask = input_ids[unique, :-1], attention_mask[unique, :-1]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                           position_ids=positions.to(self.device), use_cache=True)[CACHE]
        if not hasattr(cache, "batch_select_indices"):  # a cache type that cannot be copied across rows
            return None
        cache.batch_select_indices(torch.tensor(source, device=self.device))
        return cache

    def _trim(self, ids: list[int], sampling: SamplingParams) -> tuple[list[int], str]:
        """Cut the padding that follows a finished sequence and say why it finished.

        Stop strings are looked for up to the first stop token (EOS), not only without one: a
        tokenizer whose pad token is its EOS pads a row that a stop string ended with EOS tokens it
        never sampled.
        """
        stop_ids = set(self.stop_token_ids)
        stopped_at = next((i for i, token in enumerate(ids) if token in stop_ids), None)
        end = len(ids) if stopped_at is None else stopped_at + 1
        stops = sampling.stop_strings or []
        if stops and any(stop in self.tokenizer.decode(ids[:end]) for stop in stops):
            for cut in range(1, end + 1):
                text = self.tokenizer.decode(ids[:cut])
                if any(stop in text for stop in stops):
                    return ids[:cut], "stop"
        return ids[:end], "length" if stopped_at is None else "stop"

"""A tiny tokenizer and causal LM built offline, loaded back through `from_pretrained`.

Tests and the demo must not reach the Hugging Face hub, yet they should exercise exactly the
code path a hub model takes. So we build a small byte-level BPE tokenizer with a ChatML chat
template and a Qwen2- or Llama-architecture model, save both with `save_pretrained`, and
everything else loads them by path like any other checkpoint.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@dataclass(frozen=True)
class TinySize:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int


SIZES = {
    # ~0.13M parameters: unit and e2e tests.
    "test": TinySize(64, 2, 4, 2, 192),
    # ~1.8M parameters: the demo; learns small-number arithmetic in minutes on 2 CPU cores.
    "demo": TinySize(192, 4, 6, 2, 576),
    # ~10.5M parameters: a heavier local smoke model.
    "small": TinySize(384, 6, 6, 2, 1152),
    # ~0.48B parameters (Qwen2.5-0.5B-like compute, tiny vocabulary): GPU benchmarks (bench/gpu_grpo.py).
    "0.5b": TinySize(1536, 18, 12, 2, 4608),
}


def _corpus(num_lines: int, seed: int) -> list[str]:
    """Text the BPE is trained on: arithmetic chats plus common words of instructions."""
    rng = random.Random(seed)
    words = ("What is the answer to this question ? Please solve compute add subtract multiply "
             "divide plus minus times result equals number sum difference product think step by "
             "The Answer : system user assistant You are a helpful math tutor . Reply with only "
             "final boxed Let's first then so we get , ! ( ) = + - * / # % \\ { } [ ] .").split()
    lines = []
    for _ in range(num_lines):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        op = rng.choice("+-*")
        lines.append(f"What is {a} {op} {b}? The answer is {a}.")
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))))
    return lines


def build_tiny_tokenizer(vocab_size: int = 512, seed: int = 0) -> PreTrainedTokenizerFast:
    """Byte-level BPE (never an unknown token) with single-digit tokens, so numbers are learnable."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(4000, seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        model_max_length=2048,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_model(
    vocab_size: int,
    size: str = "test",
    arch: str = "qwen2",
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    max_position_embeddings: int = 512,
    seed: int = 0,
):
    if size not in SIZES:
        raise ValueError(f"unknown tiny model size {size!r}; choose one of {sorted(SIZES)}")
    dims = SIZES[size]
    common = dict(
        vocab_size=vocab_size,
        hidden_size=dims.hidden_size,
        intermediate_size=dims.intermediate_size,
        num_hidden_layers=dims.num_hidden_layers,
        num_attention_heads=dims.num_attention_heads,
        num_key_value_heads=dims.num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common))
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    raise ValueError(f"unknown tiny model architecture {arch!r}; choose 'qwen2' or 'llama'")


def save_tiny_model(out_dir: str | Path, size: str = "test", arch: str = "qwen2", seed: int = 0) -> Path:
    """Build and save tokenizer + model; the folder then loads like any hub checkpoint."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(seed=seed)
    model = build_tiny_model(
        len(tokenizer),
        size=size,
        arch=arch,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        seed=seed,
    )
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def save_reward_model(model_dir: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    """The causal LM at `model_dir` with a fresh one-output score head, saved as `posttrain rm`
    exports a reward model (for the tests and the GPU check of reward-model workers)."""
    out = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out

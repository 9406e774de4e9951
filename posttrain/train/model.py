"""Loading Hugging Face causal LMs and tokenizers, by hub name or local path."""

from __future__ import annotations

import os
import shutil

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.config import PolicyConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

transformers.utils.logging.disable_progress_bar()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_tokenizer(cfg: PolicyConfig):
    name = cfg.tokenizer.name or cfg.model_name
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
    except OSError as err:
        raise OSError(f"cannot load tokenizer {name!r} (policy.tokenizer.name / policy.model_name): {err}") from err
    if cfg.tokenizer.chat_template is not None:
        tokenizer.chat_template = cfg.tokenizer.chat_template
    if tokenizer.pad_token_id is None:  # many base models ship without one; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(cfg: PolicyConfig, device: torch.device, path: str | None = None,
               dtype: torch.dtype = torch.float32):
    """Trainable weights default to float32; `policy.precision` is applied as autocast by the Policy."""
    name = path or cfg.model_name
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    except OSError as err:
        raise OSError(f"cannot load model {name!r} (policy.model_name): {err}") from err
    if cfg.activation_checkpointing_enabled:
        enable_activation_checkpointing(model)
    return model.to(device)


def enable_activation_checkpointing(model) -> None:
    """Recompute each layer's activations in the backward pass instead of keeping them."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24, where the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: the modules of the classes transformers names as never to be
    split across devices (`_no_split_modules`), its decoder layers."""
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in layer_classes]


def compile_decoder_layers(model: torch.nn.Module, device: torch.device) -> None:
    """torch.compile each decoder layer in place (`policy.torch_compile`), with dynamic shapes so
    that micro-batches of other lengths reuse the code. Layer by layer (as torchtitan does) keeps
    the LM-head hook, FSDP2's gathers and every other step of a forward pass as they are, while
    the layers, nearly all of the work, get fused elementwise kernels and no per-op Python."""
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"policy.torch_compile: {type(model).__name__} names no decoder-layer classes "
                         "(`_no_split_modules`) to compile; set policy.torch_compile=false")
    if device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX"), "g++", "clang++", "c++") if c):
        raise RuntimeError("policy.torch_compile on CPU needs a C++ compiler (g++ or clang++, or $CXX) on the PATH; "
                           "install one or set policy.torch_compile=false")
    for layer in layers:
        layer.compile(dynamic=True)

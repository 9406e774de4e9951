"""Loading Hugging Face causal LMs and tokenizers, by hub name or local path."""

from __future__ import annotations

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
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(device)

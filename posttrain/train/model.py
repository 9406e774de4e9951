"""Loading Hugging Face causal LMs and tokenizers, by hub name or local path."""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import torch
import transformers
from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from huggingface_hub.utils import get_session, validate_repo_id
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.config import PolicyConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

transformers.utils.logging.disable_progress_bar()

HUB_CHECK_TIMEOUT_S = 3.0
# What makes the local models the example configs start from (posttrain/examples/configs).
EXAMPLE_MODEL_BUILDERS = {
    Path("runs/tiny-model"): "`posttrain tiny-model runs/tiny-model --size demo` builds it",
    Path("runs/sft_tiny"): "the SFT run `posttrain sft --config sft_tiny` writes it (its model comes from "
                           "`posttrain tiny-model runs/tiny-model --size demo`)",
    Path("runs/rm_tiny"): "the reward-model run `posttrain rm --config rm_tiny` writes it (after the SFT run "
                          "`posttrain sft --config sft_tiny`)",
}


class ModelSourceError(OSError):
    """A model or tokenizer name that is neither a local folder nor loadable from the hub."""


def resolve_model_source(name: str, key: str | None = None) -> str:
    """What to hand `from_pretrained` for `name` (`key` is the config key it came from): a local
    folder or a hub id as is, or, with the hub out of reach, a hub id's snapshot in the local
    cache. Anything else fails here at once, rather than after transformers' ~30 s of retries."""
    path = Path(name).expanduser()
    if path.is_dir():
        return name
    what = f"{name!r}" + (f" ({key})" if key else "")
    builder = next((how for folder, how in EXAMPLE_MODEL_BUILDERS.items() if folder in (path, *path.parents)), None)
    if builder is not None:
        raise ModelSourceError(f"{what} is not a local folder yet: {builder}")
    if path.exists() or not _is_repo_id(name):
        raise ModelSourceError(f"{what} is neither a local folder{' (it is a file)' if path.exists() else ''} "
                               "nor a Hugging Face hub id; give a folder that from_pretrained loads (a run's "
                               "checkpoints/final_model, or what `posttrain convert` writes)")
    unreachable = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else _hub_unreachable()
    if unreachable is None:
        return name
    try:
        return snapshot_download(name, local_files_only=True)
    except LocalEntryNotFoundError:
        raise ModelSourceError(f"{what} is neither a local folder nor in the Hugging Face cache, and the hub "
                               f"is not reachable ({unreachable}); give a local folder, or download it once "
                               "where the hub is reachable") from None


def weights_source(cfg: PolicyConfig, path: str | None = None) -> str:
    """`resolve_model_source` of the weights to load: `path` (a run's own folder) or policy.model_name."""
    return resolve_model_source(path or cfg.model_name, None if path else "policy.model_name")


def tokenizer_source(cfg: PolicyConfig) -> str:
    """`resolve_model_source` of policy.tokenizer.name, which defaults to policy.model_name."""
    name = cfg.tokenizer.name or cfg.model_name
    return resolve_model_source(name, "policy.model_name" if name == cfg.model_name else "policy.tokenizer.name")


def _is_repo_id(name: str) -> bool:
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


@functools.cache
def _hub_unreachable() -> str | None:
    """Why the hub cannot be reached, None if it can; asked once per process, with a short timeout."""
    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_CHECK_TIMEOUT_S)
    except Exception as err:  # the HTTP client's errors (httpx or requests, by huggingface_hub version)
        return f"{constants.ENDPOINT}: {err}"
    return None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_tokenizer(cfg: PolicyConfig):
    name, source = cfg.tokenizer.name or cfg.model_name, tokenizer_source(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
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
    source = weights_source(cfg, path)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
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

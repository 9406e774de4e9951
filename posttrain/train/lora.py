"""LoRA through PEFT: adapters injected into the Hugging Face model in place.

The model object stays the transformers class (PEFT swaps its target Linear layers for LoRA
layers), so every forward path of the trainer is unchanged. What leaves the trainer is always an
ordinary Hugging Face model: the generators, checkpoints' `model/` and `final_model/` get the
merged weights W + (alpha / dim) B @ A under the original names. The adapter itself is saved
beside them as a PEFT folder (`<export>/adapter/`), from which a run resumes on top of the
untouched base model, so the base (DPO's and GRPO's reference) stays the starting model.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from posttrain.config import ConfigError, LoRAConfig

ADAPTER_DIR = "adapter"  # inside an exported model folder
# What PEFT puts in a wrapped layer's parameter names (`default` is the adapter's name).
_BASE, _A, _B = ".base_layer.", ".lora_A.default.", ".lora_B.default."
_TRAINED_COPY, _FROZEN_COPY = ".modules_to_save.default.", ".original_module."


def add_lora(model: torch.nn.Module, cfg: LoRAConfig, adapter_dir: str | Path | None = None):
    """Inject adapters into `model` (in place) and freeze everything else; returns the PEFT wrapper
    (for saving the adapter and switching it off). A reward model's new scalar head is trained in
    full beside the adapters. With `adapter_dir`, the adapters' saved weights are loaded."""
    from peft import LoraConfig, PeftModel, get_peft_model

    is_scorer = type(model).__name__.endswith("ForSequenceClassification")
    config = LoraConfig(r=cfg.dim, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                        task_type="SEQ_CLS" if is_scorer else "CAUSAL_LM",
                        target_modules=list(cfg.target_modules) or "all-linear",
                        # A reward model's head is excluded from the adapters: it is trained whole.
                        exclude_modules=[*cfg.exclude_modules, *(["score"] if is_scorer else [])] or None)
    with warnings.catch_warnings():  # PEFT asks transformers with a name it has since renamed
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        if adapter_dir is not None:
            # The current config, not the saved one: the shapes are the checkpoint's (its identity
            # says so) and a training setting such as dropout is this run's to choose.
            adapted = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True, config=config)
        else:
            try:
                adapted = get_peft_model(model, config)
            except ValueError as err:  # PEFT: none (or not all) of the target modules exist in the model
                raise ConfigError(f"policy.lora.target_modules={list(cfg.target_modules)} (exclude_modules="
                                  f"{list(cfg.exclude_modules)}) do not fit {type(model).__name__}: {err}") from err
    _check_mergeable(model)
    for param in model.parameters():  # what trains does so in float32, also a head copied from a bfloat16 base
        if param.requires_grad:
            param.data = param.data.float()
    return adapted


def _check_mergeable(model: torch.nn.Module) -> None:
    """`merged_state_dict` merges adapters of plain Linear layers, and a merged output head must not
    be tied to the input embeddings (the export would silently tie it back)."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and type(module.get_base_layer()) is not torch.nn.Linear:
            raise ConfigError(f"policy.lora.target_modules: {name} ({type(module.get_base_layer()).__name__}) is "
                              "not a torch.nn.Linear layer; posttrain adapts linear layers only")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(config, "tie_word_embeddings", False) and isinstance(model.get_output_embeddings(), LoraLayer):
        raise ConfigError("policy.lora.target_modules: this model's output head shares its weights with the "
                          "input embeddings, so it cannot take an adapter of its own; leave it out")


def lora_scaling(cfg: LoRAConfig) -> float:
    return cfg.alpha / cfg.dim


def merged_state_dict(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """An adapted model's weights (its own names, PEFT layers inside) as the plain model's weights.

    Each adapted weight becomes W + scaling * B @ A, computed in float32 and returned in W's dtype;
    a fully trained module (a reward model's head) takes its trained copy's place. Works on a whole
    gathered state dict, so sharded and unsharded models are merged the same way.
    """
    return dict(iter_merged(state, scaling))


def iter_merged(state: dict[str, torch.Tensor], scaling: float,
                whole: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> Iterator[tuple[str, torch.Tensor]]:
    """`merged_state_dict` one tensor at a time; `whole` turns an entry of `state` into the whole
    tensor (e.g. gathers a DTensor shard) as it is needed, so a sharded model is never gathered at once."""
    for name, tensor in state.items():
        if _A in name or _B in name or _FROZEN_COPY in name:
            continue
        if _TRAINED_COPY in name:
            yield name.replace(_TRAINED_COPY, "."), whole(tensor)
        elif _BASE in name:
            layer, param = name.split(_BASE)
            down, up = state.get(f"{layer}{_A}{param}"), state.get(f"{layer}{_B}{param}")
            tensor = whole(tensor)
            if param == "weight" and down is not None:
                tensor = (tensor.float() + scaling * (whole(up).float() @ whole(down).float())).to(tensor.dtype)
            yield f"{layer}.{param}", tensor
        else:
            yield name, whole(tensor)


def peft_named(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An adapted model's state dict under the PEFT wrapper's names, as its `save_pretrained(state_dict=...)`
    takes it (PEFT keeps the adapters and fully trained modules of it)."""
    return {f"base_model.model.{name}": tensor for name, tensor in state.items()}

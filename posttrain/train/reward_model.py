"""Reward models: a causal LM backbone with a scalar head, via AutoModelForSequenceClassification.

The score of a sequence is the head's output at its last non-pad token: transformers finds that
token by comparing `input_ids` with `config.pad_token_id`, so the pad id must be set in the model
config (and differ from any token that ends a real sequence, e.g. the chat template's EOS),
otherwise a padded batch is scored at the wrong position.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from posttrain.config import ConfigError, PolicyConfig
from posttrain.train.model import enable_activation_checkpointing, resolve_model_source, weights_source


def has_reward_head(path: str, trust_remote_code: bool = False) -> bool:
    """Whether a model folder or hub name is a sequence-classification (reward) model."""
    config = AutoConfig.from_pretrained(resolve_model_source(path), trust_remote_code=trust_remote_code)
    return any(arch.endswith("ForSequenceClassification") for arch in (config.architectures or []))


def load_reward_model(cfg: PolicyConfig, device: torch.device, path: str | None = None, *,
                      pad_token_id: int, dtype: torch.dtype = torch.float32):
    """A one-output scoring model; from a causal-LM checkpoint the `score` head is newly initialised."""
    name = path or cfg.model_name
    source = weights_source(cfg, path)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=1, pad_token_id=pad_token_id, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    except OSError as err:
        raise OSError(f"cannot load model {name!r} (policy.model_name): {err}") from err
    except ValueError as err:  # an architecture without a sequence-classification class
        raise ConfigError(f"policy.model_name: {name!r} cannot be loaded as a reward model "
                          f"(AutoModelForSequenceClassification): {err}") from err
    model.config.pad_token_id = pad_token_id
    if cfg.activation_checkpointing_enabled:
        enable_activation_checkpointing(model)
    return model.to(device)


def sequence_scores(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One float32 score per row [B] of a right-padded batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits.squeeze(-1).float()

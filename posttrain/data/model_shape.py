"""What a model's config says about its work per token: the sizes the packing planner and the
throughput metrics count FLOPs with."""

from __future__ import annotations

from typing import Any


def text_config(config: Any) -> Any:
    """The language model's config (a multimodal config nests it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def attention_width(config: Any) -> int:
    """Query heads x head size: the width of one token's attention scores and values."""
    config = text_config(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_attention_heads * head_dim


def linear_params_per_layer(config: Any) -> int:
    """Weights of one decoder layer's matrix multiplies that one token goes through: q, k, v, o and
    the gated MLP (for a mixture of experts, the experts each token is routed to, and the router)."""
    config = text_config(config)
    d, width = config.hidden_size, attention_width(config)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    kv_width = kv_heads * (width // config.num_attention_heads)
    attention = 2 * d * width + 2 * d * kv_width
    experts = getattr(config, "num_experts_per_tok", None)
    if experts:
        ffn = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
        mlp = 3 * d * ffn * experts + d * (getattr(config, "num_experts", None) or config.num_local_experts)
    else:
        mlp = 3 * d * getattr(config, "intermediate_size", 4 * d)
    return attention + mlp

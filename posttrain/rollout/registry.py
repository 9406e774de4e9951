"""Generation backends by name (`policy.generation.backend`), kept out of the interface file so
that `rollout/base.py` does not import its own implementations."""

from __future__ import annotations

from posttrain.rollout.base import GenerationBackend


def backend_class(name: str) -> type[GenerationBackend]:
    """`policy.generation.backend` -> its class; vLLM is imported only when chosen."""
    if name == "vllm":
        from posttrain.rollout.vllm import VLLMGenerationBackend
        return VLLMGenerationBackend
    from posttrain.rollout.hf import HFGenerationBackend
    return HFGenerationBackend

"""Throughput and model FLOPs utilisation (MFU) of a training step.

MFU = model FLOPs of the step's sequences / (seconds x the peak FLOP/s of the devices that
trained). A sequence of T tokens costs 6 x N x T + 12 x L x w x T^2 FLOPs forward and backward
(the PaLM paper's count): N the matrix-multiply weights one token goes through (every decoder
layer's, and the LM head), L layers, w the attention width; causal masking is not discounted, as
MFU is usually reported. The peak is the dense bf16 tensor-core rate of a known GPU times the
policy's GPUs; on a CPU, the float32 matrix-multiply rate of this machine, measured once.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import Any

import torch

from posttrain.data.model_shape import attention_width, linear_params_per_layer, text_config

# Dense bf16 tensor-core peaks, FLOP/s (no sparsity).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "B200": 2250e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def training_flops(model_config: Any, lengths: Sequence[int]) -> float:
    """FLOPs of one forward and backward pass over sequences of these lengths."""
    config = text_config(model_config)
    layers = config.num_hidden_layers
    weights = layers * linear_params_per_layer(config) + config.vocab_size * config.hidden_size
    width = attention_width(config)
    return float(sum(6 * weights * t + 12 * layers * width * t * t for t in lengths))


def gpu_peak_flops(device_name: str) -> float | None:
    """The bf16 peak of a GPU by its name, None for one not in the table."""
    return next((flops for key, flops in PEAK_BF16.items() if key in device_name), None)


@functools.cache
def cpu_peak_flops() -> float:
    """This machine's float32 matrix-multiply rate with torch's threads, measured over ~0.2 s."""
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    a @ b  # warm-up
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < 0.2:
        a @ b
        count += 1
    return 2 * 512**3 * count / elapsed


class Throughput:
    """`throughput/tokens_per_s` and `throughput/mfu` of steps of a model trained on `devices`
    devices named `device_name` ("cpu", or a GPU's name); no MFU for a GPU of unknown peak."""

    def __init__(self, model_config: Any, device_name: str, devices: int):
        self.model_config = model_config
        if device_name == "cpu":
            self.peak: float | None = cpu_peak_flops()
        else:
            per_device = gpu_peak_flops(device_name)
            self.peak = per_device * devices if per_device else None

    def __call__(self, lengths: Sequence[int], seconds: float) -> dict[str, float]:
        metrics = {"throughput/tokens_per_s": sum(lengths) / seconds}
        if self.peak:
            metrics["throughput/mfu"] = training_flops(self.model_config, lengths) / seconds / self.peak
        return metrics

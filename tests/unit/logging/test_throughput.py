"""Model FLOPs of a training step, against a hand count and against the model's own weights, and
the throughput metrics built on them."""

from __future__ import annotations

import pytest
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3MoeConfig

from posttrain.data.model_shape import linear_params_per_layer
from posttrain.logging.throughput import Throughput, cpu_peak_flops, training_flops

DENSE = Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=128, vocab_size=100)


def test_training_flops_by_hand():
    per_layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128  # q and o; k and v (2 of 4 heads); gate, up, down
    assert linear_params_per_layer(DENSE) == per_layer
    weights = 2 * per_layer + 100 * 64  # the layers and the LM head
    assert training_flops(DENSE, [10, 3]) == 6 * weights * 13 + 12 * 2 * 64 * (10 * 10 + 3 * 3)


def test_the_count_is_the_models_own_matrix_weights():
    model = Qwen2ForCausalLM(DENSE)
    layer = model.model.layers[0]
    matrices = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]
    assert linear_params_per_layer(DENSE) == sum(m.weight.numel() for m in matrices)


def test_a_mixture_of_experts_counts_the_experts_a_token_is_routed_to():
    moe = Qwen3MoeConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, vocab_size=100)
    assert linear_params_per_layer(moe) == 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 32 * 2 + 64 * 8


def test_throughput_metrics():
    on_cpu = Throughput(DENSE, "cpu", devices=1)
    metrics = on_cpu([10, 30], seconds=2.0)
    assert metrics["throughput/tokens_per_s"] == 20.0
    assert metrics["throughput/mfu"] == pytest.approx(training_flops(DENSE, [10, 30]) / 2.0 / cpu_peak_flops())
    assert cpu_peak_flops() > 1e8  # a real matrix-multiply rate, measured
    h100s = Throughput(DENSE, "NVIDIA H100 80GB HBM3", devices=2)
    assert h100s([10], 1.0)["throughput/mfu"] == pytest.approx(training_flops(DENSE, [10]) / (2 * 989e12))
    assert "throughput/mfu" not in Throughput(DENSE, "Some Future GPU", devices=1)([10], 1.0)  # unknown peak


"""GRPO's GPU shares per worker (Ray's accounting), from the policy and generation settings."""

import pytest

from posttrain.config import GRPORunConfig
from posttrain.loops.grpo import _gpu_shares


def _cfg(gpus_per_node=1, policy_workers=1, generators=1, tensor_parallel=1) -> GRPORunConfig:
    cfg = GRPORunConfig()
    cfg.cluster.gpus_per_node = gpus_per_node
    cfg.policy.num_workers = policy_workers
    cfg.policy.generation.num_workers = generators
    cfg.policy.generation.vllm.tensor_parallel_size = tensor_parallel
    cfg.policy.generation.backend = "vllm" if tensor_parallel > 1 else "hf"
    return cfg


@pytest.mark.parametrize("settings, shares", [
    ({"gpus_per_node": 0, "policy_workers": 2}, (0.0, 0.0)),  # CPU: no GPU accounting at all
    ({}, (0.5, 0.5)),  # one policy worker shares its GPU with the generators, half each
    ({"generators": 2}, (0.5, 0.25)),
    ({"gpus_per_node": 4, "policy_workers": 2, "generators": 2}, (1.0, 1.0)),  # FSDP2 ranks: a GPU each
    ({"gpus_per_node": 4, "tensor_parallel": 2}, (1.0, 2.0)),  # a tensor-parallel engine: GPUs of its own
])
def test_gpu_shares(settings, shares):
    assert _gpu_shares(_cfg(**settings)) == shares

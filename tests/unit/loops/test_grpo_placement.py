"""GRPO's resource plan: GPU shares per worker (Ray's accounting) from the policy and generation
settings, and vLLM engines that would not fit the GPU they share."""

import pytest

from posttrain.config import ConfigError, GRPORunConfig
from posttrain.loops.grpo import _gpu_shares, _resource_plan


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


def test_the_plan_holds_every_role_and_checks_engines_sharing_the_policy_gpu():
    cfg = _cfg(generators=2)
    plan = _resource_plan(cfg)
    assert [(r.name, r.workers, r.cpus_per_worker, r.gpus_per_worker) for r in plan.roles] == [
        ("policy", 1, 1.0, 0.5), ("generation", 2, 1.0, 0.25), ("environment", 1, 0.5, 0.0)]
    cfg.policy.generation.backend = "vllm"
    with pytest.raises(ConfigError, match=r"2 vLLM engine\(s\) x policy.generation.vllm.gpu_memory_utilization"):
        _resource_plan(cfg)
    cfg.policy.generation.vllm.gpu_memory_utilization = 0.3
    assert _resource_plan(cfg).gpus == 1.0

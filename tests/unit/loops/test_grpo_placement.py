"""GRPO's resource plan: each role's share (Ray's accounting) and bundles from the policy and
generation settings, colocated or dedicated, and vLLM engines that would not fit their GPU."""

import pytest

from posttrain.config import ConfigError, GRPORunConfig
from posttrain.loops.grpo import _resource_plan


def _cfg(gpus_per_node=1, policy_workers=1, generators=1, tensor_parallel=1, colocated=True) -> GRPORunConfig:
    cfg = GRPORunConfig()
    cfg.cluster.gpus_per_node = gpus_per_node
    cfg.policy.num_workers = policy_workers
    cfg.policy.generation.num_workers = generators
    cfg.policy.generation.vllm.tensor_parallel_size = tensor_parallel
    cfg.policy.generation.backend = "vllm" if tensor_parallel > 1 else "hf"
    cfg.policy.generation.colocated.enabled = colocated
    return cfg


def _roles(plan):
    return [(r.name, r.workers, r.cpus_per_worker, r.gpus_per_worker, r.bundles) for r in plan.roles]


@pytest.mark.parametrize("settings, shares", [
    ({"gpus_per_node": 0, "policy_workers": 2}, (0.0, 0.0)),  # CPU: no GPU accounting at all
    ({}, (0.5, 0.5)),  # colocated: a policy rank and the generator beside it, half each
    ({"generators": 2}, (0.5, 0.25)),  # two engines on the one policy GPU
    ({"gpus_per_node": 4, "policy_workers": 4, "generators": 4}, (0.5, 0.5)),
    ({"gpus_per_node": 4, "policy_workers": 2, "generators": 2, "colocated": False}, (1.0, 1.0)),  # GPUs of their own
    ({"gpus_per_node": 4, "tensor_parallel": 2, "colocated": False}, (1.0, 2.0)),  # a tensor-parallel engine
])
def test_gpu_shares(settings, shares):
    plan = _resource_plan(_cfg(**settings))
    assert (plan.role("policy").gpus_per_worker, plan.role("generation").gpus_per_worker) == shares


def test_colocated_generators_share_their_policy_ranks_bundles_each_holding_one_whole_gpu():
    plan = _resource_plan(_cfg(gpus_per_node=4, policy_workers=4, generators=2))
    assert _roles(plan)[:2] == [("policy", 4, 1.0, 0.5, [0, 1, 2, 3]), ("generation", 2, 1.0, 0.5, [0, 1])]
    # Ranks 2 and 3 have no generator beside them, yet their bundles reserve a whole GPU each, so
    # that Ray cannot put both on one GPU.
    assert plan.shared_bundles == [{"CPU": 2.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 1.0},
                                   {"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}]
    assert plan.role("environment").bundles is None
    assert plan.placement("generation", "shared")["bundles"] == ("shared", [0, 1])
    assert "bundles" not in plan.placement("environment", "shared")
    cpu = _resource_plan(_cfg(gpus_per_node=0, policy_workers=2, generators=4))
    assert cpu.role("generation").bundles == [0, 1, 0, 1]
    assert cpu.shared_bundles == [{"CPU": 3.0}, {"CPU": 3.0}]
    assert cpu.cpus == 2 + 4 + 0.5  # the same as without colocation
    assert _resource_plan(_cfg(colocated=False)).shared_bundles == []


def test_a_colocated_bundle_must_fit_one_node():
    plan = _resource_plan(_cfg(gpus_per_node=0, policy_workers=1, generators=3))
    with pytest.raises(ConfigError, match=r"colocated with it need 4 CPUs on one node, but the largest node of "
                                          r"the local Ray has 2.*colocated\.enabled=false"):
        plan.check_fits([{"CPU": 2.0}, {"CPU": 2.0}, {"CPU": 2.0}], "the local Ray")


def test_vllm_engines_sharing_the_policy_gpu_must_leave_the_trainer_room():
    cfg = _cfg(generators=2)
    cfg.policy.generation.backend = "vllm"
    with pytest.raises(ConfigError, match=r"2 vLLM engine\(s\) x policy.generation.vllm.gpu_memory_utilization"):
        _resource_plan(cfg)
    cfg.policy.generation.vllm.gpu_memory_utilization = 0.3
    assert _resource_plan(cfg).gpus == 1.0
    cfg.policy.generation.colocated.enabled = False  # alone on its GPU, an engine may take more
    cfg.policy.generation.vllm.gpu_memory_utilization = 0.9
    assert _resource_plan(cfg).gpus == 3.0


def test_dedicated_generation_nodes_pack_each_role_onto_nodes_of_its_own():
    cfg = _cfg(gpus_per_node=8, policy_workers=8, generators=8, colocated=False)
    cfg.cluster.num_nodes = 2
    assert {r.strategy for r in _resource_plan(cfg).roles} == {"SPREAD"}  # no split asked for: across both
    cfg.policy.generation.colocated.resources.gpus_per_node = 8
    cfg.policy.generation.colocated.resources.num_nodes = 1
    assert {r.strategy for r in _resource_plan(cfg).roles} == {"PACK"}


def test_a_reward_model_gets_workers_of_its_own_with_their_gpu_share():
    cfg = _cfg(gpus_per_node=4, policy_workers=2, generators=2)
    assert [r.name for r in _resource_plan(cfg).roles] == ["policy", "generation", "environment"]
    cfg.env.name, cfg.env.reward_model_workers, cfg.env.reward_model_gpus = "reward_model", 2, 0.5
    cfg.env.num_workers = 4
    plan = _resource_plan(cfg)
    assert _roles(plan)[3] == ("reward_model", 2, 1.0, 0.5, None)  # 2 copies for 4 environment actors
    assert plan.gpus == 2 * 1.0 + 2 * 0.5  # policy + colocated generators fill 2 GPUs; the models share one
    plan.check_fits([{"CPU": 16.0, "GPU": 4.0}], "the local Ray")
    with pytest.raises(ConfigError, match=r"env.reward_model_workers \(2\) x 0.5"):
        plan.check_fits([{"CPU": 16.0, "GPU": 2.0}], "the local Ray")
    cfg.cluster.gpus_per_node = 0
    assert _resource_plan(cfg).role("reward_model").gpus_per_worker == 0.0  # CPU: no GPU accounting


def test_a_judge_gets_workers_of_its_own_with_their_gpu_share():
    cfg = _cfg(gpus_per_node=4, policy_workers=2, generators=2)
    cfg.env.name, cfg.env.judge.model_name, cfg.env.judge.workers, cfg.env.judge.gpus = "math_judge", "m", 2, 1.0
    assert _roles(_resource_plan(cfg))[3] == ("judge", 2, 1.0, 1.0, None)
    with pytest.raises(ConfigError, match=r"env.judge.workers \(2\) x 1"):
        _resource_plan(cfg).check_fits([{"CPU": 16.0, "GPU": 3.0}], "the local Ray")

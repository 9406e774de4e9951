"""The resource plan: totals, the fit against a cluster's nodes, vLLM engines' share of a GPU."""

import pytest

from posttrain.cluster.plan import ResourcePlan, RolePlan, check_engine_memory, worker_threads
from posttrain.config import ConfigError


def _plan(policy=2, generators=2, envs=1, policy_gpus=0.0, generation_gpus=0.0) -> ResourcePlan:
    return ResourcePlan([RolePlan("policy", policy, 1.0, policy_gpus, "policy.num_workers"),
                         RolePlan("generation", generators, 1.0, generation_gpus, "policy.generation.num_workers"),
                         RolePlan("environment", envs, 0.5, 0.0, "env.num_workers")])


def test_totals_and_threads():
    plan = _plan(policy_gpus=1.0, generation_gpus=2.0)
    assert plan.cpus == 4.5 and plan.gpus == 6.0
    assert [worker_threads(c) for c in (0.5, 1.0, 2.5, 4)] == [1, 1, 2, 4]


def test_a_plan_with_more_cpus_than_the_cluster_names_every_term():
    with pytest.raises(ConfigError, match=r"policy.num_workers \(2\) x 1 \+ policy.generation.num_workers \(2\) x 1 "
                                          r"\+ env.num_workers \(1\) x 0.5 = 4.5 CPUs, but the local Ray has 4"):
        _plan().check_fits([{"CPU": 4.0}], "the local Ray")
    _plan().check_fits([{"CPU": 3.0}, {"CPU": 2.0}], "a cluster")  # two nodes together suffice


def test_gpus_count_in_total_and_per_node():
    with pytest.raises(ConfigError, match=r"= 6 GPUs, but c has 4"):
        _plan(policy_gpus=1.0, generation_gpus=2.0).check_fits([{"CPU": 16, "GPU": 4}], "c")
    with pytest.raises(ConfigError, match=r"each generation worker needs 4 GPUs on one node, but the largest node"):
        _plan(policy=1, generators=1, policy_gpus=1.0, generation_gpus=4.0).check_fits(
            [{"CPU": 8, "GPU": 3}, {"CPU": 8, "GPU": 3}], "c")


def test_vllm_engines_must_leave_their_gpu_room():
    check_engine_memory(1, 0.4, beside_trainer=True)
    check_engine_memory(1, 0.9, beside_trainer=False)
    with pytest.raises(ConfigError, match=r"2 vLLM engine\(s\) x policy.generation.vllm.gpu_memory_utilization \(0.4\) "
                                          r"= 0.8 of one GPU, with the policy worker .* <= 0.30"):
        check_engine_memory(2, 0.4, beside_trainer=True)


def test_placements_are_described_per_rank():
    plan = _plan(policy=1, generators=1)
    plan.placements = {"policy": [{"node_ip": "10.0.0.1", "node_id": "abcdef0123", "gpu_ids": ["0"]}]}
    text = plan.describe()
    assert "policy: 1 worker(s) x 1 CPU, 1 thread(s), PACK\n    rank 0: node 10.0.0.1 (abcdef01), GPU(s) 0" in text
    assert plan.to_dict()["roles"][2] == {"name": "environment", "workers": 1, "cpus_per_worker": 0.5,
                                          "gpus_per_worker": 0.0, "key": "env.num_workers", "strategy": "PACK",
                                          "bundles": None}
    plan.roles[1].bundles = [0]
    assert "generation: 1 worker(s) x 1 CPU, 1 thread(s), PACK, colocated in shared bundle(s) 0" in plan.describe()

"""GRPO on a two-node Ray cluster started on this machine (`ray.cluster_utils.Cluster`): two
policy ranks and two generation workers spread over both nodes, colocated (each generator in its
policy rank's bundle, weights handed over in place) and disaggregated (bundles of their own,
weights over the transfer group), train exactly like the same run on one node, and every worker
landed as the saved resource plan says."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster
from test_grpo_e2e import _cfg, _run, _train_rows

pytestmark = pytest.mark.e2e

ROLES = ["policy.num_workers=2", "policy.generation.num_workers=2", "env.num_workers=2", "grpo.max_num_steps=2",
         "grpo.num_prompts_per_step=4", "grpo.num_generations_per_prompt=4", "policy.train_global_batch_size=16",
         "policy.train_micro_batch_size=8", "checkpointing.enabled=false"]


@pytest.fixture
def cluster(ray_session, monkeypatch):
    ray.shutdown()  # the session's one-node Ray; started again afterwards
    # Every node's workers import the reward functions next to this file.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                                   os.environ.get("PYTHONPATH")])))
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 5})
    try:
        yield nodes
    finally:
        ray.shutdown()
        nodes.shutdown()
        ray_session()


def test_two_nodes_train_like_one_and_each_role_lands_where_the_plan_says(tiny_model_dir, tmp_path, cluster):
    def run(name: str, nodes: int, *overrides: str):
        out = tmp_path / name
        _run(_cfg(tiny_model_dir, out, *ROLES, f"cluster.address={cluster.address}", f"cluster.num_nodes={nodes}",
                  *overrides))
        ray.shutdown()  # the loop connected to the cluster; the next run connects anew
        return _train_rows(out / "logs"), json.loads((out / "logs" / "resource_plan.json").read_text())

    one_rows, one_plan = run("one", 1)
    cluster.add_node(num_cpus=5)
    cluster.wait_for_nodes()
    colocated_rows, colocated_plan = run("colocated", 2)
    dedicated_rows, dedicated_plan = run("dedicated", 2, "policy.generation.colocated.enabled=false")

    for rows in (colocated_rows, dedicated_rows):
        for one, two in zip(one_rows, rows, strict=True):
            assert two["rollout/reward_mean"] == one["rollout/reward_mean"]
            assert two["train/loss"] == pytest.approx(one["train/loss"], rel=1e-5, abs=1e-7)
            assert two["train/grad_norm"] == pytest.approx(one["train/grad_norm"], rel=1e-5)
    assert {p["node_id"] for role in one_plan["placements"].values() for p in role} == {cluster.head_node.node_id}
    for plan in (colocated_plan, dedicated_plan):
        for role in plan["roles"]:
            assert role["strategy"] == "SPREAD"
            nodes = {p["node_id"] for p in plan["placements"][role["name"]]}
            assert len(nodes) == 2, (role["name"], plan["placements"])  # one worker on each node
    # Colocated: generator j shares policy rank j's bundle, so its node; dedicated: bundles of their own.
    roles = {role["name"]: role for role in colocated_plan["roles"]}
    assert roles["policy"]["bundles"] == roles["generation"]["bundles"] == [0, 1]
    policy_nodes = [p["node_id"] for p in colocated_plan["placements"]["policy"]]
    assert [p["node_id"] for p in colocated_plan["placements"]["generation"]] == policy_nodes
    assert all(role["bundles"] is None for role in dedicated_plan["roles"])

"""Weight syncs between real actors, colocated (ipc) and over a transfer group (collective): a
generator that dies while it reads its buckets leaves no one waiting; it is restarted and synced
afresh (over a new group), and every generator ends with the policy's new weights."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import ray
import torch

from posttrain.cluster import WorkerDiedError, WorkerGroup
from posttrain.config import ClusterConfig, PolicyConfig
from posttrain.rollout.hf import HFGenerationBackend
from posttrain.rollout.weight_sync import WeightSync
from posttrain.train.policy_group import PolicyGroup


class DiesWhileReading(HFGenerationBackend):
    """Exits its process in the middle of a sync's first bucket, once per `marker` file."""

    def __init__(self, *args, marker: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.marker = Path(marker)

    def load_weights(self, weights, buckets=None):
        try:
            self.marker.unlink()  # only the first generator to get here dies
        except FileNotFoundError:
            return super().load_weights(weights, buckets)
        next(iter(weights))
        os._exit(1)


def _nudge(actor) -> None:
    with torch.no_grad():
        for parameter in actor.policy.model.parameters():
            parameter.add_(0.01)


def _state(actor) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in actor.model.state_dict().items()}


@pytest.fixture
def actors(tiny_model_dir, tmp_path, ray_session):
    # The workers cannot import this module (pytest put its folder on the driver's path only): its code travels.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cfg = PolicyConfig(model_name=str(tiny_model_dir))
    policy = PolicyGroup(cfg, ClusterConfig(), total_steps=1, seed=0)
    marker = tmp_path / "die"

    def generators(max_restarts: int) -> WorkerGroup:
        return WorkerGroup(DiesWhileReading, 2, name="generation", args=(cfg,), kwargs={"marker": str(marker)},
                           num_cpus_per_worker=0.5, max_restarts=max_restarts)

    made: list[WorkerGroup] = []
    try:
        yield policy, marker, lambda restarts: made.append(generators(restarts)) or made[-1]
    finally:
        for group in made:
            group.shutdown()
        policy.close()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _sync(policy, group, transport: str) -> WeightSync:
    return WeightSync(policy, group, transport, bucket_mb=1, colocated_ranks=[0, 0] if transport == "ipc" else None)


@pytest.mark.parametrize("transport", ["ipc", "collective"])
def test_a_generator_that_dies_mid_sync_is_restarted_and_gets_the_new_weights(actors, transport):
    policy, marker, generators = actors
    group = generators(1)
    sync = _sync(policy, group, transport)
    files_before = set(Path("/dev/shm").glob("posttrain-weights-*"))
    policy.workers.call_all("__ray_call__", _nudge)
    marker.touch()
    sync.sync()
    assert group.restarts == 1 and not marker.exists()
    expected = ray.get(policy.generator_weights())
    for state in group.call_all("__ray_call__", _state):
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[name], tensor) for name, tensor in expected.items())
    assert set(Path("/dev/shm").glob("posttrain-weights-*")) == files_before


@pytest.mark.parametrize("transport", ["ipc", "collective"])
def test_a_generator_that_dies_mid_sync_without_restarts_is_named(actors, transport):
    policy, marker, generators = actors
    group = generators(0)
    group.placements()
    sync = _sync(policy, group, transport)
    marker.touch()
    with pytest.raises(WorkerDiedError, match=r"worker group 'generation': rank [01] \(on node [\d.]+\) died"):
        sync.sync()


def test_ipc_needs_the_policy_rank_of_each_generator():
    with pytest.raises(ValueError, match="weight sync over ipc needs each generator's colocated policy rank"):
        WeightSync(None, None, "ipc", bucket_mb=1)

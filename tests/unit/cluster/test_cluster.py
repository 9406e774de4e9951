"""Sharding, and a real two-actor WorkerGroup on a local Ray (started once for the module)."""

from __future__ import annotations

import sys

import pytest
import ray
import torch

from posttrain.cluster import SharedBundles, WorkerGroup, init_ray, shard
from posttrain.config import ClusterConfig, ConfigError


class Doubler:
    def __init__(self, *, rank: int, world_size: int, scale: int = 2):
        self.rank = rank
        self.world_size = world_size
        self.scale = scale

    def info(self) -> tuple[int, int]:
        return self.rank, self.world_size

    def double(self, items: list[int], offset: int = 0) -> list[tuple[int, int]]:
        return [(self.rank, x * self.scale + offset) for x in items]

    def not_a_list(self, items: list[int]) -> tuple:
        return tuple(items)

    def drop_one(self, items: list[int]) -> list[int]:
        return items[1:]

    def boom(self) -> None:
        raise ValueError("boom")

    def double_or_die(self, items: list[int], marker: str) -> list[int]:
        """Doubles, unless `marker` exists: then deletes it and exits the process (a worker killed mid-call)."""
        import os
        from pathlib import Path

        if Path(marker).exists():
            Path(marker).unlink()
            os._exit(1)
        return [x * self.scale for x in items]

    def tensor_sum(self, t: torch.Tensor) -> float:
        assert isinstance(t, torch.Tensor)
        return float(t.sum())


# --------------------------------------------------------------------------- shard (no Ray)


@pytest.mark.parametrize("n, k", [(0, 1), (5, 1), (5, 2), (7, 3), (9, 3), (3, 5), (0, 4), (10, 4)])
def test_shard_sizes_and_order(n, k):
    items = list(range(n))
    shards = shard(items, k)
    sizes = [len(s) for s in shards]
    assert len(shards) == k
    assert sum(shards, []) == items
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)


def test_shard_more_shards_than_items():
    assert shard("ab", 4) == [["a"], ["b"], [], []]


def test_shard_rejects_zero_shards():
    with pytest.raises(ValueError, match="num_shards"):
        shard([1], 0)


# --------------------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def local_ray(ray_session):
    # Actors unpickle Doubler by reference to this module, which the workers cannot import
    # (pytest put tests/unit/cluster on the driver's sys.path only): ship its code instead.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def group(local_ray):
    with WorkerGroup(Doubler, 2, name="test", kwargs={"scale": 2}) as g:
        yield g


def test_call_all_passes_rank_and_world_size(group):
    assert group.call_all("info") == [(0, 2), (1, 2)]


def test_call_sharded_keeps_input_order_across_uneven_shards(group):
    assert group.call_sharded("double", [1, 2, 3, 4, 5], offset=1) == [
        (0, 3), (0, 5), (0, 7), (1, 9), (1, 11)]


def test_call_sharded_skips_empty_shards(group):
    assert group.call_sharded("double", [7]) == [(0, 14)]
    assert group.call_sharded("double", []) == []


def test_call_sharded_checks_results(group):
    with pytest.raises(TypeError, match="must return a list"):
        group.call_sharded("not_a_list", [1, 2])
    with pytest.raises(ValueError, match="returned 1 results for 2 items"):
        group.call_sharded("drop_one", [1, 2, 3, 4])


def test_call_rank(group):
    assert group.call_rank(1, "double", [4]) == [(1, 8)]
    with pytest.raises(IndexError, match="ranks 0..1"):
        group.call_rank(2, "info")


def test_call_each_gives_each_rank_its_own_arguments(group):
    assert group.call_each("double", [([1, 2],), ([3],)]) == [[(0, 2), (0, 4)], [(1, 6)]]
    with pytest.raises(ValueError, match="2 workers"):
        group.call_each("double", [([1],)])


def test_actor_error_reaches_caller(group):
    with pytest.raises(ValueError, match="boom"):
        group.call_rank(0, "boom")


def test_object_ref_argument_arrives_as_tensor(group):
    ref = ray.put(torch.ones(1000))
    assert group.call_all("tensor_sum", ref) == [1000.0, 1000.0]
    assert ray.get(group.call_all_async("tensor_sum", ref)) == [1000.0, 1000.0]


def test_unplaceable_group_times_out_clearly(local_ray):
    with pytest.raises(RuntimeError, match=r"'too-big'.*CPU.*available") as err:
        WorkerGroup(Doubler, 1, name="too-big", num_cpus_per_worker=64, ready_timeout_s=0.5)
    assert "64" in str(err.value)


def test_shutdown_is_idempotent(local_ray):
    g = WorkerGroup(Doubler, 1, name="short-lived", num_cpus_per_worker=0.5)
    g.shutdown()
    g.shutdown()


def test_init_ray_is_idempotent(local_ray):
    cpus = ray.cluster_resources()["CPU"]
    init_ray(ClusterConfig(), num_cpus=int(cpus) + 3)  # a running Ray is reused as it is
    assert ray.is_initialized()
    assert ray.cluster_resources()["CPU"] == cpus


def test_multi_node_without_address_is_a_config_error(local_ray):
    with pytest.raises(ConfigError, match=r"cluster\.address.*ray start --head"):
        init_ray(ClusterConfig(num_nodes=2))


def test_more_gpus_than_visible_is_a_config_error(local_ray):
    with pytest.raises(ConfigError, match=r"cluster\.gpus_per_node"):
        init_ray(ClusterConfig(gpus_per_node=torch.cuda.device_count() + 1))


def _threads(actor) -> tuple[str, int, str]:
    import os

    return os.environ["OMP_NUM_THREADS"], torch.get_num_threads(), os.environ.get("TOKENIZERS_PARALLELISM", "")


@pytest.mark.parametrize("cpus, threads", [(0.5, 1), (2.0, 2)])
def test_each_worker_runs_the_threads_of_its_reservation_and_reports_where_it_landed(local_ray, cpus, threads):
    with WorkerGroup(Doubler, 1, name="threads", num_cpus_per_worker=cpus) as g:
        # Ray's job-wide variables stay (the actor's own are merged into them).
        assert g.call_all("__ray_call__", _threads) == [(str(threads), threads, "false")]
        (placement,) = g.placements()
        assert placement == {"node_ip": ray.util.get_node_ip_address(), "gpu_ids": [],
                             "node_id": ray.get_runtime_context().get_node_id()}


def test_a_worker_that_dies_is_restarted_brought_up_to_date_and_its_shard_retried(local_ray, tmp_path):
    marker = tmp_path / "die"
    restored = []
    with WorkerGroup(Doubler, 2, name="restarts", num_cpus_per_worker=0.5, max_restarts=1) as g:
        g.on_restart = restored.append
        marker.touch()  # the first worker to see it dies
        assert g.call_sharded("double_or_die", [1, 2, 3, 4], str(marker)) == [2, 4, 6, 8]
        assert g.restarts == 1 and len(restored) == 1 and not marker.exists()


def test_a_worker_that_dies_without_restarts_is_named_by_rank_and_node(local_ray, tmp_path):
    from posttrain.cluster import WorkerDiedError

    marker = tmp_path / "die"
    with WorkerGroup(Doubler, 1, name="mortal", num_cpus_per_worker=0.5) as g:
        g.placements()
        marker.touch()
        with pytest.raises(WorkerDiedError, match=r"worker group 'mortal': rank 0 \(on node [\d.]+\) died: .*"
                                                  r"running the same command again resumes"):
            g.call_rank(0, "double_or_die", [1], str(marker))


def test_workers_of_two_groups_share_bundles_which_outlive_them_until_removed(local_ray):
    shared = SharedBundles([{"CPU": 1.0}], name="shared")
    try:
        with WorkerGroup(Doubler, 1, name="a", num_cpus_per_worker=0.5, bundles=(shared, [0])) as a, \
                WorkerGroup(Doubler, 1, name="b", num_cpus_per_worker=0.5, bundles=(shared, [0])) as b:
            assert a.call_all("double", [1]) == b.call_all("double", [1]) == [[(0, 2)]]  # both fit the one bundle
        assert ray.util.placement_group_table(shared.placement_group)["state"] == "CREATED"
    finally:
        group = shared.placement_group
        shared.remove()
    assert ray.util.placement_group_table(group)["state"] == "REMOVED"
    with pytest.raises(ValueError, match=r"worker group 'c': 2 workers, 1 bundle indices"):
        WorkerGroup(Doubler, 2, name="c", bundles=(shared, [0]))

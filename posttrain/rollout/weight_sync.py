"""The policy's new weights to every generation worker, after each update.

`collective` (the default): the policy's rank 0 and the generators form a transfer group once,
at start-up, and each sync streams the weights over it in buckets (see
`posttrain.train.weight_transfer`); the policy's other ranks only help gather each sharded tensor.
`object_store`: rank 0 puts one whole CPU copy in Ray's object store, which every generator reads.
"""

from __future__ import annotations

import time

import ray

from posttrain.cluster import WorkerGroup
from posttrain.train.policy_group import PolicyGroup
from posttrain.train.weight_transfer import bucket_nbytes, plan_buckets


class WeightSync:
    """Also restores a generation worker that Ray restarted (set as its group's `on_restart`): it
    starts again from the initial weights, and, on the collective path, outside the transfer group."""

    def __init__(self, policy: PolicyGroup, generators: WorkerGroup, transport: str, bucket_mb: int):
        self.policy, self.generators, self.transport = policy, generators, transport
        self.buckets = plan_buckets(policy.generator_specs(), bucket_mb * 2**20)
        self.bytes = sum(bucket_nbytes(bucket) for bucket in self.buckets)  # to each generator, per sync
        self.weights_changed = False  # since the generators were built
        if transport == "collective":
            self._form_group()
        generators.on_restart = self._restore

    def _form_group(self) -> None:
        address = self.policy.weight_transfer_address()
        world_size = 1 + self.generators.num_workers
        ray.get(self.policy.join_weight_transfer_async(address, world_size, self.buckets)
                + self.generators.call_each_async("join_weight_transfer", [
                    (address, 1 + rank, world_size, self.buckets) for rank in range(self.generators.num_workers)]))

    def _restore(self, rank: int) -> None:
        if self.transport == "collective":
            self._form_group()  # a new group, the restarted worker in it
            if self.weights_changed:
                self.sync()
        elif self.weights_changed:
            self.generators.call_rank(rank, "update_weights", self.policy.generator_weights())

    def sync(self) -> dict[str, float]:
        """One sync; its time and the bytes each generator received."""
        start = time.perf_counter()
        self.weights_changed = True
        if self.transport == "collective":
            ray.get(self.policy.send_weights_async() + self.generators.call_all_async("receive_weights"))
        else:
            self.generators.call_all("update_weights", self.policy.generator_weights())
        return {"time/weight_sync_s": time.perf_counter() - start, "weight_sync/bytes": float(self.bytes)}

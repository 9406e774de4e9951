"""The policy's new weights to every generation worker, after each update.

`ipc` (colocated generators): each policy rank hands its buckets in place to the generators that
share its GPU or node (CUDA IPC, or shared memory on a CPU; see `posttrain.train.weight_transfer`).
`collective` (generators on GPUs of their own): the policy's rank 0 and the generators form a
transfer group once, at start-up, and each sync streams the weights over it in buckets. On both,
the policy's other ranks help gather each sharded tensor.
`object_store`: rank 0 puts one whole CPU copy in Ray's object store, which every generator reads.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

import ray

from posttrain.cluster import WorkerGroup
from posttrain.train import weight_transfer
from posttrain.train.policy_group import PolicyGroup
from posttrain.train.weight_transfer import bucket_nbytes, plan_buckets


class WeightSync:
    """Also restores a generation worker that Ray restarted (set as its group's `on_restart`): it
    starts again from the initial weights, and outside the transfer group or store.

    `colocated_ranks[j]`: the policy rank generation worker j shares its bundle with (ipc only).
    """

    def __init__(self, policy: PolicyGroup, generators: WorkerGroup, transport: str, bucket_mb: int,
                 colocated_ranks: list[int] | None = None):
        if transport == "ipc" and colocated_ranks is None:
            raise ValueError("weight sync over ipc needs each generator's colocated policy rank")
        self.policy, self.generators, self.transport = policy, generators, transport
        self.colocated_ranks = colocated_ranks
        self.buckets = plan_buckets(policy.generator_specs(), bucket_mb * 2**20)
        self.bytes = sum(bucket_nbytes(bucket) for bucket in self.buckets)  # to each generator, per sync
        self.weights_changed = False  # since the generators were built
        self.syncs = 0
        if transport == "collective":
            self._form_group()
        elif transport == "ipc":
            counts = collections.Counter(colocated_ranks)
            self.stores = policy.serve_shared_weights([counts[r] for r in range(policy.workers.num_workers)],
                                                      self.buckets)
            for rank in range(generators.num_workers):
                self._join_shared(rank)
        generators.on_restart = self._restore

    def _form_group(self) -> None:
        address = self.policy.weight_transfer_address()
        world_size = 1 + self.generators.num_workers
        ray.get(self.policy.join_weight_transfer_async(address, world_size, self.buckets)
                + self.generators.call_each_async("join_weight_transfer", [
                    (address, 1 + rank, world_size, self.buckets) for rank in range(self.generators.num_workers)]))

    def _beside(self, rank: int) -> tuple[str, bytes, int]:
        """Generation worker `rank`'s policy rank's store address and key, and its slot: its place
        among that rank's receivers."""
        policy_rank = self.colocated_ranks[rank]
        return *self.stores[policy_rank], self.colocated_ranks[:rank].count(policy_rank)

    def _join_shared(self, rank: int) -> None:
        self.generators.call_rank(rank, "join_shared_weights", *self._beside(rank), self.buckets)

    def _share(self, sync_id: int) -> None:
        """One colocated sync. A generator that dies while reading gives up its unread buckets (so
        that its policy rank does not wait for it), and once the others are done it is restarted
        and synced afresh (`_restore`), or named if it has no restart left."""
        sending = self.policy.share_weights_async(sync_id)
        receiving = self.generators.call_all_async("receive_shared_weights", sync_id)

        def give_up(rank: int) -> None:
            address, _, slot = self._beside(rank)
            weight_transfer.give_up_buckets(weight_transfer.connect_store(address, timeout_s=60), sync_id,
                                            len(self.buckets), slot)

        died = _wait_for(receiving, on_death=give_up)
        self.policy.workers.results(sending)
        for rank, ref in died:
            self.generators.recover(rank, ref)

    def _stream(self) -> None:
        """One collective sync. A generator that dies mid-stream breaks the transfer group for every
        member (gloo: at once; NCCL: once the group's 10-minute timeout passes, not yet seen on a
        GPU); once all have returned, it is restarted, a new group formed and the sync done afresh
        (`_restore`), or it is named if it has no restart left. Without a death, any failure is
        raised, naming its worker."""
        sending = self.policy.send_weights_async()
        receiving = self.generators.call_all_async("receive_weights")
        died = _wait_for(receiving)
        if not died:
            self.generators.results(receiving)  # a failure that was no death, raised naming its rank
            self.policy.workers.results(sending)
            return
        ray.wait(sending, num_returns=len(sending))  # rank 0's send fails with the group; that is expected
        for rank, ref in died:
            self.generators.recover(rank, ref)

    def _restore(self, rank: int) -> None:
        if self.transport == "collective":
            self._form_group()  # a new group, the restarted worker in it
        elif self.transport == "ipc":
            self._join_shared(rank)
        if not self.weights_changed:
            return
        if self.transport == "object_store":
            self.generators.call_rank(rank, "update_weights", self.policy.generator_weights())
        else:
            self.sync()  # every generator takes part; the others reload what they have

    def sync(self) -> dict[str, float]:
        """One sync; its time and the bytes each generator received."""
        start = time.perf_counter()
        self.weights_changed = True
        self.syncs += 1
        if self.transport == "collective":
            self._stream()
        elif self.transport == "ipc":
            self._share(self.syncs)
        else:
            self.generators.call_all("update_weights", self.policy.generator_weights())
        return {"time/weight_sync_s": time.perf_counter() - start, "weight_sync/bytes": float(self.bytes)}


def _wait_for(receiving: list[ray.ObjectRef], on_death: Callable[[int], None] | None = None
              ) -> list[tuple[int, ray.ObjectRef]]:
    """Waits for each generator's part of a sync; the ranks whose process died, with their call
    (`on_death(rank)` called as each is seen). Other failures are left to the caller."""
    died = []
    for rank, ref in enumerate(receiving):
        try:
            ray.get(ref)
        except ray.exceptions.RayActorError as err:
            if err.actor_init_failed:
                raise
            died.append((rank, ref))
            if on_death is not None:
                on_death(rank)
        except ray.exceptions.RayTaskError:
            pass
    return died

"""Ray start-up and worker groups: N actors of one role, placed together, fed shards of a batch.

A role (policy, reference, generation, environment) is a `WorkerGroup`. The driver hands it a
whole batch; the group splits it contiguously across its data-parallel workers and gathers the
results back in input order, so the training loop reads like single-process code.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from posttrain.cluster.plan import worker_threads
from posttrain.config import ClusterConfig, ConfigError

T = TypeVar("T")


def init_ray(cfg: ClusterConfig, *, num_cpus: int | None = None) -> None:
    """Connect to `cfg.address`, or start a local Ray with at least `num_cpus` logical CPUs (what
    the run's resource plan needs); a no-op when Ray is already running.

    The config is checked first, so a bad config fails the same way whether or not Ray is up.
    """
    if cfg.address is None:
        if cfg.num_nodes > 1:
            raise ConfigError(f"cluster.num_nodes={cfg.num_nodes} needs cluster.address of a running Ray "
                              "cluster (start one with `ray start --head` and `ray start --address=...` "
                              "on the other nodes); without an address only one local node is started")
        visible = torch.cuda.device_count()
        if cfg.gpus_per_node > visible:
            raise ConfigError(f"cluster.gpus_per_node={cfg.gpus_per_node} but torch sees {visible} GPU(s) "
                              "on this machine; set cluster.gpus_per_node=0 to run on CPU")
    if ray.is_initialized():
        return
    common = {
        "logging_level": logging.WARNING,
        "log_to_driver": True,  # actor prints and tracebacks show up in the driver's output
        "runtime_env": {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
    }
    if cfg.address is not None:
        try:
            ray.init(address=cfg.address, **common)
        except ConnectionError as err:
            # New clusters require a token by default, but an explicit address never turns it on here.
            raise ConnectionError(f"cannot connect to the Ray cluster at cluster.address={cfg.address!r}; "
                                  "if it uses token authentication (the default for new clusters), set "
                                  "RAY_AUTH_MODE=token and provide its token (~/.ray/auth_token or "
                                  f"RAY_AUTH_TOKEN): {err}") from err
        wanted = cfg.num_nodes * cfg.gpus_per_node
        found = ray.cluster_resources().get("GPU", 0)
        if found < wanted:
            ray.shutdown()  # leave Ray down so a corrected config can retry
            raise ConfigError(f"cluster.num_nodes x cluster.gpus_per_node = {cfg.num_nodes} x {cfg.gpus_per_node}"
                              f" = {wanted} GPUs, but the Ray cluster at cluster.address={cfg.address!r} "
                              f"has {found:g}")
        return
    ray.init(
        # Logical CPUs, not cores: our actors mostly take turns, so a few should fit on a laptop.
        num_cpus=max(os.cpu_count() or 1, 4, num_cpus or 0),
        num_gpus=cfg.gpus_per_node,
        include_dashboard=False,
        **common,
    )


def alive_nodes() -> list[dict[str, float]]:
    """Each alive node's total resources (CPU, GPU, ...)."""
    return [node["Resources"] for node in ray.nodes() if node["Alive"]]


def cluster_name(cfg: ClusterConfig) -> str:
    """How messages name the Ray cluster a run uses."""
    return "the local Ray" if cfg.address is None else f"the Ray cluster at cluster.address={cfg.address!r}"


def _nothing(_actor: Any) -> None:
    return None


def _placement(actor: Any) -> dict:
    return {"node_ip": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id(),
            "gpu_ids": [str(i) for i in ray.get_gpu_ids()]}


def shard(items: Sequence[T], num_shards: int) -> list[list[T]]:
    """Contiguous shards whose sizes differ by at most one, larger first; concatenated, they give `items`."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    base, extra = divmod(len(items), num_shards)
    shards, start = [], 0
    for i in range(num_shards):
        end = start + base + (i < extra)
        shards.append(list(items[start:end]))
        start = end
    return shards


def free_tcp_address() -> str:
    """A free TCP port on the calling worker's node, as an init method for a process group whose
    rank 0 runs here (ranks placed anywhere in the cluster can reach it)."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    return f"tcp://{ray.util.get_node_ip_address()}:{port}"


class WorkerDiedError(RuntimeError):
    """A worker's process died (killed, out of memory, its node lost) and could not be restarted."""


def _reserve(bundles: list[dict[str, float]], strategy: str, name: str, ready_timeout_s: float):
    """A placement group of `bundles`, waited for; removed again when Ray cannot place it in time."""
    group = placement_group(bundles, strategy=strategy)
    if not group.wait(timeout_seconds=ready_timeout_s):
        remove_placement_group(group)  # a pending group would otherwise grab resources later
        raise RuntimeError(f"worker group {name!r}: could not reserve {len(bundles)} bundle(s) of {bundles[0]} "
                           f"(strategy {strategy}) within {ready_timeout_s:g}s; Ray has "
                           f"{ray.available_resources()} available")
    return group


class SharedBundles:
    """One placement group whose bundles the workers of several groups share (colocation): each
    bundle holds a policy rank and the generation workers beside it, on one node and one GPU. The
    worker groups placed in it leave it reserved when they shut down; `remove` frees it."""

    def __init__(self, bundles: list[dict[str, float]], *, name: str, strategy: str = "PACK",
                 ready_timeout_s: float = 60.0):
        self.name = name
        self.placement_group = _reserve(bundles, strategy, name, ready_timeout_s)

    def remove(self) -> None:
        if ray.is_initialized() and self.placement_group is not None:
            remove_placement_group(self.placement_group)
        self.placement_group = None


def wait_until_restarted(actor: ray.actor.ActorHandle, timeout_s: float = 300.0) -> None:
    """Returns once a restarting actor answers again."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get(actor.__ray_call__.remote(_placement))
            return
        except ray.exceptions.ActorUnavailableError:  # still restarting
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


class WorkerClient:
    """A worker as a plain object: `client.method(*args)` calls it and waits for the result, so code
    below the cluster layer (an environment) can use a worker without knowing Ray. A call whose
    worker dies is made again on the worker Ray restarts, up to `retries` times (the workers it
    serves are stateless: a reward model, a judge)."""

    def __init__(self, actor: ray.actor.ActorHandle, retries: int = 0):
        self._actor, self._retries = actor, retries

    def __getattr__(self, method: str) -> Any:
        if method.startswith("_"):
            raise AttributeError(method)
        return functools.partial(self._call, method)

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        attempts = 0
        while True:
            try:
                return ray.get(getattr(self._actor, method).remote(*args, **kwargs))
            except ray.exceptions.RayActorError as err:
                if err.actor_init_failed or attempts == self._retries:
                    raise
                attempts += 1
                wait_until_restarted(self._actor)


class WorkerGroup:
    """`num_workers` Ray actors of `actor_cls`, one placement-group bundle each: bundles of their
    own, or with `bundles=(shared, indices)` worker i in bundle `indices[i]` of a `SharedBundles`.

    Each actor is built as `actor_cls(*args, rank=i, world_size=num_workers, **kwargs)`, so the
    class must accept `rank` and `world_size` keyword arguments.

    Every argument is serialized once per worker per call. To send a large object (weights, a
    batch of tensors) to all workers, `ray.put` it once and pass the returned `ObjectRef`: Ray
    hands each worker the object itself, read from the shared object store. Only top-level
    arguments are resolved this way; a ref nested inside a list or dict arrives as a ref.

    Exceptions raised in a worker reach the caller as `ray.exceptions.RayTaskError`, which is
    also an instance of the original exception class and carries its message and traceback.

    Each worker runs as many intra-op threads as it has whole CPUs reserved (at least one), not
    what the driver's shell says: OMP_NUM_THREADS inherited by every actor would oversubscribe the cores.

    With `max_restarts`, a worker whose process dies is started again by Ray (its constructor runs
    anew), `on_restart(rank)` brings it up to date (e.g. sends it the latest weights), and the
    `call_sharded` call that failed is retried on it; `restarts` counts them. A worker that dies
    beyond that (or in a group without restarts) raises WorkerDiedError naming its rank and node.
    """

    def __init__(self, actor_cls: type, num_workers: int, *, name: str, args: tuple = (),
                 kwargs: dict[str, Any] | None = None, num_cpus_per_worker: float = 1.0,
                 num_gpus_per_worker: float = 0.0, strategy: str = "PACK", ready_timeout_s: float = 60.0,
                 max_restarts: int = 0, bundles: tuple[SharedBundles, Sequence[int]] | None = None,
                 runtime_env: dict[str, Any] | None = None):
        if num_workers < 1:
            raise ValueError(f"worker group {name!r}: num_workers must be >= 1, got {num_workers}")
        self.name = name
        self.num_workers = num_workers
        self.max_restarts, self.restarts = max_restarts, 0
        self.on_restart: Callable[[int], None] | None = None
        self._placements: list[dict] | None = None
        self._pg = None  # the group's own placement group, when not in shared bundles
        if bundles is None:
            bundle = {"CPU": num_cpus_per_worker}
            if num_gpus_per_worker > 0:
                bundle["GPU"] = num_gpus_per_worker
            self._pg = group = _reserve([dict(bundle) for _ in range(num_workers)], strategy, name, ready_timeout_s)
            indices = range(num_workers)
        else:
            group, indices = bundles[0].placement_group, bundles[1]
            if len(indices) != num_workers:
                raise ValueError(f"worker group {name!r}: {num_workers} workers, {len(indices)} bundle indices")
        self._workers: list[ray.actor.ActorHandle] = []
        remote_cls = ray.remote(actor_cls)
        for rank in range(num_workers):
            strategy_i = PlacementGroupSchedulingStrategy(placement_group=group,
                                                          placement_group_bundle_index=indices[rank])
            own = dict(runtime_env or {})
            own["env_vars"] = {"OMP_NUM_THREADS": str(worker_threads(num_cpus_per_worker)), **own.get("env_vars", {})}
            options = remote_cls.options(num_cpus=num_cpus_per_worker, num_gpus=num_gpus_per_worker,
                                         scheduling_strategy=strategy_i, name=None, max_restarts=max_restarts,
                                         runtime_env=own)
            self._workers.append(options.remote(*args, rank=rank, world_size=num_workers, **(kwargs or {})))

    def clients(self) -> list[WorkerClient]:
        """Plain-call clients of each worker, to hand to other actors (e.g. environments that share
        the reward-model workers)."""
        return [WorkerClient(worker, retries=self.max_restarts) for worker in self._workers]

    def call_all_async(self, method: str, *args: Any, **kwargs: Any) -> list[ray.ObjectRef]:
        return [getattr(w, method).remote(*args, **kwargs) for w in self._workers]

    def call_all(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """The same call on every worker; results in rank order."""
        return self.results(self.call_all_async(method, *args, **kwargs))

    def results(self, refs: list[ray.ObjectRef]) -> list[Any]:
        """`ray.get` of one call per rank (in rank order), a dead worker named by rank and node."""
        return [self._result(rank, ref) for rank, ref in enumerate(refs)]

    def recover(self, rank: int, ref: ray.ObjectRef) -> None:
        """The call `ref` on `rank` failed because its worker died: once Ray has restarted it,
        `on_restart` brings it up to date (the call itself is not repeated). Raises
        `WorkerDiedError` when no restart is left."""
        self._result(rank, ref, resubmit=lambda: self._workers[rank].__ray_call__.remote(_nothing))

    def _result(self, rank: int, ref: ray.ObjectRef, resubmit: Callable[[], ray.ObjectRef] | None = None) -> Any:
        """The call's result. If the worker died, and `resubmit` is given and a restart is left, the
        call again once Ray has restarted the worker and `on_restart` has brought it up to date."""
        attempts = 0
        while True:
            try:
                return ray.get(ref)
            except ray.exceptions.RayActorError as err:
                if err.actor_init_failed:
                    raise  # its constructor raised: that error, not a death
                if resubmit is None or attempts == self.max_restarts:
                    node = (self._placements or [{}] * self.num_workers)[rank].get("node_ip", "an unknown node")
                    restarts = f" after {attempts} restart(s)" if attempts else ""
                    raise WorkerDiedError(
                        f"worker group {self.name!r}: rank {rank} (on node {node}) died{restarts}: "
                        f"{str(err).strip().splitlines()[0]}. The run cannot go on without it; running the same "
                        "command again resumes from the last checkpoint in checkpointing.checkpoint_dir") from err
                attempts += 1
                self.restarts += 1
                wait_until_restarted(self._workers[rank])
                if self.on_restart is not None:
                    self.on_restart(rank)
                ref = resubmit()

    def placements(self) -> list[dict]:
        """Each worker's node (IP and Ray node id) and the GPU ids Ray gave it, in rank order."""
        self._placements = self.call_all("__ray_call__", _placement)
        return self._placements

    def call_rank(self, rank: int, method: str, *args: Any, **kwargs: Any) -> Any:
        if not 0 <= rank < self.num_workers:
            raise IndexError(f"worker group {self.name!r} has ranks 0..{self.num_workers - 1}, got {rank}")
        return self._result(rank, getattr(self._workers[rank], method).remote(*args, **kwargs))

    def call_each(self, method: str, args_per_rank: Sequence[tuple]) -> list[Any]:
        """`method(*args_per_rank[i])` on worker i, all in flight at once; results in rank order."""
        return self.results(self.call_each_async(method, args_per_rank))

    def call_each_async(self, method: str, args_per_rank: Sequence[tuple]) -> list[ray.ObjectRef]:
        if len(args_per_rank) != self.num_workers:
            raise ValueError(f"worker group {self.name!r} has {self.num_workers} workers, "
                             f"got arguments for {len(args_per_rank)}")
        return [getattr(w, method).remote(*a) for w, a in zip(self._workers, args_per_rank, strict=True)]

    def call_sharded(self, method: str, items: Sequence[Any], *args: Any, **kwargs: Any) -> list[Any]:
        """`method(shard_i, *args, **kwargs)` on worker i; one result per item, in input order.

        Each worker must return a list as long as its shard. Workers with an empty shard are not called.
        """
        shards = shard(items, self.num_workers)
        calls = [(rank, s) for rank, s in enumerate(shards) if s]

        def submit(rank: int, items: list) -> ray.ObjectRef:
            return getattr(self._workers[rank], method).remote(items, *args, **kwargs)

        refs = [submit(rank, s) for rank, s in calls]  # all in flight before the first result is awaited
        outs = [self._result(rank, ref, functools.partial(submit, rank, s)) for (rank, s), ref in zip(calls, refs, strict=True)]
        results: list[Any] = []
        for (rank, s), out in zip(calls, outs, strict=True):
            if not isinstance(out, list):
                raise TypeError(f"worker group {self.name!r}: rank {rank} {method}() must return a list "
                                f"(one result per item), got {type(out).__name__}")
            if len(out) != len(s):
                raise ValueError(f"worker group {self.name!r}: rank {rank} {method}() returned {len(out)} "
                                 f"results for {len(s)} items")
            results.extend(out)
        return results

    def shutdown(self) -> None:
        """Kill the actors and free their bundles; safe to call twice, or after `ray.shutdown()`."""
        if ray.is_initialized():
            for worker in self._workers:
                ray.kill(worker)
            if self._pg is not None:
                remove_placement_group(self._pg)
        self._workers = []
        self._pg = None

    def __enter__(self) -> WorkerGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

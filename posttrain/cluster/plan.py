"""The resources a run's actors will ask Ray for, worked out and checked before any actor starts.

A plan that cannot fit (more CPUs or GPUs than the cluster has, an engine wider than a node,
vLLM engines that together claim more of a GPU than it has) ends the run at once with the keys
to change, instead of a placement group that waits and times out. The plan is printed at start
and saved next to the run with where each worker actually landed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from posttrain.config import ConfigError

# Of one GPU, what vLLM engines may claim together (gpu_memory_utilization summed): on a GPU of
# their own, all but what CUDA itself needs; beside a trainer, which holds its weights, gradients,
# optimizer state and activations on the same GPU, at most this much.
ENGINE_SHARE_ALONE, ENGINE_SHARE_BESIDE_TRAINER = 0.95, 0.6


def worker_threads(cpus: float) -> int:
    """Intra-op threads of a worker with `cpus` reserved: its whole CPUs, at least one."""
    return max(1, math.floor(cpus))


@dataclass
class RolePlan:
    name: str  # the worker group's name: policy, generation, environment
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float = 0.0
    key: str = ""  # the config key that sets `workers`, for messages
    strategy: str = "PACK"  # Ray placement-group strategy: PACK (fewest nodes) or SPREAD (across nodes)
    # Colocated roles: each worker's bundle among the plan's shared ones; None: bundles of its own
    bundles: list[int] | None = None

    @property
    def threads(self) -> int:
        return worker_threads(self.cpus_per_worker)

    @property
    def cpus(self) -> float:
        return self.workers * self.cpus_per_worker

    @property
    def gpus(self) -> float:
        return self.workers * self.gpus_per_worker


@dataclass
class ResourcePlan:
    roles: list[RolePlan]
    placements: dict[str, list[dict]] = field(default_factory=dict)  # role -> each worker's node and GPUs

    def role(self, name: str) -> RolePlan:
        return next(role for role in self.roles if role.name == name)

    def placement(self, name: str, shared=None) -> dict:
        """A WorkerGroup's keyword arguments for role `name`: each worker's share, and for a
        colocated role its bundles among `shared` (the `SharedBundles` of `shared_bundles`)."""
        role = self.role(name)
        kwargs = {"num_cpus_per_worker": role.cpus_per_worker, "num_gpus_per_worker": role.gpus_per_worker,
                  "strategy": role.strategy}
        if role.bundles is not None:
            kwargs["bundles"] = (shared, role.bundles)
        return kwargs

    @property
    def cpus(self) -> float:
        return sum(role.cpus for role in self.roles)

    @property
    def shared_bundles(self) -> list[dict[str, float]]:
        """The bundles the colocated roles share (none without colocation): each holds its workers'
        CPUs and one whole GPU, so that Ray never puts a second bundle's workers on that GPU."""
        colocated = [role for role in self.roles if role.bundles is not None]
        count = max((max(role.bundles) + 1 for role in colocated), default=0)
        bundles = [{"CPU": 0.0, "GPU": 0.0} for _ in range(count)]
        for role in colocated:
            for index in role.bundles:
                bundles[index]["CPU"] += role.cpus_per_worker
                bundles[index]["GPU"] += role.gpus_per_worker
        for bundle in bundles:
            bundle["GPU"] = float(math.ceil(bundle["GPU"] - 1e-9))
            if not bundle["GPU"]:
                del bundle["GPU"]
        return bundles

    @property
    def gpus(self) -> float:
        return sum(role.gpus for role in self.roles)

    def check_fits(self, nodes: list[dict[str, float]], where: str) -> None:
        """`nodes`: each alive Ray node's total resources. Raises ConfigError naming the keys to change."""
        cpus, gpus = sum(n.get("CPU", 0) for n in nodes), sum(n.get("GPU", 0) for n in nodes)
        terms = " + ".join(f"{r.key or r.name} ({r.workers}) x {r.cpus_per_worker:g}" for r in self.roles)
        if self.cpus > cpus + 1e-9:
            raise ConfigError(f"the run's workers need {terms} = {self.cpus:g} CPUs, but {where} has {cpus:g}; "
                              "lower those worker counts, or add nodes")
        terms = " + ".join(f"{r.key or r.name} ({r.workers}) x {r.gpus_per_worker:g}" for r in self.roles if r.gpus)
        if self.gpus > gpus + 1e-9:
            raise ConfigError(f"the run's workers need {terms} = {self.gpus:g} GPUs, but {where} has {gpus:g}; "
                              "lower those worker counts or cluster.gpus_per_node, or add nodes")
        widest = max((n.get("GPU", 0) for n in nodes), default=0)
        for role in self.roles:
            if role.gpus_per_worker > widest + 1e-9:
                raise ConfigError(f"each {role.name} worker needs {role.gpus_per_worker:g} GPUs on one node, but the "
                                  f"largest node of {where} has {widest:g}")
        largest = max((n.get("CPU", 0) for n in nodes), default=0)
        for bundle in self.shared_bundles:
            if bundle["CPU"] > largest + 1e-9:
                raise ConfigError(f"a policy rank and the generation workers colocated with it need {bundle['CPU']:g} "
                                  f"CPUs on one node, but the largest node of {where} has {largest:g}; raise "
                                  "policy.num_workers or lower policy.generation.num_workers (fewer per rank), or "
                                  "set policy.generation.colocated.enabled=false")

    def describe(self) -> str:
        lines = []
        for role in self.roles:
            line = f"  {role.name}: {role.workers} worker(s) x {role.cpus_per_worker:g} CPU"
            if role.gpus_per_worker:
                line += f", {role.gpus_per_worker:g} GPU"
            line += f", {role.threads} thread(s), {role.strategy}"
            if role.bundles is not None:
                line += f", colocated in shared bundle(s) {','.join(map(str, role.bundles))}"
            for rank, placement in enumerate(self.placements.get(role.name, [])):
                gpus = ",".join(map(str, placement["gpu_ids"])) or "-"
                line += f"\n    rank {rank}: node {placement['node_ip']} ({placement['node_id'][:8]}), GPU(s) {gpus}"
            lines.append(line)
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self)


def check_engine_memory(engines_per_gpu: float, utilization: float, beside_trainer: bool) -> None:
    """vLLM engines sharing one GPU must together leave it room (and the trainer its share)."""
    limit = ENGINE_SHARE_BESIDE_TRAINER if beside_trainer else ENGINE_SHARE_ALONE
    total = engines_per_gpu * utilization
    if total > limit + 1e-9:
        beside = "with the policy worker training on the same GPU" if beside_trainer else "on one GPU"
        raise ConfigError(
            f"{engines_per_gpu:g} vLLM engine(s) x policy.generation.vllm.gpu_memory_utilization ({utilization:g}) "
            f"= {total:g} of one GPU, {beside}; together they may take at most {limit:g}: set "
            f"policy.generation.vllm.gpu_memory_utilization <= {limit / engines_per_gpu:.2f}, or give the engines "
            "GPUs of their own (fewer policy.generation.num_workers per GPU)")

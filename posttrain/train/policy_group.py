"""A Policy split across `policy.num_workers` Ray actors, FSDP2 ranks behind the Policy interface.

The loops call `train_step`, `evaluate`, `reference_outputs`, `policy_outputs`, `generator_weights`,
`save`, `load_training_state` and `export_hf` the same way whether they hold a local `Policy` or a
`PolicyGroup` (several workers; GRPO always runs its policy in one, next to its generators). The group deals
each step's micro-batches round-robin to the ranks; a rank left with fewer than the others repeats
one as a filler that counts for nothing, since FSDP2 ranks gather and reduce together on every pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray
import torch
import torch.distributed as dist
import transformers

from posttrain.cluster import WorkerGroup, free_tcp_address, init_ray
from posttrain.config import ClusterConfig, PolicyConfig
from posttrain.train import weight_transfer
from posttrain.train.model import load_model
from posttrain.train.policy import ModelLoader, Objective, Policy, Scorer, add_metrics
from posttrain.train.weight_transfer import TensorSpec


class PolicyWorker:
    """One rank of a PolicyGroup, as a Ray actor: built, then `setup`
    once every rank knows where to meet (rank 0's `rendezvous_address`)."""

    def __init__(self, cfg: PolicyConfig, total_steps: int, *, rank: int, world_size: int, seed: int,
                 weights_path: str | None = None, model_loader: ModelLoader = load_model,
                 with_reference: bool = False):
        self.cfg, self.total_steps, self.rank, self.world_size = cfg, total_steps, rank, world_size
        self.seed, self.weights_path, self.model_loader = seed, weights_path, model_loader
        self.with_reference = with_reference

    def rendezvous_address(self) -> str:
        return free_tcp_address()

    def setup(self, init_method: str | None = None) -> dict[str, Any]:
        group = None
        if self.world_size > 1:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend, init_method=init_method, rank=self.rank, world_size=self.world_size)
            group = dist.group.WORLD
        # The run's seed, as the loop sets it before building a local Policy: every rank (and a
        # one-process run) initialises new weights, such as a reward head, alike.
        transformers.set_seed(self.seed)
        self.policy = Policy(self.cfg, self.total_steps, weights_path=self.weights_path, process_group=group,
                             model_loader=self.model_loader, with_reference=self.with_reference)
        return {"num_parameters": self.policy.num_parameters, "device": str(self.policy.device),
                "device_name": self.policy.device_name,
                "num_trained_parameters": self.policy.num_trained_parameters,
                "supports_shared_prefix": self.policy.supports_shared_prefix,
                "model_config": self.policy.model_config}

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]], objective: Objective, real: int) -> dict:
        return self.policy.train_step(micro_batches, objective, real=real)

    def evaluate(self, micro_batches: list[dict[str, torch.Tensor]], objective: Objective, real: int) -> dict:
        return self.policy.evaluate(micro_batches, objective, real=real)

    def reference_outputs(self, micro_batches: list[dict[str, torch.Tensor]], fn: Scorer, real: int) -> list[torch.Tensor]:
        return self.policy.reference_outputs(micro_batches, fn, real=real)

    def policy_outputs(self, micro_batches: list[dict[str, torch.Tensor]], fn: Scorer, real: int) -> list[torch.Tensor]:
        return self.policy.policy_outputs(micro_batches, fn, real=real)

    def generator_weights(self) -> dict[str, torch.Tensor]:
        return self.policy.generator_weights()

    def generator_specs(self) -> list[TensorSpec]:
        return [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in self.policy.generator_tensors()]

    def join_weight_transfer(self, address: str, world_size: int, buckets: list[list[TensorSpec]]) -> None:
        """Rank 0 becomes rank 0 of the transfer group; the other ranks only help gather each tensor."""
        self.transfer_buckets = buckets
        if self.rank == 0:
            self.transfer_group = weight_transfer.open_group(address, 0, world_size, self.policy.device)

    def send_weights(self) -> None:
        """Streams the weights to the generators (the ranks other than 0 only help gather)."""
        tensors = self.policy.generator_tensors()
        if self.rank != 0:
            _drain(tensors)
            return
        weight_transfer.send_buckets(self.transfer_group, tensors, self.transfer_buckets, self.policy.device)

    def serve_shared_weights(self, receivers: int, buckets: list[list[TensorSpec]]) -> tuple[str, bytes] | None:
        """Colocated: a rank with `receivers` generators beside it serves the store they find its
        buckets through, and returns its address and the key its announcements are signed with
        (None for a rank with none)."""
        self.transfer_buckets, self.receivers, self.shared_store = buckets, receivers, None
        if receivers == 0:
            return None
        address, self.shared_key = free_tcp_address(), weight_transfer.new_key()
        self.shared_store = weight_transfer.serve_store(address)
        return address, self.shared_key

    def share_weights(self, sync_id: int) -> None:
        """One colocated sync: this rank's buckets handed to the generators beside it, if any."""
        tensors = self.policy.generator_tensors()
        if self.shared_store is None:
            _drain(tensors)
            return
        weight_transfer.share_buckets(self.shared_store, self.shared_key, tensors, self.transfer_buckets,
                                      self.policy.device, sync_id, self.receivers)

    def offload_optimizer(self) -> None:
        self.policy.offload_optimizer()

    def onload_optimizer(self) -> None:
        self.policy.onload_optimizer()

    def save(self, directory: str) -> None:
        self.policy.save(Path(directory))

    def load_training_state(self, directory: str) -> None:
        self.policy.load_training_state(Path(directory))

    def export_hf(self, directory: str) -> str:
        return str(self.policy.export_hf(directory))


class PolicyGroup:
    def __init__(self, cfg: PolicyConfig, cluster: ClusterConfig, total_steps: int, *, seed: int,
                 weights_path: str | Path | None = None, model_loader: ModelLoader = load_model,
                 with_reference: bool = False, placement: dict[str, Any] | None = None):
        """`placement`: the WorkerGroup's placement arguments (GRPO's resource plan: GPU shares,
        strategy, colocated bundles); by default a GPU per rank when the cluster has GPUs."""
        init_ray(cluster)
        self.with_reference = with_reference
        if placement is None:
            placement = {"num_gpus_per_worker": 1.0 if cluster.gpus_per_node > 0 else 0.0}
        self.workers = WorkerGroup(PolicyWorker, cfg.num_workers, name="policy", args=(cfg, total_steps),
                                   kwargs={"seed": seed, "weights_path": str(weights_path) if weights_path else None,
                                           "model_loader": model_loader, "with_reference": with_reference},
                                   **placement)
        info = self.workers.call_all("setup", self.workers.call_rank(0, "rendezvous_address"))[0]
        self.num_parameters, self.device, self.device_name = info["num_parameters"], info["device"], info["device_name"]
        self.num_trained_parameters = info["num_trained_parameters"]
        self.supports_shared_prefix = info["supports_shared_prefix"]
        self.model_config = info["model_config"]

    def _deal(self, micro_batches: list[dict[str, torch.Tensor]]) -> list[tuple[list[dict], int]]:
        """Each rank's micro-batches (round-robin) and how many are real, padded to equal counts."""
        ranks = self.workers.num_workers
        shares = [micro_batches[rank::ranks] for rank in range(ranks)]
        count = len(shares[0])
        return [(share + [micro_batches[0]] * (count - len(share)), len(share)) for share in shares]

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]], objective: Objective) -> dict:
        outs = self.workers.call_each("train_step", [(share, objective, real) for share, real in self._deal(micro_batches)])
        return {**outs[0], "metrics": _add_ranks(out["metrics"] for out in outs)}

    def evaluate(self, micro_batches: list[dict[str, torch.Tensor]], objective: Objective) -> dict:
        outs = self.workers.call_each("evaluate", [(share, objective, real) for share, real in self._deal(micro_batches)])
        return {"loss": outs[0]["loss"], "metrics": _add_ranks(out["metrics"] for out in outs)}

    def reference_outputs(self, micro_batches: list[dict[str, torch.Tensor]], fn: Scorer) -> list[torch.Tensor]:
        return self._outputs("reference_outputs", micro_batches, fn)

    def policy_outputs(self, micro_batches: list[dict[str, torch.Tensor]], fn: Scorer) -> list[torch.Tensor]:
        return self._outputs("policy_outputs", micro_batches, fn)

    def _outputs(self, method: str, micro_batches: list[dict[str, torch.Tensor]], fn: Scorer) -> list[torch.Tensor]:
        outs = self.workers.call_each(method, [(share, fn, real) for share, real in self._deal(micro_batches)])
        return [outs[i % len(outs)][i // len(outs)] for i in range(len(micro_batches))]  # undo the round-robin

    def generator_weights(self) -> ray.ObjectRef:
        """Rank 0's `Policy.generator_weights()` as a Ray object reference: passed on to the
        generators, it travels through the object store, never through the driver."""
        return self.workers.call_all_async("generator_weights")[0]

    def generator_specs(self) -> list[TensorSpec]:
        """Name, shape and dtype of each tensor `generator_tensors` yields (gathers the model once)."""
        return self.workers.call_all("generator_specs")[0]

    def weight_transfer_address(self) -> str:
        return self.workers.call_rank(0, "rendezvous_address")

    def join_weight_transfer_async(self, address: str, world_size: int,
                                   buckets: list[list[TensorSpec]]) -> list[ray.ObjectRef]:
        return self.workers.call_all_async("join_weight_transfer", address, world_size, buckets)

    def send_weights_async(self) -> list[ray.ObjectRef]:
        """Every rank's part of a weight transfer (await them with the generators' `receive_weights`)."""
        return self.workers.call_all_async("send_weights")

    def serve_shared_weights(self, receivers_per_rank: list[int],
                             buckets: list[list[TensorSpec]]) -> list[tuple[str, bytes] | None]:
        """Colocated weight sync: each rank's store address and key, for the generators beside it."""
        return self.workers.call_each("serve_shared_weights", [(n, buckets) for n in receivers_per_rank])

    def share_weights_async(self, sync_id: int) -> list[ray.ObjectRef]:
        """Every rank's part of a colocated sync (await them with the generators' `receive_shared_weights`)."""
        return self.workers.call_all_async("share_weights", sync_id)

    def offload_optimizer(self) -> None:
        """`Policy.offload_optimizer` on every rank: the GPUs to the colocated generators."""
        self.workers.call_all("offload_optimizer")

    def onload_optimizer(self) -> None:
        self.workers.call_all("onload_optimizer")

    def save(self, directory: Path) -> None:
        self.workers.call_all("save", str(directory))

    def load_training_state(self, directory: Path) -> None:
        self.workers.call_all("load_training_state", str(directory))

    def export_hf(self, directory: str | Path) -> Path:
        return Path(self.workers.call_all("export_hf", str(directory))[0])

    def close(self) -> None:
        self.workers.shutdown()


def _drain(tensors) -> None:
    """Takes part in gathering every tensor without keeping any (a rank that sends nothing)."""
    for _ in tensors:
        pass


def _add_ranks(per_rank) -> dict[str, float]:
    total: dict[str, float] = {}
    for metrics in per_rank:
        add_metrics(total, metrics)
    return total


def make_policy(cfg: PolicyConfig, cluster: ClusterConfig, total_steps: int, *, seed: int, tokenizer=None,
                weights_path: str | Path | None = None, model_loader: ModelLoader = load_model,
                with_reference: bool = False) -> Policy | PolicyGroup:
    """A local Policy for one worker (the caller has seeded this process), a PolicyGroup of FSDP2
    ranks on Ray, each seeded with `seed`, for several."""
    if cfg.num_workers == 1:
        return Policy(cfg, total_steps, tokenizer=tokenizer, weights_path=weights_path, model_loader=model_loader,
                      with_reference=with_reference)
    return PolicyGroup(cfg, cluster, total_steps, seed=seed, weights_path=weights_path, model_loader=model_loader,
                       with_reference=with_reference)

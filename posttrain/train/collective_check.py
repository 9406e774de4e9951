"""Every tensor handed to a collective must live where the group's backend wants it: NCCL takes
CUDA tensors only, gloo (as used here) CPU ones. A CPU tensor given to an NCCL group fails only
on a GPU machine, so the CPU tests and the GPU check run each collective path inside
`checked_collectives`, which records every call and fails on the first misplaced tensor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

# The torch.distributed functions posttrain and FSDP2 call, with where their tensors are.
_COLLECTIVES = ("all_reduce", "broadcast", "all_gather_into_tensor", "reduce_scatter_tensor", "all_gather_single",
                "reduce_scatter_single", "all_gather", "reduce_scatter", "all_to_all_single", "reduce", "gather",
                "scatter", "send", "recv")


def group_device_type(group: dist.ProcessGroup | None) -> str:
    """The device type a group's collectives take their tensors on: "cuda" for NCCL, else "cpu"."""
    # A standalone group (the weight transfer's) names its backend; a registered one, dist knows.
    backend = group.name() if group is not None and hasattr(group, "name") else dist.get_backend(group)
    return "cuda" if "nccl" in str(backend).lower() else "cpu"


def check_on_group_device(tensor: torch.Tensor, group: dist.ProcessGroup | None, what: str,
                          wanted: str | None = None) -> None:
    """Fails, naming `what`, when `tensor` is not on the device type the group's backend takes."""
    wanted = wanted or group_device_type(group)
    if tensor.device.type != wanted:
        raise RuntimeError(f"{what}: a {tensor.device.type} tensor given to a collective of a group whose "
                           f"backend takes {wanted} tensors")


@dataclass
class CollectiveLog:
    calls: list[str] = field(default_factory=list)  # the collectives called, in order


@contextlib.contextmanager
def checked_collectives(as_backend: str | None = None) -> Iterator[CollectiveLog]:
    """Runs the block with every torch.distributed collective checked and logged. `as_backend`
    ("nccl") holds every group to that backend's rule whatever it really is, so that a test can
    show a CPU tensor reaching what would be an NCCL group."""
    wanted = None if as_backend is None else ("cuda" if as_backend == "nccl" else "cpu")
    log = CollectiveLog()
    originals = {name: getattr(dist, name) for name in _COLLECTIVES}

    def checked(name, original):
        def call(*args, **kwargs):
            group = kwargs.get("group")
            for value in [*args, *kwargs.values()]:
                for tensor in value if isinstance(value, (list, tuple)) else [value]:
                    if isinstance(tensor, torch.Tensor):
                        check_on_group_device(tensor, group, f"torch.distributed.{name}", wanted)
            log.calls.append(name)
            return original(*args, **kwargs)
        return call

    for name, original in originals.items():
        setattr(dist, name, checked(name, original))
    try:
        yield log
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)

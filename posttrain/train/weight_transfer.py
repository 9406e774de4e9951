"""Weights from the trainer to the generators over a process group, in buckets.

The policy's rank 0 and every generation worker join one process group of their own (NCCL on
GPUs, gloo on CPU: the same code), separate from the policy's FSDP2 group. Each sync streams the
weights as a fixed sequence of buckets: rank 0 packs a bucket's tensors into one flat buffer and
broadcasts it; each generator unpacks it into views and loads them before the next bucket
arrives, so neither side ever holds a second whole copy of the model, and nothing passes
through the driver or Ray's object store. The bucket plan (names, shapes, dtypes) is computed
once, from the trainer's tensors, and given to every member at set-up.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from posttrain.train.collective_check import check_on_group_device

_ALIGN = 16  # bytes: every tensor starts at an offset its element size divides


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return _aligned(torch.Size(self.shape).numel() * self.dtype.itemsize)


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def plan_buckets(specs: Iterable[TensorSpec], bucket_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive tensors grouped into buckets of at most `bucket_bytes` (a larger tensor is a
    bucket of its own), in the order the trainer produces them."""
    buckets: list[list[TensorSpec]] = []
    size = 0
    for spec in specs:
        if not buckets or size + spec.nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(spec)
        size += spec.nbytes
    return buckets


def bucket_nbytes(bucket: list[TensorSpec]) -> int:
    return sum(spec.nbytes for spec in bucket)


def open_group(address: str, rank: int, world_size: int, device: torch.device,
               timeout_s: float = 600.0) -> dist.ProcessGroup:
    """Joins the transfer group whose rank 0 listens at `address` ("tcp://host:port"); every member
    calls this at the same time. NCCL when `device` is a GPU, gloo otherwise."""
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, int(port), world_size, is_master=rank == 0, timeout=timeout)
    store = dist.PrefixStore("posttrain-weights", store)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        return dist.ProcessGroupNCCL(store, rank, world_size, dist.ProcessGroupNCCL.Options())
    return dist.ProcessGroupGloo(store, rank, world_size, timeout)


def send_buckets(group: dist.ProcessGroup, tensors: Iterator[tuple[str, torch.Tensor]],
                 buckets: list[list[TensorSpec]], device: torch.device) -> int:
    """Rank 0's side: `tensors` (in the plan's order) packed and broadcast bucket by bucket.
    Returns the bytes sent to each receiver."""
    sent = 0
    for bucket in buckets:
        flat = torch.empty(bucket_nbytes(bucket), dtype=torch.uint8, device=device)
        offset = 0
        for spec in bucket:
            name, tensor = next(tensors)
            if name != spec.name or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
                raise RuntimeError(f"weight transfer: the trainer produced {name} {tuple(tensor.shape)} "
                                   f"{tensor.dtype} where the plan has {spec}")
            _view(flat, offset, spec).copy_(tensor)
            offset += spec.nbytes
        _broadcast(group, flat)
        sent += flat.numel()
    if next(tensors, None) is not None:
        raise RuntimeError("weight transfer: the trainer produced more tensors than the plan holds")
    return sent


def receive_buckets(group: dist.ProcessGroup, buckets: list[list[TensorSpec]],
                    device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """A receiver's side: (name, tensor) per planned tensor, views into the bucket just received.
    A bucket's buffer lives while the consumer holds one of its views, so a consumer that copies
    each tensor as it comes holds at most two buckets."""
    for bucket in buckets:
        flat = torch.empty(bucket_nbytes(bucket), dtype=torch.uint8, device=device)
        _broadcast(group, flat)
        offset = 0
        for spec in bucket:
            yield spec.name, _view(flat, offset, spec)
            offset += spec.nbytes


def _broadcast(group: dist.ProcessGroup, flat: torch.Tensor) -> None:
    check_on_group_device(flat, group, "weight transfer")
    group.broadcast(flat, 0).wait()


def _view(flat: torch.Tensor, offset: int, spec: TensorSpec) -> torch.Tensor:
    count = torch.Size(spec.shape).numel() * spec.dtype.itemsize
    return flat[offset : offset + count].view(spec.dtype).view(spec.shape)

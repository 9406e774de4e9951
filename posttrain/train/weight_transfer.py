"""Weights from the trainer to the generators, in buckets, without Ray's object store.

Each sync streams the weights as a fixed sequence of buckets: a sender packs a bucket's tensors
into one flat buffer, each generator unpacks it into views and loads them before the next bucket
arrives, so neither side ever holds a second whole copy of the model, and nothing passes through
the driver. The bucket plan (names, shapes, dtypes) is computed once, from the trainer's
tensors, and given to every member at set-up. Two ways to hand a bucket over:

- over a process group (disaggregated generators): the policy's rank 0 and every generation
  worker join one group of their own (NCCL on GPUs, gloo on CPU: the same code), separate from
  the policy's FSDP2 group, and rank 0 broadcasts each bucket;
- in place (colocated generators, on their policy rank's GPU or node): each policy rank packs a
  bucket into a buffer the generators beside it map without a copy (a CUDA IPC handle on a GPU,
  a file in shared memory on a CPU), announced through a small key-value store (torch's TCPStore)
  that the rank serves; at most two buckets are out at once. Any process on the node can reach
  the store's port, so each announcement is signed with a secret key that travels through Ray,
  never through the store, and a receiver unpickles only what carries a valid signature.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import os
import pickle
import secrets
import socket
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

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
                 buckets: list[list[TensorSpec]], device: torch.device) -> None:
    """Rank 0's side: `tensors` (in the plan's order) packed and broadcast bucket by bucket."""
    for bucket in buckets:
        flat = torch.empty(bucket_nbytes(bucket), dtype=torch.uint8, device=device)
        _pack(flat, tensors, bucket)
        _broadcast(group, flat)
    _check_exhausted(tensors)


def _pack(flat: torch.Tensor, tensors: Iterator[tuple[str, torch.Tensor]], bucket: list[TensorSpec]) -> None:
    offset = 0
    for spec in bucket:
        name, tensor = next(tensors)
        if name != spec.name or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise RuntimeError(f"weight transfer: the trainer produced {name} {tuple(tensor.shape)} "
                               f"{tensor.dtype} where the plan has {spec}")
        _view(flat, offset, spec).copy_(tensor)
        offset += spec.nbytes


def _check_exhausted(tensors: Iterator) -> None:
    if next(tensors, None) is not None:
        raise RuntimeError("weight transfer: the trainer produced more tensors than the plan holds")


def receive_buckets(group: dist.ProcessGroup, buckets: list[list[TensorSpec]],
                    device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """A receiver's side: (name, tensor) per planned tensor, views into the bucket just received.
    A bucket's buffer lives while the consumer holds one of its views, so a consumer that copies
    each tensor as it comes holds at most two buckets."""
    for bucket in buckets:
        flat = torch.empty(bucket_nbytes(bucket), dtype=torch.uint8, device=device)
        _broadcast(group, flat)
        yield from _unpack(flat, bucket)


def _unpack(flat: torch.Tensor, bucket: list[TensorSpec]) -> Iterator[tuple[str, torch.Tensor]]:
    offset = 0
    for spec in bucket:
        yield spec.name, _view(flat, offset, spec)
        offset += spec.nbytes


# ---------------------------------------------------------------- colocated: buckets handed over in place


def local_address() -> str:
    """A free TCP port on the loopback interface, for a store or group whose members all run on this machine."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


def serve_store(address: str, timeout_s: float = 600.0) -> dist.TCPStore:
    """The key-value store a policy rank announces its shared buckets in, listening at `address`."""
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    return dist.TCPStore(host, int(port), None, is_master=True, timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def connect_store(address: str, timeout_s: float = 600.0) -> dist.TCPStore:
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    return dist.TCPStore(host, int(port), None, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))


def new_key() -> bytes:
    """A secret that signs one sender's announcements (give it to the receivers through Ray)."""
    return secrets.token_bytes(32)


def _announce(store: dist.Store, key: bytes, name: str, value: object) -> None:
    payload = pickle.dumps(value)
    store.set(name, hmac.new(key, payload, hashlib.sha256).digest() + payload)


def _announced(store: dist.Store, key: bytes, name: str) -> object:
    signed = store.get(name)
    signature, payload = signed[:32], signed[32:]
    if not hmac.compare_digest(signature, hmac.new(key, payload, hashlib.sha256).digest()):
        raise RuntimeError(f"weight transfer: the announcement {name!r} in the store is not signed with this "
                           "transfer's key (another process wrote it); it is not read")
    return pickle.loads(payload)


def share_buckets(store: dist.Store, key: bytes, tensors: Iterator[tuple[str, torch.Tensor]],
                  buckets: list[list[TensorSpec]], device: torch.device, sync_id: int, receivers: int) -> None:
    """A policy rank's side of a colocated sync: each bucket packed into a fresh shared buffer and
    announced; returns once all `receivers` have taken every bucket. The receivers' views stay
    valid after that: a file's mapping outlives its name, and CUDA keeps memory that another
    process has opened until it lets go."""
    out: list[tuple[int, _SharedBuffer]] = []  # buckets not yet taken by every receiver
    announced = 0
    try:
        for index, bucket in enumerate(buckets):
            if len(out) == 2:
                _release(store, sync_id, receivers, *out.pop(0))
            buffer = _SharedBuffer(bucket_nbytes(bucket), device)
            out.append((index, buffer))
            _pack(buffer.tensor, tensors, bucket)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the copies are done before anyone reads
            _announce(store, key, f"{sync_id}/{index}", buffer.handle)
            announced += 1
        _check_exhausted(tensors)
        while out:
            _release(store, sync_id, receivers, *out.pop(0))
    except BaseException as err:
        # The receivers waiting for the buckets that will not come learn why, instead of waiting
        # for the store's timeout.
        for index in range(announced, len(buckets)):
            _announce(store, key, f"{sync_id}/{index}", ("failed", f"{type(err).__name__}: {err}"))
        raise
    finally:
        for _, buffer in out:
            buffer.close()


def receive_shared_buckets(store: dist.Store, key: bytes, buckets: list[list[TensorSpec]], sync_id: int,
                           slot: int) -> Iterator[tuple[str, torch.Tensor]]:
    """A colocated generator's side (`slot`: its number among its policy rank's receivers): views
    into each bucket as it is announced. A bucket counts as taken once the consumer asks for the
    next tensor after it."""
    for index, bucket in enumerate(buckets):
        flat = _open_shared(_announced(store, key, f"{sync_id}/{index}"))
        yield from _unpack(flat, bucket)
        store.set(f"{sync_id}/{index}/taken/{slot}", b"1")


def give_up_buckets(store: dist.Store, sync_id: int, count: int, slot: int) -> None:
    """Marks every bucket of a sync as taken by receiver `slot`, which will not read them (it
    failed or died), so that the sender's `share_buckets` can end."""
    for index in range(count):
        store.set(f"{sync_id}/{index}/taken/{slot}", b"1")


def _release(store: dist.Store, sync_id: int, receivers: int, index: int, buffer: _SharedBuffer) -> None:
    taken = [f"{sync_id}/{index}/taken/{slot}" for slot in range(receivers)]
    store.wait(taken)
    buffer.close()
    for key in (f"{sync_id}/{index}", *taken):
        store.delete_key(key)


class _SharedBuffer:
    """A flat uint8 buffer other processes beside this one can map: a CUDA allocation with its IPC
    handle, or on a CPU a file in shared memory (/dev/shm where there is one)."""

    def __init__(self, nbytes: int, device: torch.device):
        self.path = None
        if device.type == "cuda":
            from torch.multiprocessing.reductions import reduce_tensor

            self.tensor = torch.empty(nbytes, dtype=torch.uint8, device=device)
            self.handle = ("cuda", reduce_tensor(self.tensor))
        else:
            folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
            self.path = Path(folder) / f"posttrain-weights-{uuid.uuid4().hex}"
            self.tensor = torch.from_file(str(self.path), shared=True, size=nbytes, dtype=torch.uint8)
            self.handle = ("file", str(self.path), nbytes)

    def close(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)
        self.tensor = None


def _open_shared(handle: tuple) -> torch.Tensor:
    if handle[0] == "failed":
        raise RuntimeError(f"weight transfer: the sender failed before this bucket ({handle[1]})")
    if handle[0] == "cuda":
        rebuild, args = handle[1]
        return rebuild(*args)
    _, path, nbytes = handle
    return torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)


def _broadcast(group: dist.ProcessGroup, flat: torch.Tensor) -> None:
    check_on_group_device(flat, group, "weight transfer")
    group.broadcast(flat, 0).wait()


def _view(flat: torch.Tensor, offset: int, spec: TensorSpec) -> torch.Tensor:
    count = torch.Size(spec.shape).numel() * spec.dtype.itemsize
    return flat[offset : offset + count].view(spec.dtype).view(spec.shape)

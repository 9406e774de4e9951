"""The bucketed weight transfer, over a standalone gloo group and in place through shared memory:
what the receivers load is exactly what the trainer produced, bucket plans respect their size,
nothing is left in shared memory, and a device mismatch is named."""

from __future__ import annotations

import glob

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from posttrain.train import weight_transfer as wt
from posttrain.train.collective_check import check_on_group_device

SPECS = [wt.TensorSpec("embed", (11, 8), torch.bfloat16), wt.TensorSpec("norm", (8,), torch.float32),
         wt.TensorSpec("layer.0", (40, 8), torch.bfloat16), wt.TensorSpec("head_bias", (3,), torch.bfloat16)]


def _tensors(seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(s.name, torch.randn(s.shape, generator=generator).to(s.dtype)) for s in SPECS]


def test_buckets_hold_consecutive_tensors_up_to_their_size():
    buckets = wt.plan_buckets(SPECS, 256)
    assert [[s.name for s in b] for b in buckets] == [["embed", "norm"], ["layer.0"], ["head_bias"]]
    assert wt.bucket_nbytes(buckets[0]) == 11 * 8 * 2 + 32  # the float32 vector starts 16-byte aligned
    assert [s for b in buckets for s in b] == SPECS
    assert len(wt.plan_buckets(SPECS, 2**30)) == 1


def _member(rank: int, address: str, buckets, folder: str) -> None:
    group = wt.open_group(address, rank, 3, torch.device("cpu"), timeout_s=60)
    if rank == 0:
        wt.send_buckets(group, iter(_tensors()), buckets, torch.device("cpu"))
        return
    result = {name: tensor.clone() for name, tensor in wt.receive_buckets(group, buckets, torch.device("cpu"))}
    torch.save(result, f"{folder}/{rank}.pt")


def _shared_member(rank: int, address: str, key: bytes, buckets, folder: str) -> None:
    if rank == 0:
        store = wt.serve_store(address, timeout_s=60)
        for sync_id in (1, 2):  # the second sync sends other values under fresh keys
            wt.share_buckets(store, key, iter(_tensors(seed=sync_id)), buckets, torch.device("cpu"), sync_id,
                             receivers=2)
        return
    store = wt.connect_store(address, timeout_s=60)
    for sync_id in (1, 2):
        # Views kept, not copied, past the sender's release of their buckets: the mappings stay valid.
        views = dict(wt.receive_shared_buckets(store, key, buckets, sync_id, slot=rank - 1))
        torch.save({name: view.clone() for name, view in views.items()}, f"{folder}/{rank}-{sync_id}.pt")


def _check_received(received: dict[str, torch.Tensor], seed: int) -> None:
    assert list(received) == [s.name for s in SPECS]
    for name, tensor in _tensors(seed):
        assert received[name].dtype == tensor.dtype
        assert torch.equal(received[name], tensor)


def test_two_receivers_get_every_tensor_bit_exact(tmp_path):
    buckets = wt.plan_buckets(SPECS, 256)
    mp.spawn(_member, args=(wt.local_address(), buckets, str(tmp_path)), nprocs=3)
    for rank in (1, 2):
        _check_received(torch.load(tmp_path / f"{rank}.pt"), seed=0)


def test_buckets_shared_in_place_reach_every_receiver_and_leave_nothing_behind(tmp_path):
    before = set(glob.glob("/dev/shm/posttrain-weights-*"))
    buckets = wt.plan_buckets(SPECS, 256)
    assert len(buckets) == 3  # more than the two the sender keeps out at once
    mp.spawn(_shared_member, args=(wt.local_address(), wt.new_key(), buckets, str(tmp_path)), nprocs=3)
    for rank in (1, 2):
        for sync_id in (1, 2):
            _check_received(torch.load(tmp_path / f"{rank}-{sync_id}.pt"), seed=sync_id)
    assert set(glob.glob("/dev/shm/posttrain-weights-*")) == before


def test_the_sender_refuses_tensors_that_differ_from_the_plan():
    class NoGroup:  # never reached: the mismatch is found while packing the first bucket
        def broadcast(self, *args):
            raise AssertionError

    wrong = [("embed", torch.zeros(11, 8, dtype=torch.float32))]
    with pytest.raises(RuntimeError, match=r"embed \(11, 8\) torch.float32 where the plan has"):
        wt.send_buckets(NoGroup(), iter(wrong), wt.plan_buckets(SPECS, 256), torch.device("cpu"))


def test_receivers_of_a_sender_that_failed_are_told_why_instead_of_waiting():
    store, key = dist.HashStore(), wt.new_key()
    buckets = wt.plan_buckets(SPECS, 256)
    wrong = [("embed", torch.zeros(11, 8, dtype=torch.float32))]
    with pytest.raises(RuntimeError, match="where the plan has"):
        wt.share_buckets(store, key, iter(wrong), buckets, torch.device("cpu"), sync_id=1, receivers=1)
    with pytest.raises(RuntimeError, match=r"the sender failed before this bucket \(RuntimeError: .*embed \(11, 8\)"):
        dict(wt.receive_shared_buckets(store, key, buckets, sync_id=1, slot=0))


class _Planted:
    def __reduce__(self):
        return (exec, ("raise SystemExit('a planted pickle ran')",))


def test_an_announcement_not_signed_with_the_key_is_never_unpickled():
    """Any process on the node can reach the store: what it plants there is refused, not run."""
    import pickle

    store = dist.HashStore()
    store.set("1/0", bytes(32) + pickle.dumps(_Planted()))
    with pytest.raises(RuntimeError, match=r"announcement '1/0' in the store is not signed with this transfer's key"):
        next(wt.receive_shared_buckets(store, wt.new_key(), wt.plan_buckets(SPECS, 256), sync_id=1, slot=0))


def test_a_tensor_on_the_wrong_device_for_the_backend_is_named():
    class NCCLGroup:
        def name(self):
            return "NCCL"

    with pytest.raises(RuntimeError, match="a cpu tensor given to a collective of a group whose backend takes cuda"):
        check_on_group_device(torch.zeros(2), NCCLGroup(), "weight transfer")

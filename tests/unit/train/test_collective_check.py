"""Each collective path of a sharded Policy (train step, evaluation, weights for the generators,
checkpoint) runs through the collective checker on two gloo ranks, and the checker fails on a
CPU tensor given to a group held to NCCL's rule (the bug that only a GPU machine would show)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from posttrain.algos.sft import nll_loss
from posttrain.config import PolicyConfig
from posttrain.data.collate import make_micro_batches
from posttrain.data.conversations import Sample
from posttrain.train.collective_check import checked_collectives
from posttrain.train.logprobs import sequence_logprobs
from posttrain.train.policy import Policy


def _rank(rank: int, world: int, init_file: str, model_dir: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        policy = Policy(PolicyConfig(model_name=model_dir), 4, device=torch.device("cpu"), process_group=dist.group.WORLD)
        samples = [Sample([5, 6, 7, 8, 9], [0, 1, 1, 1, 1]), Sample([9, 8, 7], [0, 1, 1])]
        batches = make_micro_batches(samples, 1, policy.tokenizer.pad_token_id)
        objective = lambda m, b: nll_loss(*sequence_logprobs(m, b), 6)  # noqa: E731
        with checked_collectives() as log:
            policy.train_step(batches, objective)
            policy.evaluate(batches, objective)
            names = [name for name, _ in policy.generator_tensors()]
            policy.save(__import__("pathlib").Path(out_dir))
        assert names == list(policy.model.state_dict())
        assert {"all_reduce", "all_gather_single", "reduce_scatter_single"} <= set(log.calls), log.calls
        with pytest.raises(RuntimeError, match="torch.distributed.all_reduce: a cpu tensor given to a collective "
                                               "of a group whose backend takes cuda tensors"):
            with checked_collectives(as_backend="nccl"):
                dist.all_reduce(torch.zeros(1), group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def test_every_collective_of_a_sharded_policy_is_on_its_groups_device(tiny_model_dir, tmp_path):
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), str(tiny_model_dir), str(tmp_path / "ckpt")), nprocs=2)
    assert (tmp_path / "ckpt" / "optimizer.pt").is_file()


def test_the_groups_backend_decides_the_device():
    from posttrain.train.collective_check import group_device_type

    class Named:
        def __init__(self, name):
            self._name = name

        def name(self):
            return self._name

    assert group_device_type(Named("NCCL")) == "cuda" and group_device_type(Named("gloo")) == "cpu"

"""Two gloo ranks, each on half the global batch, must take exactly the single-process step."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from posttrain.algos.sft import nll_loss
from posttrain.config import PolicyConfig
from posttrain.data.collate import make_micro_batches
from posttrain.data.formats import Sample
from posttrain.train.logprobs import sequence_logprobs
from posttrain.train.policy import Policy


def _samples() -> list[Sample]:
    g = torch.Generator().manual_seed(1)
    out = []
    for n in (6, 11, 4, 9, 13, 7):
        out.append(Sample(torch.randint(3, 400, (n,), generator=g).tolist(),
                          [0] + torch.randint(0, 2, (n - 1,), generator=g).tolist()))
    return out


def _step(policy: Policy, samples: list[Sample], num_targets: int) -> dict:
    batches = make_micro_batches(samples, 2, policy.tokenizer.pad_token_id)
    return policy.train_step(batches, lambda m, b: nll_loss(*sequence_logprobs(m, b), num_targets))


def _cfg(model_dir: str) -> PolicyConfig:
    cfg = PolicyConfig(model_name=model_dir)
    cfg.optimizer.lr = 1e-2
    return cfg


def _rank(rank: int, world: int, init_file: str, model_dir: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        samples = _samples()
        num_targets = sum(sum(s.loss_mask[1:]) for s in samples)  # global normaliser
        policy = Policy(_cfg(model_dir), 10, device=torch.device("cpu"), process_group=dist.group.WORLD)
        metrics = _step(policy, samples[rank::world], num_targets)
        if rank == 0:
            torch.save({"grads": [p.grad.clone() for p in policy.model.parameters()], "metrics": metrics},
                       out_file)
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_one_process(tiny_model_dir, tmp_path):
    samples = _samples()
    single = Policy(_cfg(str(tiny_model_dir)), 10, device=torch.device("cpu"))
    single_metrics = _step(single, samples, sum(sum(s.loss_mask[1:]) for s in samples))

    out = tmp_path / "rank0.pt"
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), str(tiny_model_dir), str(out)), nprocs=2, join=True)
    result = torch.load(out)
    assert abs(result["metrics"]["loss"] - single_metrics["loss"]) < 1e-5
    assert abs(result["metrics"]["grad_norm"] - single_metrics["grad_norm"]) < 1e-4
    # Gradients, not updated weights: Adam's first step is ~lr*sign(g), which turns float noise in
    # near-zero gradients into lr-sized differences.
    for got, want in zip(result["grads"], single.model.parameters(), strict=True):
        torch.testing.assert_close(got, want.grad, rtol=1e-4, atol=1e-7)

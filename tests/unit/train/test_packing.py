"""Packed, dynamically batched and padded micro-batches must give the same loss and gradients."""

import pytest
import torch

from posttrain.algos.sft import nll_loss
from posttrain.config import PolicyConfig
from posttrain.data.collate import fill_token_budget, make_micro_batches, pack_sequences
from posttrain.data.conversations import Sample
from posttrain.train.logprobs import sequence_logprobs
from posttrain.train.model import load_model, load_tokenizer


@pytest.fixture(scope="module")
def model_and_samples(tiny_model_dir):
    cfg = PolicyConfig(model_name=str(tiny_model_dir))
    model = load_model(cfg, torch.device("cpu"))
    pad = load_tokenizer(cfg).pad_token_id
    g = torch.Generator().manual_seed(0)
    samples = []
    for n in (5, 17, 9, 30, 3, 12, 21, 8):
        ids = torch.randint(3, 400, (n,), generator=g).tolist()
        mask = [0] + torch.randint(0, 2, (n - 1,), generator=g).tolist()
        samples.append(Sample(ids, mask))
    return model, pad, samples


def _loss_and_grads(model, micro_batches, num_targets):
    model.zero_grad()
    total = 0.0
    for batch in micro_batches:
        loss = nll_loss(*sequence_logprobs(model, batch), num_targets)
        loss.backward()
        total += loss.item()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return total, grads


@pytest.mark.parametrize("pack", [(32, 64), (40, 200), (64, 64)])
def test_packed_equals_padded(model_and_samples, pack):
    model, pad, samples = model_and_samples
    num_targets = sum(sum(s.loss_mask[1:]) for s in samples)
    padded_loss, padded_grads = _loss_and_grads(model, make_micro_batches(samples, 3, pad), num_targets)
    packed = make_micro_batches(samples, 3, pad, pack=pack)
    assert sum(b["input_ids"].shape[0] for b in packed) < len(samples)  # really packed
    packed_loss, packed_grads = _loss_and_grads(model, packed, num_targets)
    assert abs(packed_loss - padded_loss) < 1e-5
    torch.testing.assert_close(packed_grads, padded_grads, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("budget", [30, 64, 1000])
def test_dynamic_batches_equal_fixed_ones(model_and_samples, budget):
    model, pad, samples = model_and_samples
    num_targets = sum(sum(s.loss_mask[1:]) for s in samples)
    fixed_loss, fixed_grads = _loss_and_grads(model, make_micro_batches(samples, 1, pad), num_targets)
    dynamic = make_micro_batches(samples, 1, pad, token_budget=budget)
    assert all(b["input_ids"].numel() <= budget for b in dynamic)
    assert len(dynamic) < len(samples)  # short sequences really share micro-batches
    assert sum(b["input_ids"].shape[0] for b in dynamic) == len(samples)
    dynamic_loss, dynamic_grads = _loss_and_grads(model, dynamic, num_targets)
    assert abs(dynamic_loss - fixed_loss) < 1e-5
    torch.testing.assert_close(dynamic_grads, fixed_grads, rtol=1e-4, atol=1e-6)


def test_fill_token_budget_counts_padding():
    # [2, 3] pads to 6 <= 7; adding 4 would pad to 12; [4] then [6] (4 + 6 pads to 12 > 7)
    assert fill_token_budget([2, 3, 4, 6], 7) == [[0, 1], [2], [3]]
    assert fill_token_budget([2, 2, 2, 2], 8) == [[0, 1, 2, 3]]
    with pytest.raises(ValueError, match="does not fit a micro-batch of 7 tokens"):
        fill_token_budget([3, 8], 7)


def test_micro_batch_size_does_not_change_the_loss(model_and_samples):
    model, pad, samples = model_and_samples
    n = sum(sum(s.loss_mask[1:]) for s in samples)
    whole, _ = _loss_and_grads(model, make_micro_batches(samples, len(samples), pad), n)
    split, _ = _loss_and_grads(model, make_micro_batches(samples, 1, pad), n)
    assert abs(whole - split) < 1e-5


def test_pack_sequences_respects_the_row_budget_and_keeps_every_sequence():
    samples = [Sample([1] * n, [0] * n) for n in (7, 3, 9, 2, 5, 5)]
    bins = pack_sequences(samples, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(samples)))
    assert all(sum(len(samples[i].input_ids) for i in b) <= 10 for b in bins)
    with pytest.raises(ValueError, match="does not fit"):
        pack_sequences([Sample([1] * 11, [0] * 11)], 10)


def test_packed_rows_restart_positions_per_sequence():
    batch = make_micro_batches([Sample([5, 6, 7], [0, 1, 1]), Sample([8, 9], [0, 1])], 2, 0, pack=(8, 8))[0]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1, 0, 1]]
    assert "attention_mask" not in batch

"""Shared-prefix DPO rows must give the log-probs, loss and gradients of the padded layout."""

import pytest
import torch

from posttrain.algos.dpo import dpo_objective
from posttrain.config import PolicyConfig
from posttrain.data.conversations import Sample
from posttrain.data.preference import (
    PreferencePair,
    make_pair_micro_batches,
    make_shared_prefix_micro_batches,
)
from posttrain.train.logprobs import sequence_logprobs, shared_prefix_logprobs, supports_shared_prefix
from posttrain.train.model import load_model, load_tokenizer


def _pair(prompt: list[int], chosen: list[int], rejected: list[int]) -> PreferencePair:
    def sample(reply):
        return Sample(prompt + reply, [0] * len(prompt) + [1] * len(reply))
    return PreferencePair(sample(chosen), sample(rejected))


PAIRS = [
    _pair([5, 6, 7, 8], [9, 10], [11, 12, 13]),
    _pair([5, 6], [20, 21, 22, 23], [20, 24]),  # the replies share their first token
    _pair([30, 31, 32, 33, 34, 35], [40], [41]),
    _pair([7, 8, 9], [50, 51, 52], [50, 51]),  # rejected is a prefix of chosen
    _pair([1], [60, 61], [62, 63, 64, 65, 66]),
]


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model_and_pad(tiny_model_dir, request):
    cfg = PolicyConfig(model_name=str(tiny_model_dir))
    model = load_model(cfg, torch.device("cpu"))
    model.config._attn_implementation = request.param
    return model, load_tokenizer(cfg).pad_token_id


def _logprobs(model, batches, fn):
    """Per-sequence sums of masked log-probs, rows [chosen..., rejected...] of each micro-batch."""
    return torch.cat([(lp * mask).sum(-1) for lp, mask in (fn(model, b) for b in batches)])


def test_layout_and_positions():
    batch = make_shared_prefix_micro_batches([PAIRS[1]], 1, 0)[0]
    # shared [5, 6, 20], then chosen's [21, 22, 23], then rejected's [24]
    assert batch["input_ids"].tolist() == [[5, 6, 20, 21, 22, 23, 24]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 3]]
    mask = batch["attention_mask"][0, 0]
    assert mask[6].tolist() == [True, True, True, False, False, False, True]  # rejected skips chosen
    assert batch["targets"].tolist() == [[6, 20, 21, 22, 23], [6, 20, 24, 0, 0]]
    assert batch["target_mask"].tolist() == [[0, 1, 1, 1, 1], [0, 1, 1, 0, 0]]


def test_same_sequence_logprobs_as_padded(model_and_pad):
    model, pad = model_and_pad
    assert supports_shared_prefix(model)
    with torch.no_grad():
        for pair in PAIRS:  # one pair at a time: the two layouts order a micro-batch differently
            padded = _logprobs(model, make_pair_micro_batches([pair], 1, pad), sequence_logprobs)
            shared = _logprobs(model, make_shared_prefix_micro_batches([pair], 1, pad), shared_prefix_logprobs)
            torch.testing.assert_close(shared, padded, rtol=1e-5, atol=1e-5)
        # and a whole micro-batch of pairs of different lengths, whose padding must not leak in
        padded = _logprobs(model, make_pair_micro_batches(PAIRS, len(PAIRS), pad), sequence_logprobs)
        shared = _logprobs(model, make_shared_prefix_micro_batches(PAIRS, len(PAIRS), pad), shared_prefix_logprobs)
    torch.testing.assert_close(shared.sort().values, padded.sort().values, rtol=1e-5, atol=1e-5)


def _dpo_loss_and_grads(model, batches, fn):
    cfg = dict(beta=0.1, sft_loss_weight=0.5)
    model.zero_grad()
    total = 0.0
    for batch in batches:
        logprobs, mask = fn(model, batch)
        # a reference that depends on the sequence only (not on the layout), so rewards are not all 0
        reference = -0.01 * logprobs.detach() ** 2
        loss, _ = dpo_objective(logprobs, reference, mask, len(PAIRS), **cfg)
        loss.backward()
        total += loss.item()
    return total, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_same_dpo_loss_and_gradients_as_padded(model_and_pad):
    model, pad = model_and_pad
    padded_loss, padded_grads = _dpo_loss_and_grads(model, make_pair_micro_batches(PAIRS, 2, pad), sequence_logprobs)
    shared_loss, shared_grads = _dpo_loss_and_grads(model, make_shared_prefix_micro_batches(PAIRS, 2, pad),
                                                    shared_prefix_logprobs)
    assert shared_loss == pytest.approx(padded_loss, abs=1e-5)
    torch.testing.assert_close(shared_grads, padded_grads, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("make", "fn"), [(make_pair_micro_batches, sequence_logprobs),
                                          (make_shared_prefix_micro_batches, shared_prefix_logprobs)])
def test_dynamic_batches_of_pairs_give_the_fixed_loss_and_gradients(model_and_pad, make, fn):
    model, pad = model_and_pad
    fixed_loss, fixed_grads = _dpo_loss_and_grads(model, make(PAIRS, 1, pad), fn)
    dynamic = make(PAIRS, 1, pad, token_budget=24)
    assert len(dynamic) < len(PAIRS)  # pairs really share micro-batches
    assert all(b["input_ids"].numel() <= 24 for b in dynamic)
    assert sum(b["input_ids"].shape[0] for b in dynamic) == len(PAIRS) * (2 if make is make_pair_micro_batches else 1)
    dynamic_loss, dynamic_grads = _dpo_loss_and_grads(model, dynamic, fn)
    assert dynamic_loss == pytest.approx(fixed_loss, abs=1e-5)
    torch.testing.assert_close(dynamic_grads, fixed_grads, rtol=1e-4, atol=1e-6)


def test_the_lm_head_skips_the_prompt_columns_no_token_is_predicted_from(model_and_pad):
    model, pad = model_and_pad
    batch = make_shared_prefix_micro_batches([PAIRS[2]], 1, pad)[0]  # a 6-token prompt, 1-token replies
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape[:-1])))
    with torch.no_grad():
        shared_prefix_logprobs(model, batch)
    hook.remove()
    # row [30..35, 40, 41]: only the prompt's last position predicts a reply token (both replies')
    assert batch["input_ids"].shape[1] == 8 and seen == [(1,)]


def test_a_batch_without_reply_tokens_gives_zero_log_likelihood(model_and_pad):
    model, pad = model_and_pad
    batch = make_shared_prefix_micro_batches(PAIRS[:2], 2, pad)[0]
    batch["target_mask"] = torch.zeros_like(batch["target_mask"])  # as when truncation cut both replies off
    logprobs, mask = shared_prefix_logprobs(model, batch)
    assert logprobs.shape == mask.shape and torch.isfinite(logprobs).all() and (logprobs * mask).sum() == 0


def test_fewer_tokens_than_padded():
    shared = sum(b["input_ids"].numel() for b in make_shared_prefix_micro_batches(PAIRS, 1, 0))
    padded = sum(b["input_ids"].numel() for b in make_pair_micro_batches(PAIRS, 1, 0))
    assert shared < padded


def test_flash_attention_and_sliding_windows_are_not_supported(model_and_pad):
    model, _ = model_and_pad
    before = model.config._attn_implementation
    try:
        model.config._attn_implementation = "flash_attention_2"
        assert not supports_shared_prefix(model)
        model.config._attn_implementation = "sdpa"
        layer_types = model.config.layer_types
        model.config.layer_types = ["sliding_attention"] + layer_types[1:]
        assert not supports_shared_prefix(model)
        model.config.layer_types = layer_types
    finally:
        model.config._attn_implementation = before

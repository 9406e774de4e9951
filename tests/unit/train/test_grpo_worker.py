"""The GRPO policy worker without Ray: batch layout, and that one update moves log-probs the advantage's way."""

from __future__ import annotations

import pytest
import torch

from posttrain.config import GRPORunConfig, load_config
from posttrain.data.formats import tokenize_prompt
from posttrain.train.grpo_worker import GRPOPolicyWorker, Minibatch, Trajectory, collate_trajectories
from posttrain.train.logprobs import shifted_logits, token_logprobs

PAD = 0


def test_collate_puts_per_token_fields_at_their_token():
    trajectories = [
        Trajectory([5, 6, 7], [8, 9], [-0.1, -0.2], advantage=1.5),
        Trajectory([5], [10, 11, 12], [-0.3, -0.4, -0.5], advantage=-0.5),
        Trajectory([1, 2], [3], [-0.6], advantage=0.0),
    ]
    batch = collate_trajectories(trajectories, PAD)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 10, 11, 12, PAD], [1, 2, 3, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]
    # Response tokens only, at the response's own positions (not shifted, not the prompt, not padding).
    assert batch["loss_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 0], [0, 0, 1, 0, 0]]
    torch.testing.assert_close(batch["generator_logprobs"], torch.tensor(
        [[0, 0, 0, -0.1, -0.2], [0, -0.3, -0.4, -0.5, 0], [0, 0, -0.6, 0, 0]]))
    assert batch["advantages"].tolist() == [1.5, -0.5, 0.0]
    assert batch["advantages"].dtype == torch.float32
    assert batch["input_ids"].dtype == torch.long


def test_collate_aligns_with_the_shifted_logprobs_the_loss_uses():
    """loss_mask[:, 1:] and generator_logprobs[:, 1:] must line up with token_logprobs(shifted logits)."""
    batch = collate_trajectories([Trajectory([4, 5], [6, 7], [-1.0, -2.0], 1.0)], PAD)
    targets = batch["input_ids"][:, 1:]
    mask = batch["loss_mask"][:, 1:].bool()
    assert targets[mask].tolist() == [6, 7]
    assert batch["generator_logprobs"][:, 1:][mask].tolist() == [-1.0, -2.0]
    assert batch["input_ids"][:, :-1][mask].tolist() == [5, 6]  # each target is predicted from its predecessor


@pytest.fixture
def worker(tiny_model_dir):
    cfg = load_config(GRPORunConfig, None, [
        f"policy.model_name={tiny_model_dir}", "policy.device=cpu",
        "policy.train_global_batch_size=4", "policy.train_micro_batch_size=2",
        "policy.optimizer.lr=1e-3", "policy.optimizer.weight_decay=0", "policy.scheduler.name=constant",
        "policy.generation.temperature=0.7",
        "grpo.num_prompts_per_step=2", "grpo.num_generations_per_prompt=2",
        "loss_fn.reference_policy_kl_penalty=0",
    ])
    return GRPOPolicyWorker(cfg, total_optimizer_steps=10)


def _response_logprobs(worker: GRPOPolicyWorker, trajectories: list[Trajectory]) -> list[list[float]]:
    """Per-token log-probs of each response under the worker's current weights and temperature."""
    batch = collate_trajectories(trajectories, worker.policy.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = shifted_logits(worker.policy.model.eval(), batch, worker.temperature)
        logprobs = token_logprobs(logits, batch["input_ids"][:, 1:])
    mask = batch["loss_mask"][:, 1:].bool()
    return [row[m].tolist() for row, m in zip(logprobs, mask, strict=True)]


def test_one_update_raises_the_positive_response_and_lowers_the_negative(worker):
    tok = worker.policy.tokenizer
    prompts = [tokenize_prompt(tok, [{"role": "user", "content": q}]) for q in ("What is 2 + 3?", "What is 7 - 1?")]
    responses = [tok.encode(" 5"), tok.encode("equals"), tok.encode(" 6"), tok.encode("minus")]
    advantages = [1.0, -1.0, -1.0, 1.0]
    trajectories = [Trajectory(prompts[i // 2], r, [0.0] * len(r), a)
                    for i, (r, a) in enumerate(zip(responses, advantages, strict=True))]
    # Generator log-probs as the generator would report them: same weights, same temperature.
    before = _response_logprobs(worker, trajectories)
    for t, lp in zip(trajectories, before, strict=True):
        t.generator_logprobs = lp

    tokens = float(sum(len(r) for r in responses))
    metrics = worker.train([Minibatch(trajectories, tokens, float(len(trajectories)))])

    after = _response_logprobs(worker, trajectories)
    for t, b, a in zip(trajectories, before, after, strict=True):
        change = sum(a) - sum(b)
        assert (change > 0) == (t.advantage > 0), (t.response_ids, t.advantage, change)
    assert metrics["train/optimizer_steps"] == 1
    assert metrics["train/gen_logprob_mismatch"] < 1e-5  # trainer and generator score the same tokens alike
    assert metrics["train/kl"] == 0.0 and metrics["train/clip_fraction"] == 0.0  # one step: ratio is 1
    assert metrics["train/grad_norm"] > 0
    assert metrics["train/lr"] == pytest.approx(1e-3)

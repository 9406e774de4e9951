"""GRPO through the Policy API without Ray: the packed log-prob forward is exact, one optimizer step
of the GRPO objective moves log-probs the advantage's way, and the policy scores the weights it holds."""

from __future__ import annotations

import functools

import pytest
import torch

from posttrain.algos.grpo import GRPOObjective
from posttrain.config import GRPORunConfig, load_config
from posttrain.data.conversations import tokenize_prompt
from posttrain.data.trajectories import Trajectory, collate_trajectories
from posttrain.train.logprobs import response_logprobs
from posttrain.train.policy import Policy

PAD = 0
TEMPERATURE = 0.7


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_prompt_rows_give_the_log_probs_and_gradients_of_separate_rows(tiny_model_dir, attention):
    """Packing is an exact rewrite: per-token log-probs and the loss gradient match unpacked rows."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attention)
    g = torch.Generator().manual_seed(0)
    def ids(n):
        return torch.randint(3, 200, (n,), generator=g).tolist()
    trajectories = [Trajectory(prompt, ids(r), [0.0] * r, a)
                    for prompt in (ids(9), ids(4)) for r, a in ((3, 1.0), (1, -1.0), (5, 0.5))]
    results = []
    # A cost ratio of 1: the 4-token prompt's group puts its last response in a second row.
    for share, cost_ratio in ((True, None), (True, 1.0), (False, None)):
        model.zero_grad()
        batch = collate_trajectories(trajectories, PAD, share_prompts=share, linear_to_attention_cost=cost_ratio)
        logprobs = response_logprobs(model, batch, 0.7)[0] * batch["loss_mask"]
        (logprobs.sum(-1) * batch["advantages"]).sum().backward()
        results.append((logprobs.detach(), [p.grad.clone() for p in model.parameters()]))
    *packed_runs, (plain, plain_grads) = results
    assert collate_trajectories(trajectories, PAD)["input_ids"].shape[0] == 2  # really packed
    assert collate_trajectories(trajectories, PAD, linear_to_attention_cost=1.0)["input_ids"].shape == (3, 18)
    for packed, packed_grads in packed_runs:
        torch.testing.assert_close(packed, plain, atol=1e-5, rtol=0)
        for a, b in zip(packed_grads, plain_grads, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_response_logprobs_and_entropy_match_a_plain_forward_of_each_sequence(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trajectories = [Trajectory([5, 6, 7], [8, 9], [0.0, 0.0], 1.0), Trajectory([5, 6, 7], [10, 11, 12], [0.0] * 3, 0.0),
                    Trajectory([20, 21], [22], [0.0], -1.0)]
    with torch.no_grad():
        logprobs, entropy = response_logprobs(model, collate_trajectories(trajectories, PAD), 0.7, entropy=True)
        for i, t in enumerate(trajectories):
            p, r = len(t.prompt_ids), len(t.response_ids)
            logits = model(input_ids=torch.tensor([t.prompt_ids + t.response_ids])).logits[0, p - 1 : p + r - 1] / 0.7
            logp = logits.log_softmax(-1)
            torch.testing.assert_close(logprobs[i, :r], logp[torch.arange(r), t.response_ids], atol=1e-5, rtol=0)
            torch.testing.assert_close(entropy[i, :r], -(logp.exp() * logp).sum(-1), atol=1e-5, rtol=0)


@pytest.fixture
def cfg(tiny_model_dir) -> GRPORunConfig:
    return load_config(GRPORunConfig, None, [
        f"policy.model_name={tiny_model_dir}", "policy.device=cpu",
        "policy.train_global_batch_size=4", "policy.train_micro_batch_size=2",
        "policy.optimizer.lr=1e-3", "policy.optimizer.weight_decay=0", "policy.scheduler.name=constant",
        f"policy.generation.temperature={TEMPERATURE}",
        "grpo.num_prompts_per_step=2", "grpo.num_generations_per_prompt=2",
        "loss_fn.reference_policy_kl_penalty=0",
    ])


def _score(model, batch):
    return response_logprobs(model, batch, TEMPERATURE)[0]


def _response_logprobs(policy: Policy, trajectories: list[Trajectory]) -> list[list[float]]:
    """Per-token log-probs of each response under the policy's current weights and temperature."""
    batch = collate_trajectories(trajectories, policy.tokenizer.pad_token_id)
    logprobs = policy.policy_outputs([batch], _score)[0]
    mask = batch["loss_mask"].bool()
    return [row[m].tolist() for row, m in zip(logprobs, mask, strict=True)]


def test_one_update_raises_the_positive_response_and_lowers_the_negative(cfg):
    policy = Policy(cfg.policy, total_steps=10)
    tok = policy.tokenizer
    prompts = [tokenize_prompt(tok, [{"role": "user", "content": q}]) for q in ("What is 2 + 3?", "What is 7 - 1?")]
    responses = [tok.encode(" 5"), tok.encode("equals"), tok.encode(" 6"), tok.encode("minus")]
    advantages = [1.0, -1.0, -1.0, 1.0]
    trajectories = [Trajectory(prompts[i // 2], r, [0.0] * len(r), a)
                    for i, (r, a) in enumerate(zip(responses, advantages, strict=True))]
    # Generator log-probs as the generator would report them: same weights, same temperature.
    before = _response_logprobs(policy, trajectories)
    for t, lp in zip(trajectories, before, strict=True):
        t.generator_logprobs = lp

    objective = GRPOObjective.from_config(
        cfg.loss_fn, functools.partial(response_logprobs, temperature=TEMPERATURE, entropy=True), 16)
    micro_batches = [collate_trajectories(trajectories[i : i + 2], tok.pad_token_id) for i in (0, 2)]
    tokens = float(sum(len(r) for r in responses))
    out = policy.train_step(micro_batches, objective.for_step(tokens, float(len(trajectories))))

    after = _response_logprobs(policy, trajectories)
    for t, b, a in zip(trajectories, before, after, strict=True):
        change = sum(a) - sum(b)
        assert (change > 0) == (t.advantage > 0), (t.response_ids, t.advantage, change)
    metrics = out["metrics"]
    assert metrics["tokens"] == tokens
    assert metrics["mismatch_sum"] / tokens < 1e-5  # trainer and generator score the same tokens alike
    assert metrics["mismatch_max"] < 1e-5
    assert "kl_sum" not in metrics and metrics["clipped_tokens"] == 0.0  # no reference; one step: ratio is 1
    assert metrics["ratio_sum"] == pytest.approx(tokens)
    assert out["grad_norm"] > 0
    assert out["lr"] == pytest.approx(1e-3)


def test_policy_outputs_score_the_current_weights_in_eval_mode(cfg):
    policy = Policy(cfg.policy, total_steps=1)
    batch = collate_trajectories([Trajectory([5, 6, 7], [8, 9], [0.0, 0.0], 1.0)], PAD)
    policy.model.train()
    scores = policy.policy_outputs([batch, batch], _score, real=1)
    assert len(scores) == 1 and policy.model.training  # the filler's output is dropped; the mode is restored
    with torch.no_grad():
        expected = _score(policy.model.eval(), batch)
    torch.testing.assert_close(scores[0], expected)


def test_generator_weights_are_the_models_in_the_compute_precision(tiny_model_dir):
    from posttrain.config import PolicyConfig

    policy = Policy(PolicyConfig(model_name=str(tiny_model_dir), device="cpu", precision="bfloat16"), total_steps=1)
    weights = policy.generator_weights()
    state = policy.model.state_dict()
    assert weights.keys() == state.keys()  # a tied head too, under its own name (vLLM reloads it from it)
    for name, value in weights.items():
        assert value.dtype == torch.bfloat16 and value.device.type == "cpu"
        torch.testing.assert_close(value, state[name].to(torch.bfloat16))

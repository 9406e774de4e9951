"""The GRPO policy worker without Ray: batch layout, one update moves log-probs the advantage's way, and
sharded ranks line up their micro-batch counts."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from posttrain.config import GRPORunConfig, load_config
from posttrain.data.conversations import tokenize_prompt
from posttrain.train.grpo_worker import (
    GRPOPolicyWorker,
    Minibatch,
    Trajectory,
    collate_trajectories,
    packing_cost_ratio,
    response_logprobs,
)

PAD = 0


def test_collate_packs_a_groups_responses_after_one_copy_of_its_prompt():
    trajectories = [
        Trajectory([5, 6, 7], [8, 9], [-0.1, -0.2], advantage=1.5),
        Trajectory([5, 6, 7], [10], [-0.3], advantage=-0.5),
        Trajectory([1, 2], [3, 4, 11], [-0.4, -0.5, -0.6], advantage=0.0),
    ]
    batch = collate_trajectories(trajectories, PAD)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10], [1, 2, 3, 4, 11, PAD]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 2, 3, 4, 0]]
    seen = batch["attention_mask"][0, 0].int().tolist()
    assert seen[5] == [1, 1, 1, 0, 0, 1]  # the second response sees the prompt and itself, not the first
    assert seen[4] == [1, 1, 1, 1, 1, 0]
    assert batch["attention_mask"][1, 0, 5].int().tolist() == [0, 0, 0, 0, 0, 1]  # padding sees itself only
    # Per-token fields: one row per trajectory; each token is predicted from the column before it
    # in its own sequence (the prompt's last token for the first response token).
    assert batch["targets"].tolist() == [[8, 9, 0], [10, 0, 0], [3, 4, 11]]
    assert batch["source_index"].tolist() == [[2, 3, 0], [2, 0, 0], [6 + 1, 6 + 2, 6 + 3]]
    assert batch["loss_mask"].tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1]]
    torch.testing.assert_close(batch["generator_logprobs"], torch.tensor(
        [[-0.1, -0.2, 0], [-0.3, 0, 0], [-0.4, -0.5, -0.6]]))
    assert batch["advantages"].tolist() == [1.5, -0.5, 0.0]


def test_collate_without_sharing_gives_one_padded_row_per_trajectory():
    trajectories = [Trajectory([5, 6], [8, 9], [-0.1, -0.2], 1.0), Trajectory([5, 6], [10], [-0.3], -1.0)]
    batch = collate_trajectories(trajectories, PAD, share_prompts=False)
    assert batch["input_ids"].tolist() == [[5, 6, 8, 9], [5, 6, 10, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["source_index"].tolist() == [[1, 2], [4 + 1, 0]]


def test_collate_masks_the_environments_tokens_of_a_multi_turn_episode():
    # response: sampled 8 9, the environment's 30 31, sampled 10
    episode = Trajectory([5, 6], [8, 9, 30, 31, 10], [-0.1, -0.2, 0.0, 0.0, -0.3], 1.0, response_mask=[1, 1, 0, 0, 1])
    batch = collate_trajectories([episode, Trajectory([5, 6], [12], [-0.4], -1.0)], PAD)
    assert batch["input_ids"].tolist() == [[5, 6, 8, 9, 30, 31, 10, 12]]
    assert batch["targets"].tolist() == [[8, 9, 30, 31, 10], [12, 0, 0, 0, 0]]
    assert batch["loss_mask"].tolist() == [[1, 1, 0, 0, 1], [1, 0, 0, 0, 0]]


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


def test_long_responses_start_new_rows_when_that_costs_less():
    """Prompt 2, responses of 6: adding a second response to the row costs 2*6*6 - 2^2 = 68 more than
    a row of its own, which is worth 2 * ratio: it joins at ratio 40 (68 <= 80), not at ratio 10.
    The third would cost 2*6*12 - 4 = 140 > 80: it starts a new row either way."""
    trajectories = [Trajectory([5, 6], list(range(10, 16)), [0.0] * 6, 0.0) for _ in range(3)]
    rows = {ratio: collate_trajectories(trajectories, PAD, linear_to_attention_cost=ratio)["input_ids"]
            for ratio in (10.0, 40.0)}
    assert rows[10.0].shape == (3, 8)
    assert rows[40.0].shape == (2, 14) and rows[40.0][1].tolist() == [5, 6, *range(10, 16)] + [PAD] * 6


def test_packing_cost_ratio_counts_linear_and_attention_flops():
    from transformers import Qwen2Config

    config = Qwen2Config(hidden_size=192, intermediate_size=576, num_attention_heads=6, num_key_value_heads=2)
    # q and o: 2 x 192 x 192; k and v: 2 x 192 x 64; gated MLP: 3 x 192 x 576; a pair: 2 x 192
    assert packing_cost_ratio(config) == (2 * 192 * 192 + 2 * 192 * 64 + 3 * 192 * 576) / (2 * 192)


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
    worker = GRPOPolicyWorker(cfg, total_optimizer_steps=10)
    worker.setup()
    return worker


def _response_logprobs(worker: GRPOPolicyWorker, trajectories: list[Trajectory]) -> list[list[float]]:
    """Per-token log-probs of each response under the worker's current weights and temperature."""
    batch = collate_trajectories(trajectories, worker.policy.tokenizer.pad_token_id)
    with torch.no_grad():
        logprobs, _ = response_logprobs(worker.policy.model.eval(), batch, worker.temperature)
    mask = batch["loss_mask"].bool()
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


def _uneven_rank(rank: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        worker = GRPOPolicyWorker.__new__(GRPOPolicyWorker)  # no model needed to line the counts up
        worker.world_size = 2
        batch = collate_trajectories([Trajectory([5, 6], [8, 9], [-0.1, -0.2], 1.0)], PAD)
        mb = Minibatch([], 2.0, 1.0)
        mine = [(mb, [batch, batch]), (mb, [batch])] if rank == 0 else [(mb, []), (mb, [batch])]
        steps = worker._same_counts_on_every_rank(mine, PAD, True)
        torch.save([[b["loss_mask"].sum().item() for b in micro] for _, micro in steps], f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ranks_with_fewer_micro_batches_add_empty_ones(tmp_path):
    """FSDP2 ranks must run equally many passes: rank 1's empty shard of step 1 gets two fillers that
    train on nothing, and step 2, already even, is left alone."""
    mp.spawn(_uneven_rank, args=(str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2, join=True)
    assert torch.load(tmp_path / "out.0") == [[2.0, 2.0], [2.0]]
    assert torch.load(tmp_path / "out.1") == [[0.0, 0.0], [2.0]]

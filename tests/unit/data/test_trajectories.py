"""Trajectories laid out for one forward pass: a group's responses after one copy of its prompt,
multi-turn masks, and when a response is cheaper in a row of its own."""

from __future__ import annotations

import torch

from posttrain.data.trajectories import Trajectory, collate_trajectories, packing_cost_ratio

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

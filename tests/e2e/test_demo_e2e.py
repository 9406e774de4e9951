"""A shorter `posttrain demo`: SFT on the sloppy teacher, then GRPO must raise reward and accuracy."""

from __future__ import annotations

import statistics

from rich.console import Console

from posttrain.demo.run import run_demo, split_overrides


def test_split_overrides_routes_by_stage_prefix():
    sft, grpo = split_overrides(["sft:sft.max_num_steps=5", "grpo:grpo.max_num_steps=2", "policy.optimizer.lr=1e-3"])
    assert sft == ["sft.max_num_steps=5", "policy.optimizer.lr=1e-3"]
    assert grpo == ["grpo.max_num_steps=2", "policy.optimizer.lr=1e-3"]


def test_short_demo_grpo_fixes_what_sft_imitated(tmp_path):
    # The demo's SFT stage as it is (a shorter one leaves too weak a model), then 6 of its 30 GRPO steps.
    result = run_demo(tmp_path, [
        "sft:sft.val_period=0",
        "grpo:grpo.max_num_steps=6",
        "grpo:grpo.val_period=0",
        "grpo:checkpointing.save_period=6",
    ], console=Console(quiet=True))

    rewards = [result.grpo_rewards[step] for step in sorted(result.grpo_rewards)]
    assert len(rewards) == 6
    assert statistics.fmean(rewards[-3:]) > rewards[0] + 0.15, rewards
    assert result.accuracy_after_grpo is not None
    assert result.accuracy_after_grpo >= result.accuracy_after_sft + 0.2, result
    assert result.reward_curve is not None and result.reward_curve.is_file()

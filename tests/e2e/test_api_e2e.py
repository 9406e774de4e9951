"""GRPO as a Python user runs it: a config built in code, a custom environment, and only the names
that `posttrain` exports (the README's example)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e


def test_grpo_with_a_config_built_in_python_and_a_custom_environment_learns(tiny_model_dir, tmp_path):
    from posttrain import ConfigError, GRPORunConfig, run_grpo

    cfg = GRPORunConfig()
    cfg.policy.model_name = str(tiny_model_dir)
    cfg.env.name = "grpo_reward_fns:StartsWithSpace"  # next to this file, on the test Ray's PYTHONPATH
    cfg.grpo.num_prompts_per_step, cfg.grpo.num_generations_per_prompt = 8, 8
    cfg.policy.train_global_batch_size, cfg.policy.train_micro_batch_size = 64, 32
    cfg.policy.max_total_sequence_length, cfg.policy.generation.max_new_tokens = 48, 4
    cfg.policy.optimizer.lr, cfg.policy.scheduler.name = 1e-2, "constant"
    cfg.loss_fn.reference_policy_kl_penalty = 0.0
    cfg.data.arithmetic.num_train, cfg.data.arithmetic.num_val = 512, 16
    cfg.grpo.val_period, cfg.grpo.val_at_start = 0, False
    cfg.logger.tensorboard_enabled, cfg.logger.console_period = False, 0
    cfg.logger.log_dir, cfg.checkpointing.checkpoint_dir = str(tmp_path / "logs"), str(tmp_path / "ckpt")

    cfg.grpo.max_num_steps = 0
    with pytest.raises(ConfigError, match="grpo.max_num_steps"):  # checked as a loaded config is
        run_grpo(cfg)

    cfg.grpo.max_num_steps = 12
    result = run_grpo(cfg)
    rewards = [result.train_rewards[step] for step in sorted(result.train_rewards)]
    assert len(rewards) == 12
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.2, rewards
    assert (result.final_model_dir / "config.json").is_file()

"""Real (tiny) DPO runs on the built-in arithmetic preference pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.cli import main
from posttrain.config import DPORunConfig, load_config
from posttrain.loops import dpo as dpo_loop
from posttrain.loops.dpo import run_dpo
from posttrain.train.policy_group import make_policy

pytestmark = pytest.mark.e2e


def _cfg(model_dir: Path, out: Path, *extra: str) -> DPORunConfig:
    # 64 training pairs (two batches per epoch): a randomly initialised model cannot learn
    # arithmetic in a few steps, but DPO must learn to prefer the chosen replies it trains on.
    return load_config(DPORunConfig, None, [
        f"policy.model_name={model_dir}",
        "policy.train_global_batch_size=32",
        "policy.train_micro_batch_size=16",
        "policy.max_total_sequence_length=48",
        "policy.optimizer.lr=3e-3",
        "policy.scheduler.name=constant",
        "data.arithmetic.num_train=64",
        "data.arithmetic.num_val=32",
        "dpo.max_num_epochs=100",
        "dpo.reference_policy_kl_penalty=0.1",
        "dpo.val_global_batch_size=32",
        "dpo.val_micro_batch_size=32",
        "logger.tensorboard_enabled=false",
        "logger.console_period=0",
        f"logger.log_dir={out / 'logs'}",
        f"checkpointing.checkpoint_dir={out / 'ckpt'}",
        *extra,
    ])


def _logged(log_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]


def test_dpo_learns_to_prefer_the_chosen_replies(tiny_model_dir, tmp_path):
    result = run_dpo(_cfg(tiny_model_dir, tmp_path, "dpo.max_num_steps=14", "dpo.val_period=7",
                          "checkpointing.enabled=false"))
    train = [result.train_metrics[s] for s in sorted(result.train_metrics)]
    assert len(train) == 14
    # Step 1: the policy is the reference, so every reward is 0 (ties count as wrong).
    assert train[0]["train/margin"] == 0.0 and train[0]["train/reward_accuracy"] == 0.0
    assert train[0]["train/loss"] == pytest.approx(0.6931, abs=1e-3)
    late = train[-4:]
    assert sum(m["train/reward_accuracy"] for m in late) / 4 > 0.65
    assert sum(m["train/margin"] for m in late) / 4 > 0.1
    assert sum(m["train/loss"] for m in late) / 4 < train[0]["train/loss"] - 0.03
    assert sorted(result.val_metrics) == [0, 7, 14]
    assert result.val_metrics[14]["val/margin"] > result.val_metrics[0]["val/margin"] == 0.0
    logged = _logged(tmp_path / "logs")
    keys = set().union(*logged)
    for name in ("loss", "rewards_chosen", "rewards_rejected", "reward_accuracy", "margin"):
        assert f"train/{name}" in keys and f"val/{name}" in keys
    assert {"train/grad_norm", "train/lr", "throughput/tokens_per_s", "throughput/mfu"} <= keys
    assert (result.final_model_dir / "config.json").is_file()



@pytest.mark.parametrize("variant", [("dpo.loss_type=ipo", "dpo.preference_average_log_probs=true"),
                                     ("dpo.loss_type=hinge",),
                                     ("dpo.loss_type=robust", "dpo.label_smoothing=0.1"),
                                     ("dpo.loss_type=simpo", "dpo.preference_average_log_probs=true",
                                      "dpo.reference_policy_kl_penalty=2.0"),
                                     ("dpo.loss_type=orpo", "dpo.preference_average_log_probs=true",
                                      "dpo.sft_loss_weight=1.0", "dpo.sft_average_log_probs=true",
                                      "dpo.reference_policy_kl_penalty=1.0")])
def test_each_loss_variant_learns_to_prefer_the_chosen_replies(tiny_model_dir, tmp_path, variant, monkeypatch):
    built = []
    monkeypatch.setattr(dpo_loop, "make_policy", lambda *a, **kw: built.append(kw) or make_policy(*a, **kw))
    result = run_dpo(_cfg(tiny_model_dir, tmp_path, "dpo.max_num_steps=14", "dpo.val_period=0",
                          "checkpointing.enabled=false", *variant))
    # SimPO and ORPO load no reference model
    assert built[0]["with_reference"] == (variant[0] not in ("dpo.loss_type=simpo", "dpo.loss_type=orpo"))
    train = [result.train_metrics[s] for s in sorted(result.train_metrics)]
    late = train[-4:]  # IPO moves slowest: its loss regresses the margin to 1 / (2 beta) = 5 nats per token
    assert sum(m["train/reward_accuracy"] for m in late) / 4 > 0.6
    assert sum(m["train/margin"] for m in late) / 4 > max(train[0]["train/margin"], 0.0)
    assert sum(m["train/loss"] for m in late) / 4 < train[0]["train/loss"]

def test_resumed_run_reproduces_the_uninterrupted_run(tiny_model_dir, tmp_path):
    steps = ["dpo.max_num_steps=4", "checkpointing.save_period=2", "dpo.val_period=0", "dpo.val_at_start=false"]
    full = run_dpo(_cfg(tiny_model_dir, tmp_path / "full", *steps))
    first = run_dpo(_cfg(tiny_model_dir, tmp_path / "split", *steps), stop_at_step=3)  # "preempted" after step 3
    assert first.steps == 3
    resumed = run_dpo(_cfg(tiny_model_dir, tmp_path / "split", *steps))  # resumes from step_2
    assert sorted(resumed.train_metrics) == [3, 4]
    # The reference stays the starting model after resuming (not the checkpoint's weights).
    for step in (3, 4):
        for key, value in full.train_metrics[step].items():
            assert resumed.train_metrics[step][key] == pytest.approx(value, abs=1e-6), (step, key)


def test_dynamic_batching_trains_the_same_run_in_fewer_forward_passes(tiny_model_dir, tmp_path):
    steps = ["dpo.max_num_steps=3", "dpo.val_period=3", "checkpointing.enabled=false",
             "policy.train_micro_batch_size=4"]
    fixed = run_dpo(_cfg(tiny_model_dir, tmp_path / "fixed", *steps))
    dynamic = run_dpo(_cfg(tiny_model_dir, tmp_path / "dynamic", *steps, "policy.dynamic_batching.enabled=true"))
    for step in (1, 2, 3):
        for key, value in fixed.train_metrics[step].items():
            assert dynamic.train_metrics[step][key] == pytest.approx(value, abs=1e-5), (step, key)
    for key, value in fixed.val_metrics[3].items():
        assert dynamic.val_metrics[3][key] == pytest.approx(value, abs=1e-5), key
    # 32 pairs of ~22-token chats: 8 micro-batches of 4 pairs, or 4 x 2 x 48 padded tokens each
    counts = {run: {r["train/num_micro_batches"] for r in _logged(tmp_path / run / "logs") if "train/loss" in r}
              for run in ("fixed", "dynamic")}
    assert counts["fixed"] == {8} and max(counts["dynamic"]) <= 4


def test_shared_prompt_rows_train_exactly_like_padded_rows(tiny_model_dir, tmp_path):
    # Scoring the prompt once per pair is a layout change only: same metrics, step for step.
    steps = ["dpo.max_num_steps=3", "dpo.val_period=0", "dpo.val_at_start=false", "checkpointing.enabled=false"]
    shared = run_dpo(_cfg(tiny_model_dir, tmp_path / "shared", *steps))
    padded = run_dpo(_cfg(tiny_model_dir, tmp_path / "padded", *steps, "dpo.share_prompt_prefix=false"))
    for step in (1, 2, 3):
        for key, value in padded.train_metrics[step].items():
            assert shared.train_metrics[step][key] == pytest.approx(value, abs=1e-4), (step, key)


def test_cli_runs_the_example_config(tiny_model_dir, tmp_path):
    code = main(["dpo", "--config", "examples/configs/dpo_tiny.yaml", f"policy.model_name={tiny_model_dir}",
                 "dpo.max_num_steps=2", "data.arithmetic.num_train=64", "data.arithmetic.num_val=16",
                 "dpo.val_global_batch_size=16", "dpo.val_micro_batch_size=16",
                 f"logger.log_dir={tmp_path / 'logs'}", f"checkpointing.checkpoint_dir={tmp_path / 'ckpt'}"])
    assert code == 0
    assert [r["step"] for r in _logged(tmp_path / "logs") if "train/loss" in r] == [1, 2]
    assert (tmp_path / "ckpt" / "final_model" / "config.json").is_file()


def test_cli_config_error_names_the_key(capsys):
    assert main(["dpo", "policy.model_name=x", "dpo.reference_policy_kl=0.1"]) == 2
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert "did you mean 'dpo.reference_policy_kl_penalty'" in err


def test_two_fsdp2_workers_train_like_one(tiny_model_dir, tmp_path):
    """Policy and reference sharded across two Ray workers, each scoring and training on its share of
    the micro-batches: the same step and validation metrics as one process."""
    steps = ["dpo.max_num_steps=2", "dpo.val_period=2", "checkpointing.enabled=false",
             "policy.train_micro_batch_size=4", "dpo.val_micro_batch_size=4"]
    one = run_dpo(_cfg(tiny_model_dir, tmp_path / "one", *steps))
    two = run_dpo(_cfg(tiny_model_dir, tmp_path / "two", *steps, "policy.num_workers=2"))
    for key, value in one.train_metrics[1].items():
        assert two.train_metrics[1][key] == pytest.approx(value, abs=1e-5), key
    for key, value in one.val_metrics[2].items():
        assert two.val_metrics[2][key] == pytest.approx(value, rel=1e-3, abs=1e-4), key
    assert (two.final_model_dir / "config.json").is_file()


def test_lora_uses_its_frozen_base_as_reference_and_trains_like_one_on_two_workers(tiny_model_dir, tmp_path):
    lora = ["policy.lora.enabled=true", "policy.lora.dim=16", "policy.optimizer.lr=2e-2"]
    one = run_dpo(_cfg(tiny_model_dir, tmp_path / "one", *lora, "dpo.max_num_steps=20", "dpo.val_period=2",
                       "checkpointing.enabled=false"))
    train = [one.train_metrics[s] for s in sorted(one.train_metrics)]
    # Step 1: the adapters start at zero, so the policy is exactly its reference (the base).
    assert train[0]["train/loss"] == pytest.approx(0.6931, abs=1e-4) and train[0]["train/margin"] == 0.0
    # Slower than full fine-tuning: the random model's embeddings and head stay frozen.
    late = train[-4:]
    assert sum(m["train/margin"] for m in late) / 4 > 0.01
    assert sum(m["train/reward_accuracy"] for m in late) / 4 > 0.55
    assert sum(m["train/loss"] for m in late) / 4 < train[0]["train/loss"] - 0.005
    two = run_dpo(_cfg(tiny_model_dir, tmp_path / "two", *lora, "dpo.max_num_steps=2", "dpo.val_period=2",
                       "checkpointing.enabled=false", "policy.num_workers=2"))
    for key, value in one.val_metrics[2].items():
        assert two.val_metrics[2][key] == pytest.approx(value, rel=1e-3, abs=1e-4), key

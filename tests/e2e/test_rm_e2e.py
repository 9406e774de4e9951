"""Real (tiny) reward-model runs on the built-in arithmetic preference pairs, and the GRPO
environment that scores responses with the exported model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from posttrain.cli import main
from posttrain.config import ConfigError, EnvConfig, RMRunConfig, load_config
from posttrain.data.collate import pad_batch
from posttrain.data.preference import PreferenceDataset
from posttrain.data.sources import RowSource, load_rows
from posttrain.envs import make_environment
from posttrain.loops.rm import run_rm

pytestmark = pytest.mark.e2e


def _cfg(model_dir: Path, out: Path, *extra: str) -> RMRunConfig:
    return load_config(RMRunConfig, None, [
        f"policy.model_name={model_dir}",
        "policy.train_global_batch_size=32",
        "policy.train_micro_batch_size=32",
        "policy.max_total_sequence_length=48",
        "policy.optimizer.lr=1e-3",
        "policy.scheduler.name=constant",
        "data.arithmetic.num_train=32",
        "data.arithmetic.num_val=64",
        "rm.max_num_epochs=100",
        "rm.val_global_batch_size=64",
        "rm.val_micro_batch_size=32",
        "logger.tensorboard_enabled=false",
        "logger.console_period=0",
        f"logger.log_dir={out / 'logs'}",
        f"checkpointing.checkpoint_dir={out / 'ckpt'}",
        *extra,
    ])


def _logged(log_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]


def _pair_margins(model, tokenizer, cfg: RMRunConfig, rows: list[dict]) -> torch.Tensor:
    """r(chosen) - r(rejected) of each row, from a model loaded outside the loop."""
    data = PreferenceDataset(RowSource(rows, "test rows"), tokenizer, cfg.data, cfg.policy.max_total_sequence_length)
    pairs = [data[i] for i in range(len(data))]  # in row order (micro-batches sort pairs by length)
    batch = pad_batch([p.chosen for p in pairs] + [p.rejected for p in pairs], tokenizer.pad_token_id)
    with torch.no_grad():
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    chosen, rejected = scores.chunk(2)
    return chosen - rejected


def test_rm_generalises_to_held_out_pairs_exports_and_scores_grpo_responses(tiny_model_dir, tmp_path, capsys):
    # Wrong-operation pairs (5 + 3 = 8, not 2): a randomly initialised tiny model learns to judge them
    # on problems it never saw in ~100 steps. (Near misses, off by 1 or 2, need far longer.)
    steps = 100
    cfg = _cfg(tiny_model_dir, tmp_path, f"rm.max_num_steps={steps}", "rm.val_period=50",
               "policy.train_global_batch_size=64", "policy.train_micro_batch_size=64",
               "data.arithmetic.rejected=wrong_operation", f"data.arithmetic.num_train={64 * steps}",
               "data.arithmetic.num_val=128", "rm.val_global_batch_size=128", "rm.val_micro_batch_size=128",
               "checkpointing.save_period=1000")
    result = run_rm(cfg)
    assert "score` head is newly initialised" in " ".join(capsys.readouterr().out.split())  # rich wraps lines
    train = [result.train_metrics[s] for s in sorted(result.train_metrics)]
    assert len(train) == steps
    assert train[0]["train/loss"] == pytest.approx(0.6931, abs=0.02)  # a fresh head scores near 0
    assert sorted(result.val_metrics) == [0, 50, steps]
    held_out = {s: m["val/accuracy"] for s, m in result.val_metrics.items()}
    print("held-out accuracy by step:", held_out)
    assert held_out[0] < 0.7 and held_out[steps] >= 0.85  # 128 unseen problems; chance is 0.5
    assert result.val_metrics[steps]["val/loss"] < result.val_metrics[0]["val/loss"] - 0.2
    keys = set().union(*_logged(tmp_path / "logs"))
    for name in ("loss", "accuracy", "margin", "rewards_chosen", "rewards_rejected"):
        assert f"train/{name}" in keys and f"val/{name}" in keys
    assert {"throughput/tokens_per_s", "throughput/mfu"} <= keys

    # The export reloads as a plain HF sequence-classification model with the same scores.
    final = result.final_model_dir
    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    val_rows = load_rows(cfg.data.dataset_name, "validation", arithmetic=cfg.data.arithmetic, seed=cfg.rm.seed).rows
    val_margins = _pair_margins(model, tokenizer, cfg, val_rows)
    val = result.val_metrics[steps]
    assert (val_margins > 0).float().mean().item() == pytest.approx(val["val/accuracy"], abs=1e-6)
    assert val_margins.mean().item() == pytest.approx(val["val/margin"], abs=1e-4)

    # The GRPO environment scores exactly as the model's own forward, so it prefers the correct answers
    # of unseen problems as often as the trained model does.
    env = make_environment(EnvConfig(name="reward_model", reward_model_path=str(final), reward_model_batch_size=50))
    conversations = [[{"role": "user", "content": r["prompt"]}] for r in val_rows]
    step = env.step(conversations * 2, [r["chosen"] for r in val_rows] + [r["rejected"] for r in val_rows],
                    [{} for _ in range(2 * len(val_rows))])
    assert step.done == [True] * 2 * len(val_rows) and not any(step.metadata)
    rewards = torch.tensor(step.rewards)
    env_margins = rewards[: len(val_rows)] - rewards[len(val_rows):]
    assert torch.allclose(env_margins, val_margins, atol=1e-4)
    assert (env_margins > 0).float().mean().item() >= 0.85


def test_dynamic_batching_trains_the_same_run_in_fewer_forward_passes(tiny_model_dir, tmp_path):
    steps = ["rm.max_num_steps=2", "rm.val_period=2", "checkpointing.enabled=false", "policy.train_micro_batch_size=4",
             "rm.val_micro_batch_size=4"]
    fixed = run_rm(_cfg(tiny_model_dir, tmp_path / "fixed", *steps))
    dynamic = run_rm(_cfg(tiny_model_dir, tmp_path / "dynamic", *steps, "policy.dynamic_batching.enabled=true"))
    for step in (1, 2):
        for key, value in fixed.train_metrics[step].items():
            assert dynamic.train_metrics[step][key] == pytest.approx(value, abs=1e-5), (step, key)
    for key, value in fixed.val_metrics[2].items():
        assert dynamic.val_metrics[2][key] == pytest.approx(value, abs=1e-5), key
    counts = {run: {r["train/num_micro_batches"] for r in _logged(tmp_path / run / "logs") if "train/loss" in r}
              for run in ("fixed", "dynamic")}
    assert counts["fixed"] == {8} and max(counts["dynamic"]) <= 4


def test_resumed_run_reproduces_the_uninterrupted_run(tiny_model_dir, tmp_path):
    steps = ["rm.max_num_steps=4", "checkpointing.save_period=2", "rm.val_period=0", "rm.val_at_start=false"]
    full = run_rm(_cfg(tiny_model_dir, tmp_path / "full", *steps))
    first = run_rm(_cfg(tiny_model_dir, tmp_path / "split", *steps), stop_at_step=3)  # "preempted" after step 3
    assert first.steps == 3
    resumed = run_rm(_cfg(tiny_model_dir, tmp_path / "split", *steps))  # resumes from step_2, score head included
    assert sorted(resumed.train_metrics) == [3, 4]
    for step in (3, 4):
        for key, value in full.train_metrics[step].items():
            assert resumed.train_metrics[step][key] == pytest.approx(value, abs=1e-5), (step, key)


def test_cli_runs_the_example_config(tiny_model_dir, tmp_path):
    code = main(["rm", "--config", "examples/configs/rm_tiny.yaml", f"policy.model_name={tiny_model_dir}",
                 "rm.max_num_steps=2", "data.arithmetic.num_train=64", "data.arithmetic.num_val=16",
                 "rm.val_global_batch_size=16", "rm.val_micro_batch_size=16",
                 f"logger.log_dir={tmp_path / 'logs'}", f"checkpointing.checkpoint_dir={tmp_path / 'ckpt'}"])
    assert code == 0
    assert [r["step"] for r in _logged(tmp_path / "logs") if "train/loss" in r] == [1, 2]
    assert (tmp_path / "ckpt" / "final_model" / "config.json").is_file()


def test_environment_refuses_a_model_without_a_reward_head(tiny_model_dir):
    with pytest.raises(ConfigError, match="not a reward model"):
        make_environment(EnvConfig(name="reward_model", reward_model_path=str(tiny_model_dir)))
    with pytest.raises(ConfigError, match="reward_model_path is required"):
        make_environment(EnvConfig(name="reward_model"))


@pytest.mark.parametrize("lora", [[], ["policy.lora.enabled=true"]], ids=["full", "lora"])
def test_two_fsdp2_workers_train_like_one(tiny_model_dir, tmp_path, lora):
    """Three micro-batches dealt to two sharded workers (one adds a filler that counts for nothing):
    the same step metrics as one process, summed across workers, and an exported score head (with
    LoRA: the head trained whole beside the adapters, gathered from its shards and merged)."""
    steps = ["rm.max_num_steps=2", "rm.val_period=2", "checkpointing.enabled=false",
             "policy.train_global_batch_size=24", "policy.train_micro_batch_size=8", "rm.val_micro_batch_size=16",
             *lora]
    one = run_rm(_cfg(tiny_model_dir, tmp_path / "one", *steps))
    two = run_rm(_cfg(tiny_model_dir, tmp_path / "two", *steps, "policy.num_workers=2"))
    for key, value in one.train_metrics[1].items():
        assert two.train_metrics[1][key] == pytest.approx(value, abs=1e-5), key
    for key, value in one.val_metrics[2].items():
        assert two.val_metrics[2][key] == pytest.approx(value, rel=1e-3, abs=1e-4), key
    exported = AutoModelForSequenceClassification.from_pretrained(two.final_model_dir)
    assert exported.score.weight.shape == (1, exported.config.hidden_size)


def test_lora_trains_adapters_and_the_head_and_resumes_exactly(tiny_model_dir, tmp_path):
    steps = ["policy.lora.enabled=true", "policy.lora.dim=16", "policy.optimizer.lr=1e-2", "rm.max_num_steps=20",
             "rm.val_period=0", "checkpointing.save_period=10", "data.arithmetic.rejected=wrong_operation"]
    full = run_rm(_cfg(tiny_model_dir, tmp_path / "full", *steps))
    train = [full.train_metrics[s] for s in sorted(full.train_metrics)]
    assert sum(m["train/loss"] for m in train[-5:]) / 5 < train[0]["train/loss"] - 0.2
    assert sum(m["train/accuracy"] for m in train[-5:]) / 5 > 0.75
    run_rm(_cfg(tiny_model_dir, tmp_path / "split", *steps), stop_at_step=12)
    resumed = run_rm(_cfg(tiny_model_dir, tmp_path / "split", *steps))  # from step_10: base, adapter, head
    assert sorted(resumed.train_metrics) == list(range(11, 21))
    for step in (11, 20):
        assert resumed.train_metrics[step]["train/loss"] == pytest.approx(full.train_metrics[step]["train/loss"],
                                                                           abs=1e-5), step
    merged = AutoModelForSequenceClassification.from_pretrained(full.final_model_dir)
    assert not any("lora" in name or "modules_to_save" in name for name in merged.state_dict())

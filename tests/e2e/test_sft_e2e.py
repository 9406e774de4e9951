"""Real (tiny) SFT runs on the built-in arithmetic task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.cli import main
from posttrain.config import ConfigError, SFTRunConfig, load_config
from posttrain.loops.sft import run_sft

pytestmark = pytest.mark.e2e


def _cfg(model_dir: Path, out: Path, *extra: str) -> SFTRunConfig:
    return load_config(SFTRunConfig, None, [
        f"policy.model_name={model_dir}",
        "policy.train_global_batch_size=32",
        "policy.train_micro_batch_size=16",
        "policy.max_total_sequence_length=48",
        "policy.optimizer.lr=3e-3",
        "policy.scheduler.warmup_steps=3",
        "data.arithmetic.num_train=2000",
        "data.arithmetic.num_val=64",
        "sft.val_period=10",
        "sft.val_global_batch_size=32",
        "sft.val_micro_batch_size=32",
        "logger.tensorboard_enabled=false",
        "logger.console_period=0",
        f"logger.log_dir={out / 'logs'}",
        f"checkpointing.checkpoint_dir={out / 'ckpt'}",
        *extra,
    ])


def _logged(log_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]


def test_sft_loss_falls_and_run_artifacts_exist(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, tmp_path, "sft.max_num_steps=30", "checkpointing.save_period=10",
               "checkpointing.keep_top_k=2")
    result = run_sft(cfg)
    losses = [result.train_losses[s] for s in sorted(result.train_losses)]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0]
    assert result.val_losses[30] < 0.6 * result.val_losses[0]
    logged = _logged(tmp_path / "logs")
    assert [r["step"] for r in logged if "train/loss" in r] == list(range(1, 31))
    steps = [r for r in logged if "train/loss" in r]
    assert all(r["throughput/tokens_per_s"] > 0 and 0 < r["throughput/mfu"] < 1 for r in steps)
    assert (tmp_path / "logs" / "config.yaml").is_file()
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("step_*")) == ["step_20", "step_30"]
    assert (result.final_model_dir / "config.json").is_file()


def test_resumed_run_reproduces_the_uninterrupted_losses(tiny_model_dir, tmp_path):
    steps = ["sft.max_num_steps=8", "checkpointing.save_period=4", "sft.val_period=0"]
    full = run_sft(_cfg(tiny_model_dir, tmp_path / "full", *steps))
    first = run_sft(_cfg(tiny_model_dir, tmp_path / "split", *steps), stop_at_step=5)  # "preempted" after step 5
    assert first.steps == 5
    resumed = run_sft(_cfg(tiny_model_dir, tmp_path / "split", *steps))  # auto-resumes from step_4
    assert sorted(resumed.train_losses) == [5, 6, 7, 8]
    for step in range(5, 9):
        assert resumed.train_losses[step] == pytest.approx(full.train_losses[step], abs=1e-6)
    assert resumed.train_losses[5] == pytest.approx(first.train_losses[5], abs=1e-6)
    # step 5 ran twice (before and after the preemption) but has one record, the resumed run's
    logged = [r for r in _logged(tmp_path / "split" / "logs") if "train/loss" in r]
    assert [r["step"] for r in logged] == list(range(1, 9))
    assert logged[4]["train/loss"] == pytest.approx(resumed.train_losses[5], abs=1e-6)


def test_dynamic_batching_trains_the_same_run_in_fewer_forward_passes(tiny_model_dir, tmp_path):
    steps = ["sft.max_num_steps=4", "sft.val_period=2", "checkpointing.enabled=false"]
    fixed = run_sft(_cfg(tiny_model_dir, tmp_path / "fixed", *steps))
    dynamic = run_sft(_cfg(tiny_model_dir, tmp_path / "dynamic", *steps, "policy.dynamic_batching.enabled=true"))
    for step in range(1, 5):
        assert dynamic.train_losses[step] == pytest.approx(fixed.train_losses[step], abs=1e-5)
    for step in (0, 2, 4):
        assert dynamic.val_losses[step] == pytest.approx(fixed.val_losses[step], abs=1e-5)
    # 32 arithmetic chats of ~22 tokens: two fixed micro-batches of 16, or one within 16 x 48 padded tokens
    for run, expected in (("fixed", 2), ("dynamic", 1)):
        counts = {r["train/num_micro_batches"] for r in _logged(tmp_path / run / "logs") if "train/loss" in r}
        assert counts == {expected}


def test_resume_refuses_a_checkpoint_of_another_run(tiny_model_dir, tmp_path):
    run_sft(_cfg(tiny_model_dir, tmp_path, "sft.max_num_steps=2", "checkpointing.save_period=2"))
    with pytest.raises(ConfigError, match="data"):
        run_sft(_cfg(tiny_model_dir, tmp_path, "sft.max_num_steps=4", "data.arithmetic.num_train=3000"))
    with pytest.raises(ConfigError, match="no checkpoint found"):
        run_sft(_cfg(tiny_model_dir, tmp_path / "empty", "checkpointing.resume=required"))


def test_exported_model_reloads_with_identical_logits(tiny_model_dir, tmp_path):
    result = run_sft(_cfg(tiny_model_dir, tmp_path, "sft.max_num_steps=3", "checkpointing.save_period=3"))
    # The last checkpoint holds the trained weights the run ended with; the export must match them exactly.
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt" / "step_3" / "model").eval()
    exported = AutoModelForCausalLM.from_pretrained(result.final_model_dir).eval()
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.randint(3, 400, (2, 12))
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, trained(ids).logits)
        assert not torch.allclose(exported(ids).logits, original(ids).logits)  # training changed something


def test_cli_runs_the_example_config(tiny_model_dir, tmp_path):
    code = main(["sft", "--config", "examples/configs/sft_tiny.yaml", f"policy.model_name={tiny_model_dir}",
                 "sft.max_num_steps=3", "data.arithmetic.num_train=500", "data.arithmetic.num_val=32",
                 f"logger.log_dir={tmp_path / 'logs'}", f"checkpointing.checkpoint_dir={tmp_path / 'ckpt'}"])
    assert code == 0
    assert [r["step"] for r in _logged(tmp_path / "logs") if "train/loss" in r] == [1, 2, 3]
    assert any((tmp_path / "logs" / "tensorboard").iterdir())


def test_a_diverging_run_stops_with_a_message_before_a_nan_reaches_the_weights(tiny_model_dir, tmp_path, capsys):
    """lr 1e30: the first step is finite but throws the weights so far that the next gradients overflow."""
    code = main(["sft", f"policy.model_name={tiny_model_dir}", "policy.optimizer.lr=1e30", "sft.max_num_steps=5",
                 "data.arithmetic.num_train=200", "data.val_split=null", "checkpointing.save_period=1",
                 "logger.tensorboard_enabled=false", f"logger.log_dir={tmp_path / 'logs'}",
                 f"checkpointing.checkpoint_dir={tmp_path / 'ckpt'}"])
    assert code == 2
    assert "the gradient norm is nan (loss nan) at optimizer step 2" in " ".join(capsys.readouterr().err.split())
    assert [r["step"] for r in _logged(tmp_path / "logs")] == [1]
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt" / "step_1" / "model")
    assert all(torch.isfinite(p).all() for p in saved.parameters())


def test_sft_on_a_local_hf_datasets_folder_with_splits(tiny_model_dir, tmp_path):
    """The Hugging Face `datasets` path, offline: a folder whose files name the splits."""
    data = tmp_path / "chat_data"
    data.mkdir()
    for split, n in (("train", 64), ("validation", 8)):
        rows = [{"messages": [{"role": "user", "content": f"Say {i}"}, {"role": "assistant", "content": str(i)}]}
                for i in range(n)]
        (data / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    result = run_sft(_cfg(tiny_model_dir, tmp_path, f"data.dataset_name={data}", "sft.max_num_steps=4", "sft.max_num_epochs=2",
                          "checkpointing.enabled=false"))
    assert result.steps == 4 and set(result.val_losses) == {0, 4}


def test_plain_text_mode_trains_on_prompt_completion_rows(tiny_model_dir, tmp_path):
    rows = tmp_path / "pc.jsonl"
    rows.write_text("\n".join(json.dumps({"prompt": f"{i} plus one is", "completion": f" {i + 1}"})
                              for i in range(64)))
    result = run_sft(_cfg(tiny_model_dir, tmp_path, f"data.dataset_name={rows}", "data.use_chat_template=false",
                          "sft.max_num_steps=2", "checkpointing.enabled=false"))
    assert result.steps == 2 and result.val_losses == {}  # a single file has no validation split


def test_two_fsdp2_workers_train_like_one_and_resume_on_one(tiny_model_dir, tmp_path):
    """The micro-batches of each step are dealt to two sharded Ray workers whose gradients add up:
    the run follows the single-process run, and its whole-model checkpoint resumes on one worker."""
    steps = ["sft.max_num_steps=6", "checkpointing.save_period=3", "sft.val_period=3",
             "policy.train_micro_batch_size=8"]  # 4 micro-batches a step: 2 per worker
    one = run_sft(_cfg(tiny_model_dir, tmp_path / "one", *steps))
    two = run_sft(_cfg(tiny_model_dir, tmp_path / "two", *steps, "policy.num_workers=2"), stop_at_step=4)
    assert two.train_losses[1] == pytest.approx(one.train_losses[1], abs=1e-6)
    for step in (2, 3, 4):  # later steps drift only by float rounding through Adam
        assert two.train_losses[step] == pytest.approx(one.train_losses[step], rel=1e-3)
    assert two.val_losses[3] == pytest.approx(one.val_losses[3], rel=1e-3)
    resumed = run_sft(_cfg(tiny_model_dir, tmp_path / "two", *steps))  # one worker, from step_3
    assert sorted(resumed.train_losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed.train_losses[step] == pytest.approx(one.train_losses[step], rel=1e-3)
    assert (resumed.final_model_dir / "config.json").is_file()


@pytest.mark.parametrize("workers", [1, 2])
def test_compiled_decoder_layers_train_like_eager_ones(tiny_model_dir, tmp_path, workers):
    """policy.torch_compile, in one process and on two FSDP2 workers: the eager run's losses, up to
    the rounding of fused kernels."""
    from torch._dynamo.utils import counters

    steps = ["sft.max_num_steps=4", "sft.val_period=0", "checkpointing.enabled=false",
             "policy.train_micro_batch_size=8"]
    eager = run_sft(_cfg(tiny_model_dir, tmp_path / "eager", *steps))
    graphs_before = counters["stats"]["unique_graphs"]
    compiled = run_sft(_cfg(tiny_model_dir, tmp_path / "compiled", *steps, "policy.torch_compile=true",
                            f"policy.num_workers={workers}"))
    if workers == 1:  # compiled here, not in Ray workers
        assert counters["stats"]["unique_graphs"] > graphs_before
    assert sorted(compiled.train_losses) == [1, 2, 3, 4]
    for step, loss in eager.train_losses.items():
        assert compiled.train_losses[step] == pytest.approx(loss, rel=1e-4)


LORA = ["policy.lora.enabled=true", "policy.lora.dim=16", "policy.optimizer.lr=1e-2"]


def test_lora_learns_and_exports_the_merged_model(tiny_model_dir, tmp_path):
    result = run_sft(_cfg(tiny_model_dir, tmp_path, *LORA, "sft.max_num_steps=30", "sft.val_period=0",
                          "checkpointing.save_period=30"))
    losses = [result.train_losses[s] for s in sorted(result.train_losses)]
    # The random model's embeddings and head stay frozen, which bounds what the adapters can learn.
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5
    assert result.val_losses[30] < result.val_losses[0] - 0.5
    merged = AutoModelForCausalLM.from_pretrained(result.final_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert merged.state_dict().keys() == base.state_dict().keys()
    assert not torch.equal(merged.model.layers[0].mlp.down_proj.weight, base.model.layers[0].mlp.down_proj.weight)
    torch.testing.assert_close(merged.model.embed_tokens.weight, base.model.embed_tokens.weight)  # not adapted
    assert (result.final_model_dir / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "ckpt" / "step_30" / "model" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])  # bfloat16: a bfloat16 base, float32 adapters
def test_lora_on_two_fsdp2_workers_trains_like_one_and_resumes_on_one(tiny_model_dir, tmp_path, precision):
    steps = [*LORA, f"policy.precision={precision}", "sft.max_num_steps=6", "checkpointing.save_period=3", "sft.val_period=3",
             "policy.train_micro_batch_size=8"]
    one = run_sft(_cfg(tiny_model_dir, tmp_path / "one", *steps))
    two = run_sft(_cfg(tiny_model_dir, tmp_path / "two", *steps, "policy.num_workers=2"), stop_at_step=4)
    assert two.train_losses[1] == pytest.approx(one.train_losses[1], abs=1e-6)
    for step in (2, 3, 4):
        assert two.train_losses[step] == pytest.approx(one.train_losses[step], rel=1e-3)
    assert two.val_losses[3] == pytest.approx(one.val_losses[3], rel=1e-3)
    assert one.train_losses[6] < one.train_losses[1]
    resumed = run_sft(_cfg(tiny_model_dir, tmp_path / "two", *steps))  # base + saved adapter, optimizer state
    for step in (4, 5, 6):
        assert resumed.train_losses[step] == pytest.approx(one.train_losses[step], rel=1e-3)
    with pytest.raises(ConfigError, match=r"lora"):  # the checkpoint's adapters have another shape
        run_sft(_cfg(tiny_model_dir, tmp_path / "two", *steps, "policy.lora.dim=8", "sft.max_num_steps=7"))

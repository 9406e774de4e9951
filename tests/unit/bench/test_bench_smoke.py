"""The TRL side-by-side benchmarks run end to end (1 step, tiny model): both libraries report."""

import importlib
from pathlib import Path

import pytest

pytest.importorskip("trl", reason="trl is not installed (dev extra)")

ROOT = Path(__file__).resolve().parents[3]
SMOKE = ["--size", "test", "--steps", "1", "--repeats", "1", "--global-batch", "8", "--micro-batch", "4"]


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # `bench` is a folder of scripts at the repository root
    return lambda name: importlib.import_module(f"bench.{name}")


@pytest.mark.parametrize("name, unit, metrics", [
    ("sft_vs_trl", "tokens/s", ["first_loss", "final_loss"]),
    ("dpo_vs_trl", "pairs/s", ["final_loss", "final_reward_accuracy"]),
])
def test_benchmark_reports_both_libraries(bench, capsys, name, unit, metrics):
    summary = bench(name).main(SMOKE)
    out = capsys.readouterr().out
    for lib in ("posttrain", "trl"):
        result = summary[lib]
        assert result["unit"] == unit and result["median_rate"] > 0 and len(result["rates"]) == 1
        for metric in metrics:
            assert result[metric] == pytest.approx(summary["posttrain"][metric], abs=1e-3)  # same math
        assert f"{lib} " in out
    assert summary["ratio"] > 0 and "ratio posttrain/trl" in out
    assert summary["machine"]["trl"] != "not installed"


def test_grpo_benchmark_reports_both_libraries(bench, capsys):
    summary = bench("grpo_vs_trl").main(["--size", "test", "--sft-steps", "0", "--steps", "2", "--warmup", "1",
                                         "--repeats", "1", "--prompts", "2", "--generations", "2",
                                         "--micro-batch", "4"])
    out = capsys.readouterr().out
    for lib in ("posttrain", "trl"):
        result = summary[lib]
        assert len(result["seconds_per_step"]) == 1 and result["median_seconds_per_step"] > 0
        assert 0.0 <= result["reward_start"] <= 1.0 and 0.0 <= result["reward_end"] <= 1.0
        assert f"{lib} " in out
    assert summary["ratio"] > 0 and "step time posttrain/trl" in out


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_gpu_benchmark_runs_on_cpu(bench, capsys, backend):
    if backend == "vllm":
        pytest.importorskip("vllm")
    # vLLM's CPU attention needs a head size of at least 32: the demo model's, not the test model's 16.
    size = "test" if backend == "hf" else "demo"
    result = bench("gpu_grpo").main(["--device", "cpu", "--size", size, "--backend", backend, "--steps", "2",
                                     "--prompts", "2", "--generations", "2", "--max-new-tokens", "4",
                                     "--micro-batch", "4"])
    assert result["generation_tokens_per_s"] > 0 and result["training_tokens_per_s"] > 0
    assert result["weight_sync_s"] > 0 and result["mfu"] is None  # no peak FLOP/s for a CPU
    assert 0 < result["parameters"] < 3e6
    assert f"{backend} generation backend" in capsys.readouterr().out

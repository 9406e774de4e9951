"""bench/gpu_check.py, prepared for a lent GPU machine, runs its code on the CPU (--device cpu):
every check passes (the colocated weight sync through shared memory instead of CUDA IPC), and
the GPU-only ones say they were skipped."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_the_gpu_check_runs_dry_on_the_cpu(monkeypatch, tmp_path, capsys):
    monkeypatch.syspath_prepend(str(ROOT))
    out = tmp_path / "gpu_check.json"
    status = importlib.import_module("bench.gpu_check").main(
        ["--device", "cpu", "--size", "test", "--repeats", "1", "--length", "64", "--out", str(out)])
    assert status == 0, capsys.readouterr().out
    results = json.loads(out.read_text())
    assert "all_reduce" in results["collectives"]["calls"] and results["collectives"]["transfer_bytes"] > 0
    assert results["training"]["sft_tokens_per_s"] > 0 and results["training"]["grpo_tokens_per_s"] > 0
    assert results["generation"]["logprob_mismatch_max"] < 0.05  # bf16 on both sides
    assert results["logprob_memory"]["skipped"]
    # the colocated sync through shared memory, each tensor checked by the receiving process
    assert results["colocation"]["weight_sync_bytes"] > 0 and results["colocation"]["weight_sync_s"] > 0
    models = results["environment_models"]
    assert models["ok"] and models["judge_replies"] == 8 and 0 < models["reward_bf16_vs_fp32_max_diff"] < 0.1


def test_the_gpu_check_imports_nothing_that_needs_ray():
    """The GPU machine has no Ray: with `import ray` made to fail, the check and what it imports still load."""
    code = "import sys; sys.modules['ray'] = None; import bench.gpu_check"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]

"""`posttrain eval` on the tiny model and a local JSONL of built-in arithmetic problems."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from posttrain.cli import main
from posttrain.config import ArithmeticTaskConfig
from posttrain.data.arithmetic import make_problems
from posttrain.demo.tiny_model import save_tiny_model
from posttrain.envs.math_env import answers_match, extract_final_answer

pytestmark = pytest.mark.e2e


def _eval(model_dir, problems, report_path, *extra: str) -> dict:
    code = main(["eval", f"generation.model_name={model_dir}", f"data.dataset_name={problems}",
                 "data.prompt_key=question", "data.answer_key=gold", "data.system_prompt=null",
                 "generation.max_new_tokens=8", "generation.temperature=1.0", "generation.batch_size=12",
                 "generation.precision=float32", "generation.device=cpu", "eval.num_tests_per_prompt=4",
                 "eval.k_values=[1,2,4]", f"eval.save_path={report_path}", *extra])
    assert code == 0
    return json.loads(report_path.read_text())


def _write(path, rows):
    path.write_text("".join(json.dumps({"question": r["prompt"], "gold": r["answer"]}) + "\n" for r in rows))


def test_eval_writes_a_consistent_report(tiny_model_dir, tmp_path):
    rows = make_problems(ArithmeticTaskConfig(max_operand=4, operations=["+"], num_val=6), "validation")
    _write(tmp_path / "arith.jsonl", rows)
    first = _eval(tiny_model_dir, tmp_path / "arith.jsonl", tmp_path / "first.json")
    # The untrained model is rarely right; so that the scores are not all zero, the gold answers become
    # the answers it gave. Prompts and seed are unchanged, so the second run samples the same responses.
    for row, problem in zip(rows, first["problems"], strict=True):
        given = [s["extracted_answer"] for s in problem["samples"] if s["extracted_answer"] is not None]
        row["answer"] = given[-1] if given else row["answer"]
    _write(tmp_path / "rigged.jsonl", rows)
    report = _eval(tiny_model_dir, tmp_path / "rigged.jsonl", tmp_path / "out" / "report.json")
    assert [s["response"] for p in report["problems"] for s in p["samples"]] == \
        [s["response"] for p in first["problems"] for s in p["samples"]]

    metrics = report["metrics"]
    assert set(metrics) == {"accuracy", "pass@1", "maj@1", "pass@2", "maj@2", "pass@4", "maj@4"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert 0.0 < metrics["pass@1"] <= metrics["pass@2"] <= metrics["pass@4"]
    assert report["num_problems"] == len(rows) and report["config"]["eval"]["num_tests_per_prompt"] == 4

    samples = [s for p in report["problems"] for s in p["samples"]]
    assert len(samples) == 4 * len(rows)
    mean_correct = sum(s["correct"] for s in samples) / len(samples)
    assert metrics["pass@1"] == pytest.approx(mean_correct) and metrics["accuracy"] == pytest.approx(mean_correct)
    for problem, row in zip(report["problems"], rows, strict=True):
        assert problem["answer"] == row["answer"] and problem["messages"][-1]["content"] == row["prompt"]
        for s in problem["samples"]:  # each recorded verdict is the verifier's on the recorded response
            extracted = extract_final_answer(s["response"])
            assert s["extracted_answer"] == extracted
            assert s["correct"] == (extracted is not None and answers_match(row["answer"], extracted))
        assert problem["metrics"]["pass@4"] == float(any(s["correct"] for s in problem["samples"]))


def test_eval_with_a_multi_turn_environment(tiny_model_dir, tmp_path):
    rows = [{"prompt": f"Guess my number, game {i}.", "answer": str(i)} for i in range(3)]
    _write(tmp_path / "games.jsonl", rows)
    report = _eval(tiny_model_dir, tmp_path / "games.jsonl", tmp_path / "report.json", "env.name=number_guess",
                   "eval.max_rollout_turns=3")
    samples = [s for p in report["problems"] for s in p["samples"]]
    assert all(1 <= s["turns"] <= 3 for s in samples)
    assert any(s["turns"] > 1 for s in samples)  # the untrained model seldom guesses right at once
    for s in samples:  # a game ends early only when it is won
        assert s["turns"] == 3 or s["correct"]
        assert s["num_tokens"] <= 3 * 8  # sampled tokens only, not the hints


def test_eval_with_vllm_gives_the_hf_backends_greedy_episodes(tmp_path):
    """The same multi-turn eval through both backends, greedy: the same responses, turns and scores.
    vLLM runs in a `posttrain eval` process of its own (it patches torch's thread settings)."""
    pytest.importorskip("vllm")
    model_dir = save_tiny_model(tmp_path / "model", size="demo")  # vLLM's CPU attention needs head size >= 32
    rows = [{"prompt": f"Guess my number, game {i}.", "answer": str(i)} for i in range(4)]
    _write(tmp_path / "games.jsonl", rows)
    common = [f"generation.model_name={model_dir}", f"data.dataset_name={tmp_path / 'games.jsonl'}",
              "data.prompt_key=question", "data.answer_key=gold", "data.system_prompt=null",
              "generation.max_new_tokens=6", "generation.temperature=0", "generation.precision=float32",
              "generation.device=cpu", "env.name=number_guess", "eval.max_rollout_turns=2"]
    assert main(["eval", *common, f"eval.save_path={tmp_path / 'hf.json'}"]) == 0
    subprocess.run([sys.executable, "-m", "posttrain.cli", "eval", *common, "generation.backend=vllm",
                    "generation.vllm.enforce_eager=true", f"eval.save_path={tmp_path / 'vllm.json'}"], check=True)
    hf, vllm = (json.loads((tmp_path / name).read_text()) for name in ("hf.json", "vllm.json"))
    samples = [[s for p in report["problems"] for s in p["samples"]] for report in (hf, vllm)]
    assert [s["response"] for s in samples[1]] == [s["response"] for s in samples[0]]
    assert [s["turns"] for s in samples[1]] == [s["turns"] for s in samples[0]]
    assert any(s["turns"] == 2 for s in samples[0])
    assert vllm["metrics"] == hf["metrics"]


def test_eval_rejects_a_missing_column(tiny_model_dir, tmp_path, capsys):
    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"prompt": "1+1?", "solution": "2"}) + "\n")
    code = main(["eval", f"generation.model_name={tiny_model_dir}", f"data.dataset_name={problems}",
                 "generation.device=cpu", "eval.save_path=null"])
    assert code == 2
    assert "missing field 'answer'" in " ".join(capsys.readouterr().err.split())  # rich wraps lines


def test_eval_rejects_a_prompt_longer_than_the_models_context(tiny_model_dir, tmp_path, capsys):
    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"prompt": "What is 1 + 1? " * 200, "answer": "2"}) + "\n")
    code = main(["eval", f"generation.model_name={tiny_model_dir}", f"data.dataset_name={problems}",
                 "generation.device=cpu", "eval.save_path=null"])
    assert code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "line 1: the prompt has" in err and "more than the 511 allowed (the model's context length" in err


def test_eval_serves_the_judge_beside_the_model_under_test(tiny_model_dir, tmp_path):
    rows = make_problems(ArithmeticTaskConfig(max_operand=4, operations=["+"], num_val=3), "validation")
    _write(tmp_path / "arith.jsonl", rows)
    report = _eval(tiny_model_dir, tmp_path / "arith.jsonl", tmp_path / "report.json", "env.name=judge",
                   f"env.judge.model_name={tiny_model_dir}", "env.judge.max_new_tokens=4")
    samples = [s for p in report["problems"] for s in p["samples"]]
    assert len(samples) == 4 * 3 and all(isinstance(s["judge_reply"], str) for s in samples)
    assert not any(s["correct"] for s in samples)  # the tiny judge writes no verdict

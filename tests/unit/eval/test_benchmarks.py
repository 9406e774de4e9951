import json
from pathlib import Path

import pytest

from posttrain.config import ConfigError, EvalDataConfig, EvalRunConfig, load_config
from posttrain.data.sources import DataError
from posttrain.eval.benchmarks import BENCHMARKS, find_benchmark, gsm8k_answer, load_eval_rows, map_row

_EXAMPLE = Path(__file__).parents[3] / "examples" / "configs" / "eval_math.yaml"


def test_benchmarks_are_found_by_hf_name_or_alias():
    assert find_benchmark("HuggingFaceH4/MATH-500") is BENCHMARKS["math500"]
    assert find_benchmark("huggingfaceh4/math-500") is BENCHMARKS["math500"]
    assert find_benchmark("aime2024").name == "HuggingFaceH4/aime_2024"
    assert find_benchmark("openai/gsm8k").subset == "main"
    assert find_benchmark("my/dataset") is None


def test_math500_row():
    row = {"problem": "Compute $1+1$.", "solution": "... \\boxed{2}", "answer": "2", "subject": "Algebra",
           "level": 1, "unique_id": "test/algebra/1.json"}
    b = BENCHMARKS["math500"]
    mapped = map_row(row, b, b.prompt_key, b.answer_key, "here")
    assert mapped["problem"] == "Compute $1+1$." and mapped["answer"] == "2"
    assert mapped["level"] == 1 and mapped["subject"] == "Algebra"


def test_aime_row_with_an_integer_answer():
    b = BENCHMARKS["aime2024"]
    mapped = map_row({"id": 60, "problem": "Find N.", "answer": 204, "year": "2024"}, b, "problem", "answer", "x")
    assert mapped["answer"] == "204" and mapped["problem"] == "Find N."


def test_gsm8k_row_keeps_only_the_final_answer():
    b = BENCHMARKS["gsm8k"]
    row = {"question": "How many?", "answer": "She has 3*4=<<3*4=12>>12 apples.\n#### 1,200"}
    assert map_row(row, b, "question", "answer", "x") == {"problem": "How many?", "answer": "1200"}
    assert gsm8k_answer("a\n#### -5 ") == "-5"
    with pytest.raises(ValueError, match="####"):
        gsm8k_answer("no marker 12")


def test_a_missing_column_names_the_row_and_the_keys():
    b = BENCHMARKS["gsm8k"]
    with pytest.raises(DataError, match=r"openai/gsm8k\[test\], row 3: missing field 'question'"):
        map_row({"problem": "?", "answer": "#### 1"}, b, "question", "answer", "openai/gsm8k[test], row 3")
    with pytest.raises(DataError, match="row 3"):
        map_row({"question": "?", "answer": "1"}, b, "question", "answer", "row 3")


def test_local_jsonl_with_custom_keys_and_max_samples(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"q": f"{i}+1?", "a": i + 1}) + "\n" for i in range(5)))
    source, prompt_key, answer_key = load_eval_rows(
        EvalDataConfig(dataset_name=str(path), prompt_key="q", answer_key="a", max_samples=3))
    assert (len(source), prompt_key, answer_key) == (3, "q", "a")
    assert source.describe(2) == f"{path}, line 3"


def test_eval_config_checks():
    base = ["generation.model_name=m"]
    cfg = load_config(EvalRunConfig, None, base)
    assert cfg.generation.temperature == 0.0 and cfg.eval.k_values == [1]
    assert cfg.generation.to_policy_config().model_name == "m"
    with pytest.raises(ConfigError, match="generation.model_name is required"):
        load_config(EvalRunConfig, None, [])
    with pytest.raises(ConfigError, match="identical"):
        load_config(EvalRunConfig, None, base + ["eval.num_tests_per_prompt=4", "eval.k_values=[1,4]"])
    with pytest.raises(ConfigError, match=r"eval.k_values: each k must be in \[1, eval.num_tests_per_prompt=4\]"):
        load_config(EvalRunConfig, None, base + ["eval.num_tests_per_prompt=4", "generation.temperature=1",
                                                 "eval.k_values=[1,8]"])
    with pytest.raises(ConfigError, match="eval.num_tests_per_promt"):
        load_config(EvalRunConfig, None, base + ["eval.num_tests_per_promt=4"])
    with pytest.raises(ConfigError, match="data.max_samples"):
        load_config(EvalRunConfig, None, base + ["data.max_samples=0"])


def test_example_config_loads():
    cfg = load_config(EvalRunConfig, _EXAMPLE, ["generation.model_name=m"])
    assert find_benchmark(cfg.data.dataset_name) is BENCHMARKS["math500"]
    assert cfg.eval.k_values == [1, 4] and cfg.eval.num_tests_per_prompt == 4


def test_a_null_answer_is_an_error_not_the_text_none():
    b = BENCHMARKS["math500"]
    with pytest.raises(DataError, match="row 7: field 'answer' is null"):
        map_row({"problem": "Compute 1+1.", "answer": None}, b, "problem", "answer", "row 7")

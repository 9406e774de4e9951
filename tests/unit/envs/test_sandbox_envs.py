"""The Python sandbox and the environments that run the model's code (code, python_tool)."""

from __future__ import annotations

import time

import pytest

from posttrain.config import EnvConfig
from posttrain.envs import make_environment
from posttrain.envs.sandbox import ends_in_open_code_block, last_code_block, run_many, run_python

LIMITS = dict(timeout_s=5.0, memory_mb=1024, max_output_chars=1000)


def block(code: str) -> str:
    return f"Here is my code:\n```python\n{code}\n```\n"


def test_a_program_runs_alone_and_reports_its_output_and_errors(tmp_path):
    ok = run_python("import os\nprint(sorted(os.listdir('.')), 6 * 7)", **LIMITS)
    assert ok.passed and ok.output == "['program.py'] 42\n"  # an empty folder of its own
    failed = run_python("print('partial')\nraise ValueError('bad')", **LIMITS)
    assert not failed.passed and not failed.timed_out
    assert failed.output.startswith("partial\nTraceback") and 'File "program.py", line 2' in failed.output
    assert failed.output.rstrip().endswith("ValueError: bad")


def test_limits_stop_runaway_programs():
    start = time.perf_counter()
    looping = run_python("while True:\n    pass", timeout_s=1.0, memory_mb=1024, max_output_chars=1000)
    assert looping.timed_out and not looping.passed and "longer than 1 s" in looping.output
    sleeping_child = run_python("import subprocess, time\nsubprocess.Popen(['sleep', '60'])\ntime.sleep(60)",
                                timeout_s=1.0, memory_mb=1024, max_output_chars=1000)
    assert sleeping_child.timed_out
    assert time.perf_counter() - start < 20
    hungry = run_python("x = bytearray(4 * 1024 ** 3)", timeout_s=5.0, memory_mb=512, max_output_chars=1000)
    assert not hungry.passed and "MemoryError" in hungry.output
    chatty = run_python("print('x' * 5000)", timeout_s=5.0, memory_mb=1024, max_output_chars=100)
    assert chatty.passed and chatty.output.startswith("x" * 100) and "(4901 more characters)" in chatty.output


def test_run_many_keeps_the_order():
    cfg = EnvConfig(sandbox_parallel=3, sandbox_timeout_s=5.0, sandbox_memory_mb=1024, sandbox_max_output_chars=1000)
    results = run_many([f"print({i})" for i in range(6)], cfg)
    assert [r.output for r in results] == [f"{i}\n" for i in range(6)]
    assert run_many([], cfg) == []


@pytest.mark.parametrize(("text", "code"), [
    (block("x = 1"), "x = 1\n"),
    ("```py\na\n```\nthen\n```\nb\n```", "b\n"),  # the last block, bare fences too
    ("```python\nunclosed", None),
    ("no code", None),
])
def test_last_code_block(text, code):
    assert last_code_block(text) == code


@pytest.mark.parametrize(("text", "open_block"), [
    ("```python\nprint(1)", True),
    ("```python", True),
    ("```\nx = 1\n```\nand then ```py\nwhile", True),
    (block("x = 1"), False),
    ("no code", False),
    ("use ``` fences", False),  # an odd fence that opens no block
])
def test_ends_in_open_code_block(text, open_block):
    assert ends_in_open_code_block(text) == open_block


def test_code_environment_rewards_passing_tests_and_shows_failures():
    env = make_environment(EnvConfig(name="code", error_reward=-1.0))
    tests = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"
    result = env.step([[{"role": "user", "content": "Write add."}]] * 4,
                      [block("def add(a, b):\n    return a + b"), block("def add(a, b):\n    return a - b"),
                       "I would add them.", block("def add(a, b):\n    return a + b")],
                      [{"answer": tests}, {"answer": tests}, {"answer": tests}, {"answer": "  "}])
    assert result.rewards == [1.0, 0.0, 0.0, -1.0]
    assert result.done == [True, False, False, True]
    assert result.observations[0] == [] and result.metadata[0] == {"passed": True}
    feedback = result.observations[1][0]["content"]
    assert feedback.startswith("The tests failed:") and "AssertionError" in feedback and "assert add(2, 3) == 5" in feedback
    assert "```python code block" in result.observations[2][0]["content"]
    assert "no test code" in result.metadata[3]["reward_error"]
    cut = env.step([[{"role": "user", "content": "Write add."}]], [block("def add(a, b):\n    return a + b") +
                                                                   "\n```python\ndef add(a, b):\n    return"],
                   [{"answer": tests}])
    assert cut.rewards == [0.0] and cut.done == [False]  # the last, unfinished block is not run
    assert "```python block is not closed" in cut.observations[0][0]["content"]


def test_python_tool_runs_code_turns_and_scores_answers():
    env = make_environment(EnvConfig(name="python_tool"))
    conversation = [[{"role": "user", "content": "What is 6 * 7?"}]]
    result = env.step(conversation * 4,
                      [block("print(6 * 7)"), "It is \\boxed{42}.", block("print(1)") + "So \\boxed{41}.",
                       block("1 / 0")],
                      [{"answer": "42"}] * 4)
    assert result.rewards == [0.0, 1.0, 0.0, 0.0]
    assert result.done == [False, True, True, False]  # code without an answer is a tool call
    assert result.observations[0] == [{"role": "user", "content": "```output\n42\n```"}]
    assert result.metadata[0] == {"tool_passed": True}
    assert result.metadata[1]["extracted_answer"] == "42"
    assert "ZeroDivisionError" in result.observations[3][0]["content"]
    assert result.metadata[3] == {"tool_passed": False}


def test_python_tool_answers_a_program_cut_off_by_the_token_limit_without_running_it():
    env = make_environment(EnvConfig(name="python_tool"))
    result = env.step([[{"role": "user", "content": "What is 6 * 7?"}]] * 2,
                      ["```python\nprint(6 *", block("print(6 * 7)")], [{"answer": "42"}] * 2)
    assert result.done == [False, False] and result.rewards == [0.0, 0.0]
    assert result.observations[0] == [{"role": "user", "content": "Error: the ```python block is not closed, "
                                                                  "so it was not run."}]
    assert result.metadata == [{"tool_passed": False}, {"tool_passed": True}]
    assert result.observations[1] == [{"role": "user", "content": "```output\n42\n```"}]

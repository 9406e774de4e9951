"""The Python sandbox and the environments that run the model's code (code, python_tool)."""

from __future__ import annotations

import dataclasses

import pytest

from posttrain.config import ConfigError, EnvConfig, SandboxConfig
from posttrain.envs import make_environment
from posttrain.envs.sandbox import ends_in_open_code_block, last_code_block, run_many, run_python

CFG = SandboxConfig()


def block(code: str) -> str:
    return f"Here is my code:\n```python\n{code}\n```\n"


def test_a_program_runs_alone_and_reports_its_output_and_errors():
    ok = run_python("import os\nprint(sorted(os.listdir('.')), 6 * 7)", CFG)
    assert ok.passed and ok.output == "['program.py'] 42\n"  # an empty folder of its own
    failed = run_python("print('partial')\nraise ValueError('bad')", CFG)
    assert not failed.passed and not failed.timed_out
    assert failed.output.startswith("partial\nTraceback") and 'File "/tmp/program.py", line 2' in failed.output
    assert failed.output.rstrip().endswith("ValueError: bad")
    chatty = run_python("print('x' * 5000)", dataclasses.replace(CFG, max_output_chars=100))
    assert chatty.passed and chatty.output.startswith("x" * 100) and "(4901 more bytes)" in chatty.output


def test_run_many_keeps_the_order():
    cfg = dataclasses.replace(CFG, parallel=3)
    results = run_many([f"print({i})" for i in range(6)], cfg)
    assert [r.output for r in results] == [f"{i}\n" for i in range(6)]
    tested = run_many(["x = 1", "x = 2"], cfg, tests=["assert x == 2", "assert x == 2"])
    assert [r.passed for r in tested] == [False, True]
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


def refuse_user_namespaces(tmp_path, monkeypatch):
    """The launcher fails as it does where the kernel refuses unprivileged user namespaces."""
    import posttrain.envs.sandbox as sandbox
    launcher = tmp_path / "launcher.py"
    launcher.write_text("import json, os, sys\nspec = json.load(open(sys.argv[1]))\n"
                        "os.write(spec['errors_fd'], b'unshare: [Errno 1] Operation not permitted')\nsys.exit(125)\n")
    monkeypatch.setattr(sandbox, "_LAUNCHER", launcher)


def test_a_code_environment_that_cannot_sandbox_fails_at_start_up_naming_the_fix(tmp_path, monkeypatch):
    refuse_user_namespaces(tmp_path, monkeypatch)
    from posttrain.envs.registry import check_env_config
    for name in ("code", "python_tool"):
        with pytest.raises(ConfigError, match=r"env.sandbox.backend=\w+: .*cannot start.*Operation not permitted.*"
                                              r"user namespaces.*env.sandbox.backend=process"):
            check_env_config(EnvConfig(name=name))
    check_env_config(EnvConfig(name="math"))  # runs no programs, needs no sandbox
    check_env_config(EnvConfig(name="code", sandbox=SandboxConfig(backend="process")))


def test_a_sandbox_failure_makes_the_sample_invalid_not_zero(monkeypatch, tmp_path):
    env = make_environment(EnvConfig(name="code", error_reward=-1.0))
    tool = make_environment(EnvConfig(name="python_tool"))
    refuse_user_namespaces(tmp_path, monkeypatch)
    result = env.step([[{"role": "user", "content": "Write add."}]], [block("def add(a, b):\n    return a + b")],
                      [{"answer": "assert add(2, 3) == 5"}])
    assert result.invalid == ["sandbox_error"] and result.rewards == [-1.0] and result.done == [True]
    assert "Operation not permitted" in result.metadata[0]["reward_error"]
    called = tool.step([[{"role": "user", "content": "6 * 7?"}]], [block("print(6 * 7)")], [{"answer": "42"}])
    assert called.invalid == ["sandbox_error"] and called.metadata[0]["tool_passed"] is False


def test_a_row_whose_tests_do_not_parse_is_invalid():
    env = make_environment(EnvConfig(name="code"))
    result = env.step([[{"role": "user", "content": "Write add."}]], [block("def add(a, b):\n    return a + b")],
                      [{"answer": "assert add(2, 3) ==="}])
    assert result.invalid == ["bad_row"] and "does not parse" in result.metadata[0]["reward_error"]

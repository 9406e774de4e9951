"""Code with unit tests: the response's program must pass the row's tests.

The row's answer (data.answer_key) is Python test code, e.g. `assert add(2, 3) == 5`. The last
```python block of the response runs in the sandbox (posttrain/envs/sandbox.py); the tests run
outside it against the program's objects (posttrain/envs/program_tests.py), so a program cannot
pass by exiting early, patching asserts or printing a success message. Passing every test earns 1
and ends the episode. A failure earns 0 and, in a multi-turn run (`grpo.max_rollout_turns` > 1),
shows the model its output and the failing test so that it can fix its code. A row whose tests
are missing or do not parse, and a sandbox that fails, make the sample invalid.
"""

from __future__ import annotations

import ast
from typing import Any

from posttrain.envs.base import Environment, EnvStepResult, Message
from posttrain.envs.sandbox import check_sandbox, ends_in_open_code_block, last_code_block, run_many


class CodeEnvironment(Environment):
    runs_programs = True

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        check_sandbox(self.cfg.sandbox)

    def step(self, conversations: list[list[Message]], responses: list[str],
             metadata: list[dict[str, Any]]) -> EnvStepResult:
        self._check_batch(conversations, responses, metadata)
        n = len(responses)
        rewards, observations, done = [0.0] * n, [[] for _ in range(n)], [False] * n
        infos: list[dict[str, Any]] = [{} for _ in range(n)]
        invalid: list[str | None] = [None] * n
        to_run: dict[int, tuple[str, str]] = {}
        for i, (response, meta) in enumerate(zip(responses, metadata, strict=True)):
            problem = _bad_tests(meta.get("answer"))
            if problem:
                rewards[i], done[i], invalid[i] = self.cfg.error_reward, True, "bad_row"
                infos[i]["reward_error"] = problem
                continue
            cut_off = ends_in_open_code_block(response)
            code = None if cut_off else last_code_block(response)
            if code is None:
                hint = ("Your ```python block is not closed (the reply was cut off); reply with a shorter solution."
                        if cut_off else "Reply with your solution in a ```python code block.")
                observations[i] = [{"role": "user", "content": hint}]
                continue
            to_run[i] = (code, meta["answer"])
        results = run_many([code for code, _ in to_run.values()], self.cfg.sandbox,
                           tests=[tests for _, tests in to_run.values()])
        for i, result in zip(to_run, results, strict=True):
            if result.sandbox_error:
                rewards[i], done[i], invalid[i] = self.cfg.error_reward, True, "sandbox_error"
                infos[i]["reward_error"] = result.sandbox_error
                continue
            infos[i]["passed"] = result.passed
            if result.passed:
                rewards[i], done[i] = 1.0, True
            else:
                observations[i] = [{"role": "user", "content": f"The tests failed:\n```\n{result.output.strip()}\n```"}]
        return EnvStepResult(rewards, observations, done, infos, invalid)


def _bad_tests(tests: Any) -> str | None:
    """Why a row's test code cannot be run, or None."""
    if not isinstance(tests, str) or not tests.strip():
        return "the row has no test code (metadata 'answer'; see data.answer_key)"
    try:
        ast.parse(tests)
    except SyntaxError as err:
        return f"the row's test code does not parse: {err}"
    return None

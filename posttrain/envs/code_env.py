"""Code with unit tests: the response's program must pass the row's tests.

The row's answer (data.answer_key) is Python test code, e.g. `assert add(2, 3) == 5`, run after
the last ```python block of the response in a sandboxed interpreter (posttrain/envs/sandbox.py).
Passing earns 1 and ends the episode. A failure earns 0 and, in a multi-turn run
(`grpo.max_rollout_turns` > 1), shows the model the error output so that it can fix its code.
"""

from __future__ import annotations

from typing import Any

from posttrain.envs.base import Environment, EnvStepResult, Message
from posttrain.envs.sandbox import ends_in_open_code_block, last_code_block, run_many


class CodeEnvironment(Environment):
    def step(self, conversations: list[list[Message]], responses: list[str],
             metadata: list[dict[str, Any]]) -> EnvStepResult:
        self._check_batch(conversations, responses, metadata)
        n = len(responses)
        rewards, observations, done = [0.0] * n, [[] for _ in range(n)], [False] * n
        infos: list[dict[str, Any]] = [{} for _ in range(n)]
        invalid: list[str | None] = [None] * n
        to_run: dict[int, str] = {}
        for i, (response, meta) in enumerate(zip(responses, metadata, strict=True)):
            tests = meta.get("answer")
            if not isinstance(tests, str) or not tests.strip():
                rewards[i], done[i], invalid[i] = self.cfg.error_reward, True, "bad_row"
                infos[i]["reward_error"] = "the row has no test code (metadata 'answer'; see data.answer_key)"
                continue
            cut_off = ends_in_open_code_block(response)
            code = None if cut_off else last_code_block(response)
            if code is None:
                hint = ("Your ```python block is not closed (the reply was cut off); reply with a shorter solution."
                        if cut_off else "Reply with your solution in a ```python code block.")
                observations[i] = [{"role": "user", "content": hint}]
                continue
            to_run[i] = f"{code}\n\n{tests}\n"
        results = run_many(list(to_run.values()), self.cfg)
        for i, result in zip(to_run, results, strict=True):
            infos[i]["passed"] = result.passed
            if result.passed:
                rewards[i], done[i] = 1.0, True
            else:
                observations[i] = [{"role": "user", "content": f"The tests failed:\n```\n{result.output.strip()}\n```"}]
        return EnvStepResult(rewards, observations, done, infos, invalid)

"""Math with a Python tool: the model may run code before it answers.

A response with a ```python block and no \\boxed{} answer is a tool call (one cut off inside its
block is answered with an error, not run, and the episode goes on): the program runs in a
sandbox (posttrain/envs/sandbox.py) and its output comes back as the next user
message, in a ```output block; the episode goes on (set `grpo.max_rollout_turns` > 1). Any other
response is the final answer, scored as the math environment scores it (the math verifier, or
`env.reward_fn`), and ends the episode. Running out of turns without an answer earns 0.
"""

from __future__ import annotations

from typing import Any

from posttrain.envs.base import Message
from posttrain.envs.math_env import MathToolEnvironment, _last_boxed
from posttrain.envs.sandbox import check_sandbox, ends_in_open_code_block, last_code_block, run_many

_CUT_OFF = object()  # the action of a response cut off inside its code block: nothing to run


class PythonToolEnvironment(MathToolEnvironment):
    runs_programs = True
    # Every chat template has the user role; a subclass may use "tool" where its template has one.
    observation_role = "user"

    def find_action(self, response: str) -> str | object | None:
        if _last_boxed(response) is not None:
            return None
        return _CUT_OFF if ends_in_open_code_block(response) else last_code_block(response)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        check_sandbox(self.cfg.sandbox)

    def act(self, actions: dict[int, str | object]) -> dict[int, tuple[list[Message], dict[str, Any]]]:
        to_run = {i: code for i, code in actions.items() if code is not _CUT_OFF}
        results = dict(zip(to_run, run_many(list(to_run.values()), self.cfg.sandbox), strict=True))
        replies = {}
        for i in actions:
            result = results.get(i)
            if result is None:
                replies[i] = ("Error: the ```python block is not closed, so it was not run.", {"tool_passed": False})
            elif result.sandbox_error:  # not the model's doing: the sample is invalid
                replies[i] = ("Error: the sandbox failed to run the program.",
                              {"tool_passed": False, "invalid": "sandbox_error", "tool_error": result.sandbox_error})
            else:
                replies[i] = (f"```output\n{result.output.strip() or '(no output)'}\n```", {"tool_passed": result.passed})
        return {i: ([{"role": self.observation_role, "content": text}], info) for i, (text, info) in replies.items()}

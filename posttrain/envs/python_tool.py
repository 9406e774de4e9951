"""Math with a Python tool: the model may run code before it answers.

A response with a ```python block and no \\boxed{} answer is a tool call (one cut off inside its
block is answered with an error, not run, and the episode goes on): the program runs in a
sandboxed interpreter (posttrain/envs/sandbox.py) and its output comes back as the next user
message, in a ```output block; the episode goes on (set `grpo.max_rollout_turns` > 1). Any other
response is the final answer, scored as the math environment scores it (the math verifier, or
`env.reward_fn`), and ends the episode. Running out of turns without an answer earns 0.
"""

from __future__ import annotations

from typing import Any

from posttrain.envs.base import Message
from posttrain.envs.math_env import MathToolEnvironment, _last_boxed
from posttrain.envs.sandbox import ends_in_open_code_block, last_code_block, run_many

_CUT_OFF = object()  # the action of a response cut off inside its code block: nothing to run


class PythonToolEnvironment(MathToolEnvironment):
    # Every chat template has the user role; a subclass may use "tool" where its template has one.
    observation_role = "user"

    def find_action(self, response: str) -> str | object | None:
        if _last_boxed(response) is not None:
            return None
        return _CUT_OFF if ends_in_open_code_block(response) else last_code_block(response)

    def act(self, actions: dict[int, str | object]) -> dict[int, tuple[list[Message], dict[str, Any]]]:
        to_run = {i: code for i, code in actions.items() if code is not _CUT_OFF}
        results = run_many(list(to_run.values()), self.cfg)
        replies = {i: ("Error: the ```python block is not closed, so it was not run.", False) for i in actions}
        replies |= {i: (f"```output\n{r.output.strip() or '(no output)'}\n```", r.passed)
                    for i, r in zip(to_run, results, strict=True)}
        return {i: ([{"role": self.observation_role, "content": text}], {"tool_passed": passed})
                for i, (text, passed) in replies.items()}

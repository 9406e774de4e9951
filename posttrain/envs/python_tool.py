"""Math with a Python tool: the model may run code before it answers.

A response with a ```python block and no \\boxed{} answer is a tool call: the program runs in a
sandboxed interpreter (posttrain/envs/sandbox.py) and its output comes back as the next user
message, in a ```output block; the episode goes on (set `grpo.max_rollout_turns` > 1). Any other
response is the final answer, scored as the math environment scores it (the math verifier, or
`env.reward_fn`), and ends the episode. Running out of turns without an answer earns 0.
"""

from __future__ import annotations

from typing import Any

from posttrain.envs.base import Message
from posttrain.envs.math_env import MathToolEnvironment, _last_boxed
from posttrain.envs.sandbox import last_code_block, run_many


class PythonToolEnvironment(MathToolEnvironment):
    # Every chat template has the user role; a subclass may use "tool" where its template has one.
    observation_role = "user"

    def find_action(self, response: str) -> str | None:
        return last_code_block(response) if _last_boxed(response) is None else None

    def act(self, actions: dict[int, str]) -> dict[int, tuple[list[Message], dict[str, Any]]]:
        cfg = self.cfg
        results = run_many(list(actions.values()), cfg.sandbox_timeout_s, cfg.sandbox_memory_mb,
                           cfg.sandbox_max_output_chars, cfg.sandbox_parallel)
        return {i: ([{"role": self.observation_role, "content": f"```output\n{r.output.strip() or '(no output)'}\n```"}],
                    {"tool_passed": r.passed})
                for i, r in zip(actions, results, strict=True)}

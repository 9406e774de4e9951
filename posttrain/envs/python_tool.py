"""Math with a Python tool: the model may run code before it answers.

A response with a ```python block and no \\boxed{} answer is a tool call: the program runs in a
sandboxed interpreter (posttrain/envs/sandbox.py) and its output comes back as the next user
message, in a ```output block; the episode goes on (set `grpo.max_rollout_turns` > 1). Any other
response is the final answer, scored as the math environment scores it (the math verifier, or
`env.reward_fn`), and ends the episode. Running out of turns without an answer earns 0.
"""

from __future__ import annotations

from typing import Any

from posttrain.envs.base import EnvStepResult, Message
from posttrain.envs.math_env import MathEnvironment, _last_boxed
from posttrain.envs.sandbox import last_code_block, run_many


class PythonToolEnvironment(MathEnvironment):
    # Every chat template has the user role; a subclass may use "tool" where its template has one.
    observation_role = "user"

    def step(self, conversations: list[list[Message]], responses: list[str],
             metadata: list[dict[str, Any]]) -> EnvStepResult:
        self._check_batch(conversations, responses, metadata)
        calls = {i: code for i, response in enumerate(responses)
                 if _last_boxed(response) is None and (code := last_code_block(response)) is not None}
        answered = [i for i in range(len(responses)) if i not in calls]
        # The answers are scored by the math environment, in this thread (see math_env on timeouts).
        scored = super().step([conversations[i] for i in answered], [responses[i] for i in answered],
                              [metadata[i] for i in answered])
        n = len(responses)
        rewards, observations, done = [0.0] * n, [[] for _ in range(n)], [False] * n
        infos: list[dict[str, Any]] = [{} for _ in range(n)]
        for k, i in enumerate(answered):
            rewards[i], done[i], infos[i] = scored.rewards[k], True, scored.metadata[k]
        cfg = self.cfg
        results = run_many(list(calls.values()), cfg.sandbox_timeout_s, cfg.sandbox_memory_mb,
                           cfg.sandbox_max_output_chars, cfg.sandbox_parallel)
        for i, result in zip(calls, results, strict=True):
            infos[i]["tool_passed"] = result.passed
            output = result.output.strip() or "(no output)"
            observations[i] = [{"role": self.observation_role, "content": f"```output\n{output}\n```"}]
        return EnvStepResult(rewards, observations, done, infos)

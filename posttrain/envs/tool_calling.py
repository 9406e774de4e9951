"""Tool calling in the chat template's own format: the model calls Python functions, reads their
results and answers.

`env.tools` names the functions ("package.module:function"). Each needs type hints and a
Google-style docstring with an Args section, from which transformers builds the JSON schema the
chat template shows the model (the prompts and every later turn are rendered with `tools=`). A
response holding calls in the Hermes format that Qwen2.5, Qwen3 and Hermes models are trained on,
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, gets each call's result back as a
`tool` message and the episode goes on (set `grpo.max_rollout_turns` > 1). A response without a
call is the final answer, scored as the math environment scores it (its verifier or
`env.reward_fn`).

A call that raises returns the error to the model as its result. Each function runs in a child
process of its own, and a call that takes longer than `env.reward_timeout_s` is stopped: the model
is told, and the sample is invalid ("tool_timeout"); with `env.reward_timeout_s: null` the
functions run in the environment actor itself, where one that never returns stalls it. For
arbitrary code, use `env.name=python_tool`, which runs it in a limited subprocess.
"""

from __future__ import annotations

import json
import re
from typing import Any

from posttrain.config import ConfigError, EnvConfig
from posttrain.envs.base import Message
from posttrain.envs.math_env import MathToolEnvironment
from posttrain.envs.registry import NO_TOOLS, load_tools
from posttrain.envs.time_limit import CallTimeout, TimeLimitedFunction

_TIMED_OUT = "Error: the tool did not finish in time"
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


class ToolCallingEnvironment(MathToolEnvironment):
    def __init__(self, cfg: EnvConfig, *, rank: int = 0, world_size: int = 1):
        super().__init__(cfg, rank=rank, world_size=world_size)
        if not cfg.tools:
            raise ConfigError(NO_TOOLS)
        functions = load_tools(cfg.tools)  # checked here; with a time limit, each is called in a child process
        self.tools = {fn.__name__: fn if cfg.reward_timeout_s is None else TimeLimitedFunction(spec, cfg.reward_timeout_s)
                      for spec, fn in zip(cfg.tools, functions, strict=True)}

    def find_action(self, response: str) -> list[str | None] | None:
        calls: list[str | None] = list(_TOOL_CALL.findall(response))
        if response.count("<tool_call>") > response.count("</tool_call>"):
            calls.append(None)  # a call cut off at the token limit
        return calls or None

    def act(self, actions: dict[int, list[str | None]]) -> dict[int, tuple[list[Message], dict[str, Any]]]:
        out = {}
        for i, bodies in actions.items():
            results = [self._call(body) for body in bodies]
            info = {"tool_calls": len(results), "tool_errors": sum(not ok for _, ok in results)}
            if any(text.startswith(_TIMED_OUT) for text, _ in results):
                info["invalid"] = "tool_timeout"  # the tool hung: the episode says nothing about the model
            out[i] = ([{"role": "tool", "content": text} for text, _ in results], info)
        return out

    def _call(self, body: str | None) -> tuple[str, bool]:
        """The result of one call as text for the model, and whether the call worked."""
        if body is None:
            return "Error: the tool call is not closed with </tool_call>, so it was not made", False
        try:
            call = json.loads(body)
        except json.JSONDecodeError as err:
            return f"Error: the tool call is not valid JSON ({err})", False
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return 'Error: a tool call is {"name": ..., "arguments": {...}}', False
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):  # some models encode the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as err:
                return f"Error: the arguments are not valid JSON ({err})", False
        if call["name"] not in self.tools:
            return f"Error: unknown tool {call['name']!r}; the tools are {sorted(self.tools)}", False
        if not isinstance(arguments, dict):
            return "Error: the arguments must be a JSON object", False
        try:
            result = self.tools[call["name"]](**arguments)
        except CallTimeout:
            return f"{_TIMED_OUT} ({self.cfg.reward_timeout_s:g} s)", False
        except Exception as exc:
            return f"Error: {exc!r}", False
        return (result if isinstance(result, str) else json.dumps(result, default=str)), True

"""User functions run in a child process with a wall-clock limit per call: results and exceptions
come back as they are, a call that hangs is abandoned in time and the next call works, and a
reward function or tool that hangs makes its sample invalid instead of stalling the environment."""

from __future__ import annotations

import json
import pickle
import time

import pytest

from posttrain.config import EnvConfig
from posttrain.envs import make_environment
from posttrain.envs.math_env import MathEnvironment
from posttrain.envs.time_limit import CallTimeout, TimeLimitedFunction

QUESTION = [{"role": "user", "content": "What is 6 * 7?"}]


def test_calls_return_and_raise_as_in_process_and_a_hang_is_abandoned_in_time(reward_fns):
    fn = TimeLimitedFunction(f"{reward_fns}:hang_on_slow", timeout_s=1.0)
    try:
        assert fn([], "fast", {}) == 1.0
        start = time.perf_counter()
        with pytest.raises(CallTimeout, match=r"hang_on_slow ran longer than 1 s \(env\.reward_timeout_s\)"):
            fn([], "slow", {})
        assert time.perf_counter() - start < 2.0
        assert fn([], "fast", {}) == 1.0  # a fresh child took over
        with pytest.raises(RuntimeError, match="cannot score this one"):  # the function's own exception
            TimeLimitedFunction(f"{reward_fns}:raise_on_bad", 5.0)([], "bad", {})
        assert pickle.loads(pickle.dumps(fn)).process is None  # an environment pickles without its child
    finally:
        fn.close()


def test_a_hanging_reward_function_makes_only_its_sample_invalid(reward_fns):
    env = MathEnvironment(EnvConfig(reward_fn=f"{reward_fns}:hang_on_slow", reward_timeout_s=1.0))
    result = env.step([QUESTION] * 3, ["fast", "slow", "fast"], [{"answer": "1"}] * 3)
    assert result.rewards[0] == result.rewards[2] == 1.0
    assert result.invalid == [None, "reward_timeout", None]
    assert "CallTimeout" in result.metadata[1]["reward_error"]


def test_a_hanging_tool_is_stopped_the_model_told_and_the_sample_invalid(reward_fns):
    env = make_environment(EnvConfig(name="tools", tools=[f"{reward_fns}:wait"], reward_timeout_s=1.0))
    calls = [f'<tool_call>{json.dumps({"name": "wait", "arguments": {"seconds": s}})}</tool_call>' for s in (0, 60)]
    result = env.step([QUESTION] * 2, calls, [{"answer": "42"}] * 2)
    assert result.observations[0] == [{"role": "tool", "content": "waited"}] and result.invalid[0] is None
    assert result.observations[1] == [{"role": "tool", "content": "Error: the tool did not finish in time (1 s)"}]
    assert result.invalid[1] == "tool_timeout"  # (the environment worker ends its episode)


def test_a_function_the_child_cannot_import_is_named():
    with pytest.raises(RuntimeError, match=r"no_such_module_for_posttrain:fn cannot be imported in its child process: "
                                           r"ModuleNotFoundError"):
        TimeLimitedFunction("no_such_module_for_posttrain:fn", 5.0)()

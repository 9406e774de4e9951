"""Function calling: tools named in env.tools, Hermes-format calls, results as tool messages."""

from __future__ import annotations

import json

import pytest

from posttrain.config import ConfigError, EnvConfig
from posttrain.envs import make_environment
from posttrain.envs.registry import check_env_config, load_tools

QUESTION = [{"role": "user", "content": "What is 6 * 7?"}]


def call(name: str, **arguments) -> str:
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


@pytest.fixture
def env(reward_fns):
    return make_environment(EnvConfig(name="tools", tools=[f"{reward_fns}:multiply", f"{reward_fns}:lookup"]))


def test_calls_return_results_and_answers_are_scored(env):
    responses = [call("multiply", a=6, b=7), "So it is \\boxed{42}.", "It is \\boxed{41}.",
                 call("multiply", a=2, b=3) + " and " + call("lookup", key="x")]
    result = env.step([QUESTION] * 4, responses, [{"answer": "42"}] * 4)
    assert result.rewards == [0.0, 1.0, 0.0, 0.0]
    assert result.done == [False, True, True, False]
    assert result.observations[0] == [{"role": "tool", "content": "42"}]
    assert result.observations[3] == [{"role": "tool", "content": "6"},
                                      {"role": "tool", "content": '{"key": "x", "found": true}'}]
    assert result.metadata[3] == {"tool_calls": 2, "tool_errors": 0}
    assert result.metadata[1]["extracted_answer"] == "42"


@pytest.mark.parametrize(("body", "error"), [
    ("<tool_call>{not json}</tool_call>", "not valid JSON"),
    ('<tool_call>["multiply"]</tool_call>', 'a tool call is {"name": ..., "arguments": {...}}'),
    (call("divide", a=1, b=2), "unknown tool 'divide'; the tools are ['lookup', 'multiply']"),
    ('<tool_call>{"name": "multiply", "arguments": "{bad"}</tool_call>', "the arguments are not valid JSON"),
    ('<tool_call>{"name": "multiply", "arguments": [6, 7]}</tool_call>', "the arguments must be a JSON object"),
    (call("multiply", a=6), "missing 1 required positional argument: 'b'"),
    (call("lookup", key="missing"), "KeyError('missing')"),
])
def test_a_bad_call_tells_the_model_what_went_wrong(env, body, error):
    result = env.step([QUESTION], [body], [{"answer": "42"}])
    assert result.done == [False] and result.rewards == [0.0]
    content = result.observations[0][0]["content"]
    assert content.startswith("Error: ") and error in content
    assert result.metadata[0] == {"tool_calls": 1, "tool_errors": 1}


def test_a_call_cut_off_by_the_token_limit_is_answered_with_an_error(env):
    result = env.step([QUESTION], [call("multiply", a=6, b=7) + ' <tool_call>{"name": "mult'], [{"answer": "42"}])
    assert result.done == [False]
    assert result.observations[0] == [{"role": "tool", "content": "42"}, {
        "role": "tool", "content": "Error: the tool call is not closed with </tool_call>, so it was not made"}]
    assert result.metadata[0] == {"tool_calls": 2, "tool_errors": 1}


def test_arguments_encoded_as_a_json_string_are_accepted(env):
    body = '<tool_call>{"name": "multiply", "arguments": "{\\"a\\": 6, \\"b\\": 7}"}</tool_call>'
    assert env.step([QUESTION], [body], [{"answer": "42"}]).observations[0][0]["content"] == "42"


@pytest.mark.parametrize(("tools", "message"), [
    (["{mod}:undocumented"], "'reward_fns_for_tests:undocumented' has no usable schema.*docstring"),
    (["{mod}:NOT_CALLABLE"], "is a int, not a function"),
    (["{mod}:multiply", "{mod}:multiply"], "two tools share a name"),
])
def test_tools_are_checked_when_loaded(reward_fns, tools, message):
    with pytest.raises(ConfigError, match=message):
        load_tools([t.format(mod=reward_fns) for t in tools])


def test_env_check_names_tool_problems(reward_fns):
    with pytest.raises(ConfigError, match="env.name=tools needs env.tools"):
        check_env_config(EnvConfig(name="tools"))
    with pytest.raises(ConfigError, match="env.tools: .* has no usable schema"):
        check_env_config(EnvConfig(name="tools", tools=[f"{reward_fns}:undocumented"]))

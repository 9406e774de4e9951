"""Math environment: answer extraction, equivalence through math_verify, the user reward hook and
per-sample error isolation."""

import math
import pickle
import threading

import pytest

from posttrain.config import EnvConfig
from posttrain.envs import (
    EnvStepResult,
    MathEnvironment,
    answers_match,
    extract_final_answer,
    make_environment,
)

CONVERSATION = [{"role": "user", "content": "What is 1/2 as a decimal?"}]


def score(env, responses, answers):
    return env.step([CONVERSATION] * len(responses), responses, [{"answer": a} for a in answers])


@pytest.mark.parametrize(("text", "expected"), [
    (r"so \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces do not close the box
    (r"\fbox{7}", "7"),
    (r"first \boxed{3}, then \boxed{4}", "4"),
    (r"\boxed{3} and a truncated \boxed{4", "3"),
    (r"\boxed{} 12", ""),
    ("work 12\n#### 1,234\nthanks 9", "1,234"),
    ("#### 5 #### 6", "6"),
    ("#### **72**", "72"),  # markdown bold
    ("#### ** 2*3 **", "2*3"),
    ("The answer is 68.", "68"),
    ("it was -5 degrees", "-5"),
    ("from 3-5 pages", "5"),
    ("it was \u22125 degrees", "\u22125"),  # the Unicode minus sign
    ("from 3\u22125 pages", "5"),
    ("the probability is .5", ".5"),
    ("pi is about 3.14.", "3.14"),
    ("a total of 1,234 apples", "1234"),
    ("1,2345", "2345"),
    ("we pour 3/4 of it", "3/4"),
    ("no digits here", None),
    ("", None),
])
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


@pytest.mark.parametrize(("gold", "predicted"), [
    ("0.5", "1/2"),
    ("1/2", r"\frac{1}{2}"),
    (r"\frac{1}{2}", "0.5"),
    ("1234", "1,234"),
    ("1,234", "1234"),
    (r"\sqrt{2}", r"\sqrt{2}."),
    (r"\$5", "5"),
    ("x=3", "3"),
])
def test_equivalent_answers(gold, predicted):
    assert answers_match(gold, predicted)


@pytest.mark.parametrize(("gold", "predicted"), [("68", "67"), ("0.5", "1/3"), ("1234", "123"), ("5", "")])
def test_different_answers(gold, predicted):
    assert not answers_match(gold, predicted)


def test_rewards_and_extracted_answers():
    env = MathEnvironment(EnvConfig())
    result = score(env, ["The answer is 68.", r"so \boxed{\frac{1}{2}}", "I think 67", "no idea"],
                     ["68", "0.5", "68", "68"])
    assert isinstance(result, EnvStepResult)
    assert result.rewards == [1.0, 1.0, 0.0, 0.0]
    assert result.done == [True] * 4
    assert result.observations == [[]] * 4
    assert result.metadata == [{"extracted_answer": "68"}, {"extracted_answer": r"\frac{1}{2}"},
                               {"extracted_answer": "67"}, {"extracted_answer": None}]


def test_unicode_minus_and_bare_decimal_point_keep_their_value():
    result = score(MathEnvironment(EnvConfig()), ["so x = \u22125", "p is .5"], ["-5", "0.5"])
    assert result.rewards == [1.0, 1.0]


def test_gold_answer_may_be_a_whole_solution():
    env = MathEnvironment(EnvConfig())
    result = score(env, ["#### 72", "72"], ["She has 8 * 9 = 72.\n#### 72", r"so it is \boxed{72}"])
    assert result.rewards == [1.0, 1.0]


def test_missing_gold_answer_fails_only_that_sample():
    env = MathEnvironment(EnvConfig(error_reward=-1.0))
    result = env.step([CONVERSATION] * 2, ["68", "68"], [{"answer": "68"}, {"question_id": 3}])
    assert result.rewards == [1.0, -1.0]
    assert "reward_error" not in result.metadata[0]
    assert "KeyError" in result.metadata[1]["reward_error"] and "answer" in result.metadata[1]["reward_error"]


def test_mismatched_batch_is_an_error():
    with pytest.raises(ValueError, match="2 responses"):
        MathEnvironment(EnvConfig()).step([CONVERSATION], ["1", "2"], [{"answer": "1"}])


def test_step_from_a_thread():
    """math_verify's signal-based timeouts raise outside the main thread unless disabled."""
    env = MathEnvironment(EnvConfig())
    results = []
    thread = threading.Thread(target=lambda: results.append(score(env, ["1/2", "0.3"], ["0.5", "0.5"])))
    thread.start()
    thread.join(timeout=30)
    assert results[0].rewards == [1.0, 0.0]
    assert all("reward_error" not in m for m in results[0].metadata)


def test_make_environment():
    env = make_environment(EnvConfig(), rank=1, world_size=2)
    assert isinstance(env, MathEnvironment) and (env.rank, env.world_size) == (1, 2)
    with pytest.raises(ValueError, match=r"env\.name.*'chess'.*\['math', 'python_tool', 'tools', 'code', 'number_guess', 'reward_model', 'judge', 'math_judge'\] or "
                                         r"'package\.module:Class'"):
        make_environment(EnvConfig(name="chess"))


def test_user_reward_fn(reward_fns):
    env = MathEnvironment(EnvConfig(reward_fn=f"{reward_fns}:exact_match"))
    result = score(env, ["68", "0.5"], ["68", "1/2"])
    assert result.rewards == [1.0, 0.0]  # the user's check replaces math_verify
    assert result.metadata == [{}, {}]
    turns = MathEnvironment(EnvConfig(reward_fn=f"{reward_fns}:count_turns"))
    assert turns.step([CONVERSATION * 3], ["x"], [{}]).rewards == [3.0]


def test_environment_with_user_fn_pickles(reward_fns):
    env = MathEnvironment(EnvConfig(reward_fn=f"{reward_fns}:exact_match"))
    assert score(pickle.loads(pickle.dumps(env)), ["7"], ["7"]).rewards == [1.0]


@pytest.mark.parametrize(("spec", "message"), [
    ("no_colon_here", "must look like 'package.module:name'"),
    (":exact_match", "must look like"),
    ("posttrain_no_such_module:fn", "cannot import module 'posttrain_no_such_module'.*ModuleNotFoundError"),
    ("{mod}:no_such_fn", "has no attribute 'no_such_fn'"),
    ("{mod}:NOT_CALLABLE", "is a int, not a function"),
])
def test_reward_fn_spec_errors(reward_fns, spec, message):
    spec = spec.format(mod=reward_fns)
    with pytest.raises(ValueError, match=message) as info:
        MathEnvironment(EnvConfig(reward_fn=spec))
    assert "env.reward_fn" in str(info.value) and spec in str(info.value)


def test_raising_user_fn_fails_only_that_sample(reward_fns):
    env = MathEnvironment(EnvConfig(reward_fn=f"{reward_fns}:raise_on_bad", error_reward=-0.5))
    result = score(env, ["good", "bad", "good"], ["1"] * 3)
    assert result.rewards == [1.0, -0.5, 1.0]
    assert result.invalid == [None, "reward_error", None]
    assert result.metadata[1] == {"reward_error": "RuntimeError('cannot score this one')"}
    assert "reward_error" not in result.metadata[0] and "reward_error" not in result.metadata[2]


def test_a_user_fn_marks_what_it_cannot_score_invalid_with_a_reason(reward_fns):
    env = MathEnvironment(EnvConfig(reward_fn=f"{reward_fns}:invalid_without_reference", error_reward=-0.5))
    result = score(env, ["7", "7"], ["7", ""])
    assert result.rewards == [1.0, -0.5] and result.invalid == [None, "no_reference"]


@pytest.mark.parametrize(("fn", "error"), [("return_nan", "ValueError"), ("return_string", "TypeError")])
def test_non_numeric_user_reward_is_an_error(reward_fns, fn, error):
    result = score(MathEnvironment(EnvConfig(reward_fn=f"{reward_fns}:{fn}")), ["x"], ["1"])
    assert result.rewards == [0.0] and not math.isnan(result.rewards[0])
    assert result.metadata[0]["reward_error"].startswith(error)

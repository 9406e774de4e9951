"""The judge environments against a scripted judge (their logic), and the served chat model that
GRPO and eval use as the judge (a real tiny model, greedy)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from posttrain.config import ConfigError, EnvConfig, JudgeConfig
from posttrain.envs import make_environment
from posttrain.envs.judge_env import parse_verdict
from posttrain.envs.registry import check_env_config, services_of
from posttrain.rollout.chat_model import ChatModel


class ScriptedJudge:
    """Replies by a script keyed on the text it is shown; records what it was asked."""

    def __init__(self, replies: dict[str, str]):
        self.replies, self.asked = replies, []

    def chat(self, conversations):
        self.asked += conversations
        return [next(reply for key, reply in self.replies.items() if key in c[-1]["content"]) for c in conversations]


@pytest.mark.parametrize(("reply", "verdict"), [
    ("The answer matches. [[CORRECT]]", True),
    ("It differs. [[INCORRECT]]", False),
    ("First [[CORRECT]]... on reflection [[INCORRECT]]", False),  # the last label decides
    ("[[INCORRECT]] no wait, [[CORRECT]]", True),
    ("I cannot tell.", None),
])
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply, "[[CORRECT]]", "[[INCORRECT]]") is verdict


QUESTION = [{"role": "user", "content": "How many legs has a spider?"}]


def test_the_judge_grades_against_the_reference_and_a_reply_without_verdict_is_invalid():
    judge = ScriptedJudge({"eight legs": "Same number. [[CORRECT]]", "six": "No. [[INCORRECT]]", "dunno": "Hmm."})
    env = make_environment(EnvConfig(name="judge", judge=JudgeConfig(model_name="m")), judge=judge)
    result = env.step([QUESTION] * 4, ["It has eight legs.", "six", "dunno", "eight"],
                      [{"answer": "8"}, {"answer": "8"}, {"answer": "8"}, {}])
    assert result.rewards == [1.0, 0.0, 0.0, 0.0] and result.done == [True] * 4
    assert result.invalid == [None, None, "judge_no_verdict", "bad_row"]
    assert result.metadata[0]["judge_reply"] == "Same number. [[CORRECT]]"
    system, user = judge.asked[0]
    assert system["role"] == "system" and "[[CORRECT]]" in system["content"]
    assert user["content"] == ("Question:\nHow many legs has a spider?\n\nReference answer:\n8\n\n"
                               "Response:\nIt has eight legs.")
    assert len(judge.asked) == 3  # the row without a reference is not sent


def test_math_judge_asks_the_judge_only_where_the_verifier_says_no():
    judge = ScriptedJudge({"eight": "[[CORRECT]]", "7": "[[INCORRECT]]"})
    env = make_environment(EnvConfig(name="math_judge", judge=JudgeConfig(model_name="m")), judge=judge)
    result = env.step([QUESTION] * 4, ["So \\boxed{8}.", "I am not sure.", "\\boxed{eight}", "\\boxed{7}"],
                      [{"answer": "8"}] * 4)
    assert result.rewards == [1.0, 0.0, 1.0, 0.0]  # verified; no final answer; judged equal; judged different
    assert [c[-1]["content"].rsplit("\n", 1)[-1] for c in judge.asked] == ["eight", "7"]  # the answers alone
    assert "judge_reply" not in result.metadata[0] and result.metadata[2]["extracted_answer"] == "eight"


def test_a_judge_environment_needs_its_judge_and_a_judge_model(reward_fns):
    with pytest.raises(ConfigError, match="env.name=judge grades with a judge model"):
        make_environment(EnvConfig(name="judge", judge=JudgeConfig(model_name="m")))
    with pytest.raises(ConfigError, match="env.name=math_judge needs env.judge.model_name"):
        check_env_config(EnvConfig(name="math_judge"))
    with pytest.raises(ConfigError, match=f"env.name={reward_fns}:StrictJudge needs env.judge.model_name"):
        check_env_config(EnvConfig(name=f"{reward_fns}:StrictJudge"))  # a user's judge environment too
    with pytest.raises(ConfigError, match="env.judge.prompt must contain {reference}"):
        check_env_config(EnvConfig(name="judge", judge=JudgeConfig(model_name="m", prompt="{response}")))
    with pytest.raises(ConfigError, match=r"env.judge.system_prompt is filled in with \{correct_verdict\}, "
                                          r"\{incorrect_verdict\}; it cannot be \(KeyError: '\"score\"'\).*\{\{ or \}\}"):
        check_env_config(EnvConfig(name="judge", judge=JudgeConfig(model_name="m", system_prompt='Answer {"score": 1}')))
    with pytest.raises(ConfigError, match=r"correct_verdict and incorrect_verdict must be non-empty and neither "
                                          r"inside the other \(got 'YES' and 'NOT YES'\)"):
        check_env_config(EnvConfig(name="judge", judge=JudgeConfig(model_name="m", correct_verdict="YES",
                                                            incorrect_verdict="NOT YES")))


def test_the_verdict_labels_are_the_configs():
    judge = ScriptedJudge({"eight": "Verdict: same", "six": "Verdict: differs", "[[CORRECT]]": "[[CORRECT]]"})
    labels = JudgeConfig(model_name="m", correct_verdict="Verdict: same", incorrect_verdict="Verdict: differs")
    env = make_environment(EnvConfig(name="judge", judge=labels), judge=judge)
    result = env.step([QUESTION] * 3, ["eight", "six", "[[CORRECT]]"], [{"answer": "8"}] * 3)
    assert result.rewards == [1.0, 0.0, 0.0] and result.invalid == [None, None, "judge_no_verdict"]
    system = judge.asked[0][0]["content"]
    assert "Verdict: same" in system and "Verdict: differs" in system and "[[CORRECT]]" not in system


def test_the_served_judge_answers_each_conversation_through_its_chat_template(tiny_model_dir):
    judge = ChatModel(JudgeConfig(model_name=str(tiny_model_dir), max_new_tokens=6))
    conversations = [[{"role": "user", "content": "Is 2 + 2 = 4?"}], [{"role": "user", "content": "Is 2 + 2 = 5?"}]]
    replies = judge.chat(conversations)
    assert len(replies) == 2 and all(isinstance(r, str) and r for r in replies)
    assert judge.chat(conversations) == replies  # greedy: the same verdict for the same question
    # The tiny model writes no verdict: each sample is invalid, not scored 0.
    env = make_environment(EnvConfig(name="judge", judge=JudgeConfig(model_name=str(tiny_model_dir))), judge=judge)
    result = env.step(conversations, ["yes", "no"], [{"answer": "yes"}, {"answer": "no"}])
    assert result.invalid == ["judge_no_verdict"] * 2 and result.metadata[0]["judge_reply"] == judge.chat(
        [env._judge_conversation(conversations[0], "yes", "yes")])[0]


def test_an_environment_of_your_own_built_on_the_judge_is_served_one(reward_fns):
    own = EnvConfig(name=f"{reward_fns}:StrictJudge", judge=JudgeConfig(model_name="m"))
    assert services_of(own) == ("judge",) and services_of(EnvConfig(name="math_judge")) == ("judge",)
    assert services_of(EnvConfig(name="reward_model")) == ("reward_model",) and services_of(EnvConfig()) == ()
    assert services_of(dataclasses.replace(own, runtime_env={"pip": []})) == ()  # left to its actors


def test_the_served_judge_generates_as_configured(tiny_model_dir):
    judge = ChatModel(JudgeConfig(model_name=str(tiny_model_dir), max_new_tokens=3, temperature=0.5, batch_size=2),
                      "bfloat16")
    assert (judge.sampling.max_new_tokens, judge.sampling.temperature) == (3, 0.5)
    assert judge.backend.batch_size == 2 and judge.backend.model.dtype == torch.bfloat16

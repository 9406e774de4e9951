"""An LLM as the judge: a chat model grades each response against the row's reference answer.

`env.name=judge` asks the judge about every response. `env.name=math_judge` is NeMo Gym's "math
with judge": the math verifier decides first; a response whose final answer it accepts earns 1, one
without a final answer earns 0, and only an answer it rejects (a form it may not recognise, such as
"1/2" against "0.5" in words) goes to the judge. The judge sees `env.judge.system_prompt` (with
{correct_verdict} and {incorrect_verdict}: the labels) and `env.judge.prompt` filled with
{question} (the last user message), {reference} (metadata "answer") and {response}; the last verdict label in its reply decides. A reply with neither label
makes the sample invalid ("judge_no_verdict"): the judge failed, not the policy.

The judge model is served outside the environment (GRPO: `env.judge.workers` workers of their
own; eval: in its process), and handed in as `judge`: anything with `chat(conversations) -> texts`.
"""

from __future__ import annotations

from typing import Any, Protocol

from posttrain.config import ConfigError, EnvConfig
from posttrain.envs.base import Environment, EnvStepResult, Message
from posttrain.envs.math_env import answers_match, extract_final_answer, gold_answer


class ChatJudge(Protocol):
    def chat(self, conversations: list[list[Message]]) -> list[str]: ...


def parse_verdict(reply: str, correct: str, incorrect: str) -> bool | None:
    """True or False by the label that comes last in `reply`, None when it has neither."""
    last_correct, last_incorrect = reply.rfind(correct), reply.rfind(incorrect)
    if last_correct < 0 and last_incorrect < 0:
        return None
    return last_correct > last_incorrect


class JudgeEnvironment(Environment):
    services = ("judge",)

    def __init__(self, cfg: EnvConfig, *, rank: int = 0, world_size: int = 1, judge: ChatJudge | None = None):
        super().__init__(cfg, rank=rank, world_size=world_size)
        if judge is None:
            raise ConfigError(f"env.name={cfg.name} grades with a judge model that the run serves "
                              "(env.judge.model_name); build the environment with judge=... to use it alone")
        self.judge = judge

    def step(self, conversations: list[list[Message]], responses: list[str],
             metadata: list[dict[str, Any]]) -> EnvStepResult:
        self._check_batch(conversations, responses, metadata)
        n = len(responses)
        rewards = [0.0] * n
        infos: list[dict[str, Any]] = [{} for _ in range(n)]
        invalid: list[str | None] = [None] * n
        to_judge: dict[int, str] = {}  # sample -> what the judge compares with the reference
        for i, (response, meta) in enumerate(zip(responses, metadata, strict=True)):
            if not isinstance(meta.get("answer"), str) or not meta["answer"].strip():
                rewards[i], invalid[i] = self.cfg.error_reward, "bad_row"
                infos[i]["reward_error"] = "the row has no reference answer (metadata 'answer'; see data.answer_key)"
                continue
            decided = self.decide_without_judge(response, meta, infos[i])
            if decided is None:
                to_judge[i] = self.judged_text(response, infos[i])
            else:
                rewards[i] = decided
        replies = self.judge.chat([self._judge_conversation(conversations[i], metadata[i]["answer"], text)
                                   for i, text in to_judge.items()]) if to_judge else []
        judge = self.cfg.judge
        for i, reply in zip(to_judge, replies, strict=True):
            infos[i]["judge_reply"] = reply
            verdict = parse_verdict(reply, judge.correct_verdict, judge.incorrect_verdict)
            if verdict is None:
                rewards[i], invalid[i] = self.cfg.error_reward, "judge_no_verdict"
            else:
                rewards[i] = float(verdict)
        return EnvStepResult(rewards, [[] for _ in range(n)], [True] * n, infos, invalid)

    def decide_without_judge(self, response: str, meta: dict[str, Any], info: dict[str, Any]) -> float | None:
        """A reward that needs no judge, or None to ask it."""
        return None

    def judged_text(self, response: str, info: dict[str, Any]) -> str:
        """What the judge compares with the reference."""
        return response

    def _judge_conversation(self, conversation: list[Message], reference: str, text: str) -> list[Message]:
        question = next((m["content"] for m in reversed(conversation) if m["role"] == "user"), "")
        judge = self.cfg.judge
        system = judge.system_prompt.format(correct_verdict=judge.correct_verdict,
                                            incorrect_verdict=judge.incorrect_verdict)
        return [{"role": "system", "content": system},
                {"role": "user", "content": judge.prompt.format(question=question, reference=reference, response=text)}]


class MathJudgeEnvironment(JudgeEnvironment):
    """Math-verify first; the judge only for a final answer it rejects."""

    def decide_without_judge(self, response: str, meta: dict[str, Any], info: dict[str, Any]) -> float | None:
        extracted = info["extracted_answer"] = extract_final_answer(response)
        if extracted is None:
            return 0.0
        return 1.0 if answers_match(gold_answer(meta["answer"]), extracted) else None

    def judged_text(self, response: str, info: dict[str, Any]) -> str:
        return info["extracted_answer"]

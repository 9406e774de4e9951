"""Single-turn math verifier: the response's final answer against the gold one, with math_verify.

math_verify bounds parsing and comparison time with `signal.alarm`, which Python allows only
in the main thread: anywhere else (a threaded Ray actor, a thread pool) every call would raise
ValueError. So its timeouts are used in the main thread and switched off elsewhere; there a
pathological expression could stall the worker, a risk kept small because only the short
extracted answer is parsed, never the whole response. (math_verify logs a one-time warning
when its timeouts are off.)
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import Any

from math_verify import parse, verify

from posttrain.config import EnvConfig
from posttrain.envs.base import Environment, EnvStepResult, Invalid, Message, as_reward
from posttrain.envs.registry import load_reward_fn
from posttrain.envs.time_limit import CallTimeout, TimeLimitedFunction

_TIMEOUT_S = 5  # math_verify's own default, per parse and per comparison
_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
# An optional sign (a hyphen or the Unicode minus U+2212, not the minus of "5-3"), digits with or
# without thousands separators, an optional decimal part (or a decimal part alone: ".5") and an
# optional "/denominator".
_NUMBER = re.compile(r"(?:(?<![\w)])[-\u2212])?(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|(?<!\d)\.\d+)(?:/\d+)?")


def extract_final_answer(text: str) -> str | None:
    """The last complete \\boxed{} (or \\fbox{}), else the line after the last ####, else the last number."""
    return _first_found(text, _last_boxed, _after_hashes, _last_number)


def _first_found(text: str, *finders: Callable[[str], str | None]) -> str | None:
    # An empty \boxed{} counts as found: the model committed to an empty answer.
    for find in finders:
        answer = find(text)
        if answer is not None:
            return answer
    return None


def _last_boxed(text: str) -> str | None:
    # A truncated final box (generation hit the length limit) is skipped for an earlier complete one.
    for match in reversed(list(_BOX_OPEN.finditer(text))):
        content = _until_closing_brace(text, match.end())
        if content is not None:
            return content.strip()
    return None


def _until_closing_brace(text: str, start: int) -> str | None:
    depth, i = 1, start
    while i < len(text):
        char = text[i]
        if char == "\\":  # \{ and \} are literal braces (sets), not grouping
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
        i += 1
    return None


def _after_hashes(text: str) -> str | None:
    _, marker, after = text.rpartition("####")
    if not marker:
        return None
    lines = after.strip().splitlines()
    # Chat models often bold the final answer in markdown: "#### **72**"
    return lines[0].strip().strip("*").strip() if lines else None


def _last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def answers_match(gold: str, predicted: str) -> bool:
    """Mathematical equivalence by math_verify (0.5 == 1/2 == \\frac{1}{2}), or equal normalised text.

    The text comparison catches what math_verify cannot parse: equal strings are a correct answer.
    Order matters: math_verify treats gold and prediction differently (equations, intervals).
    """
    gold, predicted = _clean(gold), _clean(predicted)
    if not gold or not predicted:
        return False
    if gold.replace(" ", "") == predicted.replace(" ", ""):
        return True
    timeout = _TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    # Bare text hides LaTeX from math_verify (it finds no \sqrt{2} or \pi outside math delimiters),
    # so both sides are wrapped in $...$; it parses "1,234" there as 1234 and "1,2" as a set.
    gold_parsed = parse(f"${gold}$", parsing_timeout=timeout)
    predicted_parsed = parse(f"${predicted}$", parsing_timeout=timeout)
    return verify(gold_parsed, predicted_parsed, timeout_seconds=timeout)


def _clean(answer: str) -> str:
    """Without dollar signs (math delimiters or currency), a sentence's full stop, or repeated spaces.

    math_verify fails to parse a trailing full stop after LaTeX ("\\frac{1}{2}.").
    """
    answer = answer.replace("\\$", "").replace("$", "")
    return " ".join(answer.split()).rstrip(".").strip()


def gold_answer(gold: str) -> str:
    # Gold fields often hold a whole solution: "... \boxed{5}" (MATH) or "... #### 72" (GSM8K).
    found = _first_found(gold, _last_boxed, _after_hashes)
    return gold if found is None else found


class MathEnvironment(Environment):
    """Reward 1 when the final answer equals metadata["answer"], else 0; `env.reward_fn` replaces the check.

    A sample whose scoring raises is invalid ("reward_error", the exception in its metadata's
    "reward_error"; "reward_timeout" past `env.reward_timeout_s`), as is one the reward function
    returns `Invalid(reason)` for; its reward is `env.error_reward`. One malformed row or buggy or
    hanging user function cannot stop a run.
    """

    def __init__(self, cfg: EnvConfig, *, rank: int = 0, world_size: int = 1):
        super().__init__(cfg, rank=rank, world_size=world_size)
        self.reward_fn = load_reward_fn(cfg.reward_fn) if cfg.reward_fn else None
        if self.reward_fn is not None and cfg.reward_timeout_s is not None:  # checked here, called in a child
            self.reward_fn = TimeLimitedFunction(cfg.reward_fn, cfg.reward_timeout_s)

    def step(self, conversations: list[list[Message]], responses: list[str],
             metadata: list[dict[str, Any]]) -> EnvStepResult:
        self._check_batch(conversations, responses, metadata)
        return self._score_all(conversations, responses, metadata)

    def _score_all(self, conversations: list[list[Message]], responses: list[str],
                   metadata: list[dict[str, Any]]) -> EnvStepResult:
        """Every response scored as a final answer (each episode ends)."""
        rewards, infos, invalid = [], [], []
        for conversation, response, meta in zip(conversations, responses, metadata, strict=True):
            info: dict[str, Any] = {}
            try:
                reward = self._score(conversation, response, meta, info)
            except Exception as exc:
                reward = Invalid("reward_timeout" if isinstance(exc, CallTimeout) else "reward_error")
                info["reward_error"] = repr(exc)
            rewards.append(self.cfg.error_reward if isinstance(reward, Invalid) else reward)
            invalid.append(reward.reason if isinstance(reward, Invalid) else None)
            infos.append(info)
        n = len(responses)
        return EnvStepResult(rewards, [[] for _ in range(n)], [True] * n, infos, invalid)

    def _score(self, conversation: list[Message], response: str, meta: dict[str, Any],
               info: dict[str, Any]) -> float | Invalid:
        if self.reward_fn is not None:
            reward = self.reward_fn(conversation, response, meta)
            return reward if isinstance(reward, Invalid) else as_reward(reward)
        extracted = extract_final_answer(response)
        info["extracted_answer"] = extracted
        if "answer" not in meta:
            raise KeyError("metadata has no 'answer' (the gold answer; see data.answer_key)")
        return float(extracted is not None and answers_match(gold_answer(str(meta["answer"])), extracted))


class MathToolEnvironment(MathEnvironment):
    """Math where a response may be an action (a tool call) instead of the final answer: an action
    gets an observation and the episode goes on; anything else is scored as the answer and ends it."""

    def find_action(self, response: str) -> Any | None:
        """The action the response takes, or None when it is the final answer."""
        raise NotImplementedError

    def act(self, actions: dict[int, Any]) -> dict[int, tuple[list[Message], dict[str, Any]]]:
        """The observation and metadata of each sample's action, by sample index; metadata
        "invalid": a reason when the action could not be carried out (the sample is then invalid)."""
        raise NotImplementedError

    def step(self, conversations: list[list[Message]], responses: list[str],
             metadata: list[dict[str, Any]]) -> EnvStepResult:
        self._check_batch(conversations, responses, metadata)
        actions = {i: action for i, response in enumerate(responses)
                   if (action := self.find_action(response)) is not None}
        answered = [i for i in range(len(responses)) if i not in actions]
        scored = self._score_all([conversations[i] for i in answered], [responses[i] for i in answered],
                                 [metadata[i] for i in answered])
        n = len(responses)
        rewards, observations, done = [0.0] * n, [[] for _ in range(n)], [False] * n
        infos: list[dict[str, Any]] = [{} for _ in range(n)]
        invalid: list[str | None] = [None] * n
        for k, i in enumerate(answered):
            rewards[i], done[i], infos[i], invalid[i] = scored.rewards[k], True, scored.metadata[k], scored.invalid[k]
        for i, (observation, info) in self.act(actions).items():
            observations[i], infos[i], invalid[i] = observation, info, info.pop("invalid", None)
        return EnvStepResult(rewards, observations, done, infos, invalid)

"""A multi-turn game: guess the secret number, told "higher" or "lower" after each wrong guess.

The smallest task where the model has to use what the environment said in earlier turns, so it
exercises the whole multi-turn path (`grpo.max_rollout_turns`) cheaply. The secret is the row's
answer (data.answer_key); a guess is the last whole number in the response.
"""

from __future__ import annotations

import re
from typing import Any

from posttrain.envs.base import Environment, EnvStepResult, Message

_INTEGER = re.compile(r"-?\d+")


class NumberGuessEnvironment(Environment):
    """Reward 1 and done for the secret number; otherwise reward 0 and a hint as the next user turn."""

    def step(self, conversations: list[list[Message]], responses: list[str],
             metadata: list[dict[str, Any]]) -> EnvStepResult:
        self._check_batch(conversations, responses, metadata)
        rewards, observations, done, infos, invalid = [], [], [], [], []
        for response, meta in zip(responses, metadata, strict=True):
            info: dict[str, Any] = {}
            try:
                secret = int(str(meta["answer"]).strip())
            except (KeyError, ValueError) as exc:  # the row, not the model, is at fault: end this game
                rewards.append(self.cfg.error_reward)
                observations.append([])
                done.append(True)
                infos.append({"reward_error": f"the secret number (metadata 'answer') is not a whole number: {exc!r}"})
                invalid.append("bad_row")
                continue
            invalid.append(None)
            numbers = _INTEGER.findall(response)
            guess = int(numbers[-1]) if numbers else None
            info["guess"] = guess
            if guess == secret:
                hint = None
            elif guess is None:
                hint = "Reply with a whole number."
            else:
                hint = "Higher." if guess < secret else "Lower."
            rewards.append(float(hint is None))
            observations.append([] if hint is None else [{"role": "user", "content": hint}])
            done.append(hint is None)
            infos.append(info)
        return EnvStepResult(rewards, observations, done, infos, invalid)

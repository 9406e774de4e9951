"""Episodes: the model answers, the environment scores and replies, the model goes on.

A single-turn task is the one-turn case (the environment says done at once). In a longer episode
the environment's messages (a hint, a tool's output) are rendered with the chat template and
appended as tokens after the model's response; the model then continues the *same* token
sequence, so what the trainer scores is exactly what the generator saw. The episode's
`Completion` holds every token after the prompt; `mask` is 1 at the tokens the model sampled and
0 at the ones the environment inserted, which get no loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from posttrain.data.prompts import Prompt
from posttrain.envs.base import EnvItem, EnvOutcome, Message
from posttrain.rollout.base import Completion, SamplingParams

# Stands in for an assistant turn's content, to find the text the chat template puts after it.
_CONTENT_MARKER = "\u2063posttrain-turn-end\u2063"


@dataclasses.dataclass
class _Episode:
    prompt: Prompt
    conversation: list[Message]  # the prompt's messages, then each response and observation
    context: list[int]  # prompt tokens and everything since: what the next turn is generated from
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    mask: list[int] = dataclasses.field(default_factory=list)
    texts: list[str] = dataclasses.field(default_factory=list)
    reward: float = 0.0
    outcome: EnvOutcome | None = None
    finish_reason: str = "stop"
    first_error: str | None = None  # the earliest turn's "reward_error", if any turn had one


def run_episodes(
    prompts: list[Prompt],
    generate: Callable[[list[list[int]], SamplingParams], list[Completion]],
    env_step: Callable[[list[EnvItem]], list[EnvOutcome]],
    tokenizer,
    sampling: SamplingParams,
    max_turns: int,
    max_total_length: int,
    tools: list | None = None,
) -> tuple[list[Completion], list[EnvOutcome]]:
    """One episode per prompt; each turn generates for all unfinished episodes at once.

    Returns per episode a Completion of all its tokens after the prompt and an EnvOutcome whose
    reward is the sum of its turns' rewards (metadata: the last turn's, plus "turns", and the
    first "reward_error" of any turn). An episode ends when the environment says done, after
    `max_turns` responses, or when the next turn would not fit in `max_total_length` tokens (then
    its finish reason is "length"). A response cut at `sampling.max_new_tokens` does not end it:
    the environment sees the cut text and decides (a tool call left unfinished can be answered
    with an error message).
    """
    episodes = [_Episode(p, list(p.messages), list(p.token_ids)) for p in prompts]
    active = list(range(len(episodes)))
    for turn in range(max_turns):
        room = max(max_total_length - len(episodes[i].context) for i in active)
        params = dataclasses.replace(sampling, max_new_tokens=min(sampling.max_new_tokens, room),
                                     seed=_turn_seed(sampling.seed, turn))
        completions = [_cut_to(c, max_total_length - len(episodes[i].context), tokenizer)
                       for i, c in zip(active, generate([episodes[i].context for i in active], params), strict=True)]
        outcomes = env_step([EnvItem(episodes[i].conversation, c.text, episodes[i].prompt.metadata)
                             for i, c in zip(active, completions, strict=True)])
        still_active = []
        for i, completion, outcome in zip(active, completions, outcomes, strict=True):
            episode = episodes[i]
            episode.token_ids += completion.token_ids
            episode.logprobs += completion.logprobs
            episode.mask += [1] * len(completion.token_ids)
            episode.texts.append(completion.text)
            episode.reward += outcome.reward
            episode.outcome = outcome
            episode.finish_reason = completion.finish_reason
            if episode.first_error is None:
                episode.first_error = outcome.metadata.get("reward_error")
            episode.conversation = episode.conversation + [{"role": "assistant", "content": completion.text}]
            episode.context = episode.context + completion.token_ids
            if outcome.done or turn == max_turns - 1:
                continue
            observed = observation_token_ids(tokenizer, episode.conversation, outcome.observation,
                                             completion.token_ids, tools)
            if len(episode.context) + len(observed) >= max_total_length:  # no room left to answer
                episode.finish_reason = "length"
                continue
            episode.token_ids += observed
            episode.logprobs += [0.0] * len(observed)
            episode.mask += [0] * len(observed)
            episode.conversation += outcome.observation
            episode.context += observed
            still_active.append(i)
        active = still_active
        if not active:
            break
    return [_as_completion(e, max_turns) for e in episodes], [_as_outcome(e) for e in episodes]


def observation_token_ids(tokenizer, conversation: list[Message], observation: list[Message],
                          response_ids: list[int], tools: list | None = None) -> list[int]:
    """The tokens that close the model's turn (ending `conversation`), show it the environment's
    `observation` messages and open its next turn, as the chat template renders them.

    The text after the response is found with a marker in place of the response, so templates that
    rewrite earlier assistant turns (strip them, drop their reasoning) still work. When the model
    ended its turn with a token of that closing text (e.g. <|im_end|>), only the rest is added.
    """
    probe = conversation[:-1] + [{"role": "assistant", "content": _CONTENT_MARKER}]
    closed = tokenizer.apply_chat_template(probe, tools=tools, tokenize=False)
    opened = tokenizer.apply_chat_template(probe + list(observation), tools=tools, tokenize=False,
                                           add_generation_prompt=True)
    if _CONTENT_MARKER not in closed or not opened.startswith(closed):
        raise ValueError("the chat template cannot continue a conversation turn by turn: rendering it with the "
                         "environment's messages added does not extend its rendering without them")
    closing = closed[closed.rindex(_CONTENT_MARKER) + len(_CONTENT_MARKER):]
    last = tokenizer.decode(response_ids[-1:]) if response_ids else ""
    if last and closing.startswith(last):
        closing = closing[len(last):]
    return tokenizer(closing + opened[len(closed):], add_special_tokens=False)["input_ids"]


def _cut_to(completion: Completion, limit: int, tokenizer) -> Completion:
    """The completion within `limit` tokens (a batch's turn may be given more room than this
    episode has left); the kept tokens' log-probs stay valid, as a shorter sample of the same run."""
    if len(completion.token_ids) <= limit:
        return completion
    ids = completion.token_ids[:limit]
    return Completion(ids, completion.logprobs[:limit], "length", tokenizer.decode(ids, skip_special_tokens=True))


def _turn_seed(seed: int | None, turn: int) -> int | None:
    """The first turn keeps the given seed (single-turn runs sample as they always did); later
    turns get their own."""
    if seed is None or turn == 0:
        return seed
    return int(np.random.SeedSequence([seed, turn]).generate_state(1, np.uint64)[0])


def _as_completion(episode: _Episode, max_turns: int) -> Completion:
    return Completion(episode.token_ids, episode.logprobs, episode.finish_reason, "\n".join(episode.texts),
                      mask=None if max_turns == 1 else episode.mask)


def _as_outcome(episode: _Episode) -> EnvOutcome:
    last = episode.outcome
    metadata = {**last.metadata, "turns": len(episode.texts)}
    if episode.first_error is not None:
        metadata["reward_error"] = episode.first_error
    return EnvOutcome(episode.reward, last.observation, last.done, metadata, last.invalid)  # invalid: its last turn

"""Reward functions and an environment for the GRPO end-to-end tests, loaded by name through
env.reward_fn and env.name.

They run inside Ray environment actors, so test_grpo_e2e.py puts this folder on the actors' PYTHONPATH.
"""

import os
import tempfile
from pathlib import Path

from posttrain import Environment, EnvStepResult


def starts_with_space(conversation, response, metadata):
    """Trivially learnable by the untrained tiny model: about 1 in 6 of its tokens starts with a space,
    and the first response token barely depends on the prompt."""
    return 1.0 if response.startswith(" ") else 0.0


class SpaceOnSecondTurn(Environment):
    """A two-turn game: the first answer earns nothing and is told "Again."; the second earns 1 if
    it starts with a space. What is learned is learned in the second turn, after the hint."""

    def step(self, conversations, responses, metadata):
        second = [any(m["role"] == "assistant" for m in c) for c in conversations]
        rewards = [float(s and r.startswith(" ")) for s, r in zip(second, responses, strict=True)]
        observations = [[] if s else [{"role": "user", "content": "Again."}] for s in second]
        return EnvStepResult(rewards, observations, second, [{} for _ in responses])



def starts_with_minus(conversation, response, metadata):
    """For a model fine-tuned on arithmetic (answers of + and - with operands up to 99): about a
    quarter of its answers are negative, and a minus sign first is up to the policy."""
    return 1.0 if response.startswith("-") else 0.0


def answer_value(conversation, response, metadata):
    """Depends on the prompt only: a step's mean reward tells which prompts it drew."""
    return int(metadata["answer"]) / 100


class StartsWithSpace(Environment):
    """`starts_with_space` as a whole environment, written with the public API's names only."""

    def step(self, conversations, responses, metadata):
        return EnvStepResult([float(r.startswith(" ")) for r in responses], [[] for _ in responses],
                             [True] * len(responses), [{} for _ in responses])


# The environment actor that first finds this file deletes it and dies (its process exits), as a
# worker killed mid-step would; the fault-tolerance test creates it.
DIE_ONCE = Path(tempfile.gettempdir()) / f"posttrain-test-env-dies-once-{os.getuid()}"


def starts_with_space_but_dies_once(conversation, response, metadata):
    try:
        DIE_ONCE.unlink()
    except FileNotFoundError:
        return starts_with_space(conversation, response, metadata)
    os._exit(1)


def always_raises(conversation, response, metadata):
    raise ZeroDivisionError("a broken reward function")


class FailsToStart(Environment):
    """An environment whose actors cannot start: GRPO's set-up fails after the policy and generators started."""

    def __init__(self, cfg, *, rank=0, world_size=1):
        raise RuntimeError("this environment cannot start")

    def step(self, conversations, responses, metadata):
        raise AssertionError("never called")

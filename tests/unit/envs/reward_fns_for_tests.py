"""User reward functions and environments loaded by name (env.reward_fn, env.name) in the env tests."""

from posttrain.envs import Environment, EnvStepResult, Invalid
from posttrain.envs.judge_env import JudgeEnvironment

NOT_CALLABLE = 3


def exact_match(conversation, response, metadata):
    return response.strip() == metadata["answer"]


def count_turns(conversation, response, metadata):
    return float(len(conversation))


def raise_on_bad(conversation, response, metadata):
    if response == "bad":
        raise RuntimeError("cannot score this one")
    return 1.0


def invalid_without_reference(conversation, response, metadata):
    if not metadata["answer"]:
        return Invalid("no_reference")
    return float(response.strip() == metadata["answer"])


def return_nan(conversation, response, metadata):
    return float("nan")


def return_string(conversation, response, metadata):
    return "1.0"


class EchoEnvironment(Environment):
    """A user's environment, loaded through env.name: reward 1 for repeating the answer."""

    def step(self, conversations, responses, metadata):
        rewards = [float(r == m["answer"]) for r, m in zip(responses, metadata, strict=True)]
        return EnvStepResult(rewards, [[] for _ in responses], [True] * len(responses), [{} for _ in responses])


class NotAnEnvironment:
    pass


def multiply(a: int, b: int) -> int:
    """Multiply two whole numbers.

    Args:
        a: the first factor
        b: the second factor
    """
    return a * b


def lookup(key: str) -> dict:
    """Look a key up.

    Args:
        key: what to look up
    """
    if key == "missing":
        raise KeyError(key)
    return {"key": key, "found": True}


def undocumented(a: int) -> int:
    return a


def hang_on_slow(conversation, response, metadata):
    if response == "slow":
        import time

        time.sleep(600)
    return 1.0


def wait(seconds: float) -> str:
    """Wait, then say so.

    Args:
        seconds: how long to wait
    """
    import time

    time.sleep(seconds)
    return "waited"


class StrictJudge(JudgeEnvironment):
    """A user's judge environment: served a judge because its base class asks for one."""

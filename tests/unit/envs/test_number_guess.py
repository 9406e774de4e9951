"""The multi-turn number game, environments chosen by name or import path, and the checks on what
an environment returns."""

from __future__ import annotations

import pytest

from posttrain.config import ConfigError, EnvConfig
from posttrain.envs import Environment, EnvStepResult, make_environment
from posttrain.envs.base import EnvItem
from posttrain.envs.number_guess import NumberGuessEnvironment
from posttrain.envs.registry import check_env_config
from posttrain.envs.worker import EnvironmentWorker

GAME = [{"role": "user", "content": "Guess my number."}]


def play(responses: list[str], secrets: list[object]):
    env = NumberGuessEnvironment(EnvConfig(name="number_guess", error_reward=-1.0))
    return env.step([GAME] * len(responses), responses, [{"answer": s} for s in secrets])


def test_hints_point_to_the_secret_and_a_hit_ends_the_game():
    result = play(["I guess 3", "12", "Is it 4? No, 7", "no idea"], ["7", 7, " 7 ", "7"])
    assert result.rewards == [0.0, 0.0, 1.0, 0.0]
    assert result.done == [False, False, True, False]
    assert result.observations == [[{"role": "user", "content": "Higher."}], [{"role": "user", "content": "Lower."}],
                                   [], [{"role": "user", "content": "Reply with a whole number."}]]
    assert [m["guess"] for m in result.metadata] == [3, 12, 7, None]


def test_a_secret_that_is_not_a_number_ends_that_game_with_the_error_reward():
    result = play(["3", "3"], ["three", "3"])
    assert result.rewards == [-1.0, 1.0] and result.done == [True, True]
    assert "the secret number (metadata 'answer') is not a whole number" in result.metadata[0]["reward_error"]


def test_an_environment_by_import_path(reward_fns):
    env = make_environment(EnvConfig(name=f"{reward_fns}:EchoEnvironment"), rank=1, world_size=2)
    assert type(env).__name__ == "EchoEnvironment" and (env.rank, env.world_size) == (1, 2)
    assert env.step([GAME], ["5"], [{"answer": "5"}]).rewards == [1.0]


@pytest.mark.parametrize(("name", "message"), [
    ("{mod}:NotAnEnvironment", "is not a subclass of posttrain.envs.Environment"),
    ("{mod}:Missing", "has no attribute 'Missing'"),
    ("posttrain_no_such_module:Env", "cannot import module 'posttrain_no_such_module'"),
])
def test_a_bad_environment_path_fails_at_the_env_check(reward_fns, name, message):
    with pytest.raises(ConfigError, match=message) as info:
        check_env_config(EnvConfig(name=name.format(mod=reward_fns)))
    assert "env.name" in str(info.value)


@pytest.mark.parametrize(("result", "message"), [
    ({"rewards": [1.0]}, "returned dict, not an EnvStepResult"),
    (EnvStepResult([1.0, 0.0], [[], []], [True, True], [{}, {}]), "returned rewards of length 2 for 1 samples"),
    (EnvStepResult([1.0], [[]], [True], None), "returned metadata of length NoneType for 1 samples"),
    (EnvStepResult([float("nan")], [[]], [True], [{}]), "sample 0 has reward nan; rewards must be finite"),
    (EnvStepResult(["1"], [[]], [True], [{}]), "sample 0 has reward '1'"),
    (EnvStepResult([1.0], [["Higher."]], [False], [{}]), r"sample 0 has observation \['Higher.'\]"),
    (EnvStepResult([1.0], [[{"role": "user"}]], [False], [{}]), "an observation is a list of messages"),
    (EnvStepResult([1.0], [[]], [True], ["info"]), "sample 0 has metadata 'info'; it must be a dict"),
])
def test_a_users_environment_that_returns_malformed_results_is_named(result, message):
    class Broken(Environment):
        def step(self, conversations, responses, metadata):
            return result

    worker = EnvironmentWorker(EnvConfig())
    worker.env = Broken(EnvConfig())
    with pytest.raises((TypeError, ValueError), match=message) as info:
        worker.step([EnvItem(GAME, "3", {"answer": "3"})])
    assert "Broken.step" in str(info.value)


def test_numpy_rewards_and_flags_become_plain_values():
    import numpy as np

    class NumPy(Environment):
        def step(self, conversations, responses, metadata):
            return EnvStepResult([np.float32(0.5)], [[]], [np.bool_(True)], [{}])

    worker = EnvironmentWorker(EnvConfig())
    worker.env = NumPy(EnvConfig())
    outcome = worker.step([EnvItem(GAME, "3", {})])[0]
    assert (outcome.reward, outcome.done) == (0.5, True) and type(outcome.reward) is float and type(outcome.done) is bool

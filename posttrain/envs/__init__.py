"""Environments: turn a model's response into a reward and, for multi-turn tasks, the next observation."""

from posttrain.envs.base import Environment, EnvStepResult, Invalid
from posttrain.envs.math_env import MathEnvironment, answers_match, extract_final_answer
from posttrain.envs.registry import load_reward_fn, make_environment

__all__ = [
    "EnvStepResult",
    "Invalid",
    "Environment",
    "MathEnvironment",
    "answers_match",
    "extract_final_answer",
    "load_reward_fn",
    "make_environment",
]

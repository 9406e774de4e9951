"""Reward functions for the GRPO end-to-end tests, loaded by name through env.reward_fn.

They run inside Ray environment actors, so test_grpo_e2e.py puts this folder on the actors' PYTHONPATH.
"""


def starts_with_space(conversation, response, metadata):
    """Trivially learnable by the untrained tiny model: about 1 in 6 of its tokens starts with a space,
    and the first response token barely depends on the prompt."""
    return 1.0 if response.startswith(" ") else 0.0

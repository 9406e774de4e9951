"""User reward functions loaded by name through env.reward_fn in test_math_env.py."""

NOT_CALLABLE = 3


def exact_match(conversation, response, metadata):
    return response.strip() == metadata["answer"]


def count_turns(conversation, response, metadata):
    return float(len(conversation))


def raise_on_bad(conversation, response, metadata):
    if response == "bad":
        raise RuntimeError("cannot score this one")
    return 1.0


def return_nan(conversation, response, metadata):
    return float("nan")


def return_string(conversation, response, metadata):
    return "1.0"

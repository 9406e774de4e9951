"""Built-in verifiable task: integer arithmetic with an exactly checkable answer.

The whole problem space is enumerated and split by a hash of the problem, so the held-out
split never shares a problem with the training split, whatever the sample counts.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re

from posttrain.config import ArithmeticTaskConfig

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _is_held_out(a: int, op: str, b: int) -> bool:
    digest = hashlib.sha256(f"{a}{op}{b}".encode()).digest()
    return digest[0] < 26  # about 10% of the space is reserved for evaluation


def make_problems(cfg: ArithmeticTaskConfig, split: str, seed: int = 0) -> list[dict]:
    """Rows with `prompt`, `completion` and `answer`; split is "train" or "validation"."""
    for op in cfg.operations:
        if op not in _OPS:
            raise ValueError(f"data.arithmetic.operations: unknown operation {op!r}; use {sorted(_OPS)}")
    if split not in ("train", "validation"):
        raise ValueError(f"arithmetic task has splits 'train' and 'validation', not {split!r}")
    want_held_out = split == "validation"
    space = [
        (a, op, b)
        for op in cfg.operations
        for a, b in itertools.product(range(cfg.max_operand + 1), repeat=2)
        if _is_held_out(a, op, b) == want_held_out
    ]
    if not space:
        raise ValueError(f"the arithmetic {split} split is empty for max_operand={cfg.max_operand}; "
                         "raise data.arithmetic.max_operand")
    count = cfg.num_val if want_held_out else cfg.num_train
    rng = random.Random(seed + (1 if want_held_out else 0))
    if count <= len(space):
        chosen = rng.sample(space, count)
    else:  # more samples than distinct problems: repeat, still only from this split
        chosen = [rng.choice(space) for _ in range(count)]
    error_rate = cfg.teacher_error_rate if split == "train" else 0.0
    return [_row(a, op, b, slip=rng.random() < error_rate) for a, op, b in chosen]


def _row(a: int, op: str, b: int, slip: bool = False) -> dict:
    answer = _OPS[op](a, b)
    return {
        "prompt": f"What is {a} {op} {b}?",
        "completion": str(answer + 1 if slip else answer),
        "answer": str(answer),
    }


_NUMBER = re.compile(r"-?\d+")


def extract_answer(text: str) -> str | None:
    """The last integer in the response, the convention of the built-in task."""
    found = _NUMBER.findall(text)
    return found[-1] if found else None


def is_correct(response: str, answer: str) -> bool:
    return extract_answer(response) == answer.strip()


def make_preference_pairs(cfg: ArithmeticTaskConfig, split: str, seed: int = 0) -> list[dict]:
    """The same problems (and held-out split) as `make_problems`, as preference pairs: `chosen` is the
    exact answer; `rejected` is off by 1 or 2 (`near_miss`), or the wrong operation's result
    (`wrong_operation`; off by one where both operations agree, as for b = 0)."""
    rng = random.Random(seed + 2)
    rows = []
    for row in make_problems(cfg, split, seed):
        answer = int(row["answer"])
        if cfg.rejected == "near_miss":
            wrong = answer + rng.choice((-2, -1, 1, 2))
        else:
            a, op, b = row["prompt"].removeprefix("What is ").removesuffix("?").split()
            wrong = _OPS["-" if op == "+" else "+"](int(a), int(b))
            wrong = wrong if wrong != answer else answer + 1
        rows.append({"prompt": row["prompt"], "chosen": row["answer"], "rejected": str(wrong),
                     "answer": row["answer"]})
    return rows

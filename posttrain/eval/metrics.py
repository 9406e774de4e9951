"""pass@k, maj@k and accuracy over the n samples drawn for each problem.

All are per-problem values in [0, 1]; a benchmark score is their mean over problems.
"""

from __future__ import annotations

from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of P(at least one of k samples is correct) from n samples with c correct.

    1 - C(n-c, k) / C(n, k) (Chen et al., 2021), computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i):
    the binomials overflow floats for n in the hundreds, the product does not.
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def vote_key(answer: str) -> str:
    """Answers vote together when equal up to spaces, dollar signs and a final full stop (not math equivalence)."""
    return answer.replace("$", "").replace(" ", "").rstrip(".")


def majority_vote(answers: Sequence[str | None]) -> int | None:
    """Index of the sample whose answer wins the vote, or None when no sample has an answer.

    Samples without an extracted answer do not vote. Ties go to the answer seen first, so the
    result depends only on the sample order, never on hashing or dict order.
    """
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        key = vote_key(answer)
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, i)
    if not counts:
        return None
    best = max(counts, key=lambda key: (counts[key], -first[key]))
    return first[best]


def maj_at_k(answers: Sequence[str | None], correct: Sequence[bool], k: int) -> float:
    """1.0 when the majority answer of the first k samples is correct, else 0.0."""
    if len(answers) != len(correct):
        raise ValueError(f"maj@k: {len(answers)} answers but {len(correct)} correctness flags")
    if not 1 <= k <= len(answers):
        raise ValueError(f"maj@k needs 1 <= k <= n, got n={len(answers)}, k={k}")
    winner = majority_vote(answers[:k])
    return float(winner is not None and correct[winner])


def accuracy(correct: Sequence[bool]) -> float:
    """Mean correctness of the samples (equals pass@1 for the same samples)."""
    if not correct:
        raise ValueError("accuracy of no samples is undefined")
    return sum(map(bool, correct)) / len(correct)


def problem_metrics(answers: Sequence[str | None], correct: Sequence[bool], k_values: Sequence[int]) -> dict[str, float]:
    """accuracy, pass@k and maj@k of one problem's samples."""
    n, c = len(correct), sum(map(bool, correct))
    out = {"accuracy": accuracy(correct)}
    for k in k_values:
        out[f"pass@{k}"] = pass_at_k(n, c, k)
        out[f"maj@{k}"] = maj_at_k(answers, correct, k)
    return out


def mean_metrics(per_problem: Sequence[dict[str, float]]) -> dict[str, float]:
    """The benchmark score: each metric averaged over problems."""
    if not per_problem:
        raise ValueError("no problems to average")
    return {key: sum(p[key] for p in per_problem) / len(per_problem) for key in per_problem[0]}

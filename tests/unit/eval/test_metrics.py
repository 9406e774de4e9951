from math import comb

import pytest

from posttrain.eval.metrics import (
    accuracy,
    maj_at_k,
    majority_vote,
    mean_metrics,
    pass_at_k,
    problem_metrics,
)


@pytest.mark.parametrize("n,c,k", [(n, c, k) for n in (1, 2, 5, 10, 16) for c in range(n + 1)
                                   for k in range(1, n + 1)])
def test_pass_at_k_matches_the_closed_form(n, c, k):
    expected = 1 - comb(n - c, k) / comb(n, k)  # comb(m, k) == 0 when m < k
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_hand_values():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(4, 1, 4) == 1.0  # n - c = 3 < k = 4: every draw of 4 holds the correct one
    assert pass_at_k(3, 3, 1) == 1.0


def test_pass_at_1_is_the_fraction_correct_and_pass_at_k_grows_with_k():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    values = [pass_at_k(10, 3, k) for k in range(1, 11)]
    assert values == sorted(values) and values[-1] == 1.0


def test_pass_at_k_is_stable_for_large_n():
    # C(1000, 500) overflows a float; the product form does not.
    value = pass_at_k(1000, 1, 500)
    assert value == pytest.approx(0.5)


@pytest.mark.parametrize("n,c,k", [(4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="pass@k"):
        pass_at_k(n, c, k)


def test_majority_vote_by_hand():
    assert majority_vote(["3", "4", "4", "3", "4"]) == 1  # "4" wins 3-2; its first sample is index 1
    assert majority_vote(["3", "4", "4", "3"]) == 0  # tie: the answer seen first wins
    assert majority_vote(["4", "3", "3", "4"]) == 0
    assert majority_vote([None, None, "7"]) == 2  # samples without an answer do not vote
    assert majority_vote([None, None]) is None
    assert majority_vote(["$12$", "12.", " 1 2", "5"]) == 0  # equal up to $, spaces and a full stop


def test_maj_at_k_uses_only_the_first_k_samples():
    answers = ["5", "6", "6", "6"]
    correct = [True, False, False, False]
    assert maj_at_k(answers, correct, 1) == 1.0
    assert maj_at_k(answers, correct, 2) == 1.0  # tie 5 vs 6: "5" came first
    assert maj_at_k(answers, correct, 3) == 0.0
    assert maj_at_k(answers, correct, 4) == 0.0
    assert maj_at_k([None, None], [False, False], 2) == 0.0
    with pytest.raises(ValueError, match="maj@k"):
        maj_at_k(answers, correct, 5)
    with pytest.raises(ValueError, match="correctness"):
        maj_at_k(answers, correct[:2], 1)


def test_problem_and_mean_metrics():
    first = problem_metrics(["1", "2", "1", "1"], [True, False, True, True], [1, 4])
    assert first == {"accuracy": 0.75, "pass@1": pytest.approx(0.75), "maj@1": 1.0, "pass@4": 1.0, "maj@4": 1.0}
    second = problem_metrics(["9", None, "8", "8"], [False, False, False, False], [1, 4])
    assert second == {"accuracy": 0.0, "pass@1": 0.0, "maj@1": 0.0, "pass@4": 0.0, "maj@4": 0.0}
    mean = mean_metrics([first, second])
    assert mean["accuracy"] == 0.375 and mean["pass@4"] == 0.5 and mean["maj@1"] == 0.5
    assert accuracy([True, False]) == 0.5
    with pytest.raises(ValueError):
        accuracy([])

import math

import pytest
import torch

from posttrain.algos.grpo import GRPOObjective, aggregate, clipped_pg_loss, kl_estimate, kl_k3
from posttrain.config import LossConfig

# One sequence of three tokens whose new/old probability ratios are 1.0, 1.5 and 0.5.
OLD = torch.zeros(1, 3)
NEW = torch.log(torch.tensor([[1.0, 1.5, 0.5]]))
MASK = torch.ones(1, 3)


def _loss(advantage: float, **kw):
    kw.setdefault("global_tokens", 3)
    kw.setdefault("global_sequences", 1)
    return clipped_pg_loss(NEW, OLD, torch.tensor([advantage]), MASK, **kw)


def test_positive_advantage_clip_higher():
    loss, metrics = _loss(1.0, ratio_clip_min=0.2, ratio_clip_max=0.28)
    # per token max(-A r, -A clip(r)) = max(-1, -1), max(-1.5, -1.28), max(-0.5, -0.8)
    assert loss.item() == pytest.approx((-1.0 - 1.28 - 0.5) / 3, rel=1e-6)
    assert metrics["clipped_tokens"].item() == 1
    assert metrics["ratio_sum"].item() == pytest.approx(3.0)


def test_negative_advantage_and_dual_clip():
    loss, _ = _loss(-1.0, ratio_clip_min=0.2, ratio_clip_max=0.2)
    assert loss.item() == pytest.approx((1.0 + 1.5 + 0.8) / 3, rel=1e-6)
    capped, _ = _loss(-1.0, ratio_clip_min=0.2, ratio_clip_max=0.2, dual_clip=1.4)
    assert capped.item() == pytest.approx((1.0 + 1.4 + 0.8) / 3, rel=1e-6)
    with pytest.raises(ValueError, match="dual_clip"):
        _loss(-1.0, dual_clip=0.9)


def test_gradient_flows_only_through_unclipped_tokens():
    new = NEW.clone().requires_grad_(True)
    loss, _ = clipped_pg_loss(new, OLD, torch.tensor([1.0]), MASK, ratio_clip_min=0.2, ratio_clip_max=0.2,
                              global_tokens=3, global_sequences=1)
    loss.backward()
    # d/dlogp of -A*r = -A*r / N for unclipped tokens; the clipped middle token gets none
    torch.testing.assert_close(new.grad, torch.tensor([[-1 / 3, 0.0, -0.5 / 3]]))


def test_k3_kl_value_and_penalty():
    lp, ref = torch.log(torch.tensor([[0.5]])), torch.log(torch.tensor([[0.25]]))
    assert kl_k3(lp, ref).item() == pytest.approx(0.5 + math.log(2) - 1, rel=1e-6)
    assert kl_k3(lp, lp).item() == 0.0
    base, _ = _loss(1.0)
    with_kl, metrics = _loss(1.0, ref_logprobs=OLD, kl_coef=0.1)
    expected_kl = sum(1 / r - math.log(1 / r) - 1 for r in (1.0, 1.5, 0.5))  # d = log(1/r)
    assert metrics["kl_sum"].item() == pytest.approx(expected_kl, rel=1e-5)
    assert with_kl.item() == pytest.approx(base.item() + 0.1 * expected_kl / 3, rel=1e-5)


def test_kl_estimators():
    lp, ref = torch.log(torch.tensor([[0.5, 0.25]])), torch.log(torch.tensor([[0.25, 0.5]]))
    torch.testing.assert_close(kl_estimate(lp, ref, "k1"), torch.tensor([[math.log(2), -math.log(2)]]))
    torch.testing.assert_close(kl_estimate(lp, ref, "k2"), torch.tensor([[0.5 * math.log(2) ** 2] * 2]))
    torch.testing.assert_close(kl_estimate(lp, ref, "k3"), kl_k3(lp, ref))
    # Over samples from pi, k1 and k3 average to the true KL; here pi = (0.5, 0.5) against pi_ref = (0.25, 0.75).
    pi, pi_ref = torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75])
    true_kl = (pi * (pi / pi_ref).log()).sum()
    for estimator in ("k1", "k3"):
        expected = (pi * kl_estimate(pi.log(), pi_ref.log(), estimator)).sum()
        assert expected.item() == pytest.approx(true_kl.item(), rel=1e-6)
    with_k1, metrics = _loss(1.0, ref_logprobs=OLD, kl_coef=0.1, kl_estimator="k1")
    assert metrics["kl_sum"].item() == pytest.approx(sum(math.log(r) for r in (1.0, 1.5, 0.5)), abs=1e-6)
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_estimate(lp, ref, "k4")  # type: ignore[arg-type]


def test_importance_weights_scale_the_policy_term():
    base, _ = _loss(1.0)
    weighted, _ = _loss(1.0, importance_weights=torch.full((1, 3), 0.5))
    assert weighted.item() == pytest.approx(0.5 * base.item(), rel=1e-6)


def test_normalisations_on_sequences_of_different_lengths():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # token: (1+2+3+4) / 8 global tokens; sequence: (2 + 4) / 4 global sequences; dr_grpo: 10 / (4 * 5)
    assert aggregate(per_token, mask, "token", global_tokens=8, global_sequences=4).item() == pytest.approx(10 / 8)
    assert aggregate(per_token, mask, "sequence", global_tokens=8, global_sequences=4).item() == pytest.approx(1.5)
    assert aggregate(per_token, mask, "dr_grpo", global_tokens=8, global_sequences=4,
                     max_response_length=5).item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="max_response_length"):
        aggregate(per_token, mask, "dr_grpo", global_tokens=8, global_sequences=4)


def test_sequence_level_ratio_is_gspo():
    """GSPO: s_i = (pi / pi_old)(y_i) ** (1 / |y_i|), loss = -mean_i min(s_i A_i, clip(s_i) A_i)."""
    new = torch.log(torch.tensor([[1.0, 1.5, 0.5], [2.0, 7.0, 7.0]])).requires_grad_(True)  # 7.0: padding
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    loss, metrics = clipped_pg_loss(new, torch.zeros(2, 3), torch.tensor([1.0, 1.0]), mask, ratio_clip_min=0.2,
                                    ratio_clip_max=0.2, sequence_level_ratio=True, normalization="sequence",
                                    global_tokens=4, global_sequences=2)
    s1 = 0.75 ** (1 / 3)  # the geometric mean of 1.0, 1.5, 0.5: inside the clip range
    assert loss.item() == pytest.approx((-s1 - 1.2) / 2, rel=1e-6)  # s2 = 2.0 is clipped to 1.2
    assert metrics["clipped_tokens"].item() == 1 and metrics["ratio_sum"].item() == pytest.approx(3 * s1 + 2.0)
    loss.backward()
    # d/dlogp_t of -s1 / 2 = -s1 / (3 * 2) for each token of the first response; the clipped one gets none
    torch.testing.assert_close(new.grad, torch.tensor([[-s1 / 6] * 3, [0.0] * 3]))


# --------------------------------------------------------------------------- the GRPO objective

def _loss_config(**overrides) -> LossConfig:
    return LossConfig(**overrides)


@pytest.mark.parametrize("token_level, constant, expected", [
    (True, False, "token"), (True, True, "dr_grpo"), (False, False, "sequence"),
])
def test_objective_translates_the_normalization_booleans(token_level, constant, expected):
    cfg = _loss_config(token_level_loss=token_level, constant_normalization=constant)
    assert GRPOObjective.from_config(cfg, score=None, max_response_length=8).normalization == expected


def test_objective_turns_importance_correction_on_only_when_asked():
    off = GRPOObjective.from_config(_loss_config(importance_sampling_cap=3.0), None, 8)
    on = GRPOObjective.from_config(_loss_config(use_importance_sampling_correction=True, importance_sampling_cap=3.0),
                                   None, 8)
    assert off.importance_sampling_cap is None and on.importance_sampling_cap == 3.0


def test_objective_is_the_clipped_loss_of_its_batch_with_mismatch_metrics():
    """Log-probs [[-1, -2], [-0.5, pad]], the generator's [[-1.5, -2], [-0.25, pad]], advantages
    [1, -2]. No old log-probs (one optimizer step): the ratio is 1, so the token loss is -A * w with
    the importance weights w = exp(old - generator) capped at 1.2: [1.2, 1, e^-0.25]; divided by
    the step's 3 tokens. The mismatch |old - generator| is [0.5, 0, 0.25]: sum 0.75, max 0.5."""
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]], requires_grad=True)
    batch = {"loss_mask": torch.tensor([[1.0, 1.0], [1.0, 0.0]]),
             "generator_logprobs": torch.tensor([[-1.5, -2.0], [-0.25, 0.0]]),
             "advantages": torch.tensor([1.0, -2.0])}
    cfg = _loss_config(use_importance_sampling_correction=True, importance_sampling_cap=1.2,
                       reference_policy_kl_penalty=0.0)
    objective = GRPOObjective.from_config(cfg, lambda model, b: (logprobs, torch.full((2, 2), 0.5)), 4)
    loss, metrics = objective.for_step(global_tokens=3.0, global_sequences=2.0)(None, batch)
    weights = [1.2, 1.0, math.exp(-0.25)]
    assert loss.item() == pytest.approx(-(1.0 * weights[0] + 1.0 * weights[1] - 2.0 * weights[2]) / 3.0)
    assert metrics["tokens"].item() == 3.0
    assert metrics["mismatch_sum"].item() == pytest.approx(0.75)
    assert metrics["mismatch_max"].item() == pytest.approx(0.5)
    assert metrics["importance_weight_sum"].item() == pytest.approx(sum(weights))
    assert metrics["entropy_sum"].item() == pytest.approx(1.5)
    loss.backward()  # the gradient flows into the scored log-probs: d loss / d logprob = -A * w / tokens
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1.2 / 3, -1.0 / 3], [2 * weights[2] / 3, 0.0]]))

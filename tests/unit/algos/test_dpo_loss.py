"""The DPO objective against hand-computed values and TRL's DPOTrainer."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from posttrain.algos.dpo import dpo_loss, dpo_objective, sequence_logprob


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))  # -log sigmoid(-x)


def test_dpo_loss_matches_hand_computation():
    # beta 0.5: rewards chosen 0.5*[1, 0] = [0.5, 0], rejected 0.5*[-1, 1] = [-0.5, 0.5], margins [1, -0.5]
    loss, m = dpo_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0]),
                       torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0]), beta=0.5)
    assert loss.item() == pytest.approx((softplus(-1.0) + softplus(0.5)) / 2, abs=1e-6)
    assert m["rewards_chosen"].item() == pytest.approx(0.25)
    assert m["rewards_rejected"].item() == pytest.approx(0.0)
    assert m["margin"].item() == pytest.approx(0.25)
    assert m["reward_accuracy"].item() == pytest.approx(0.5)


# Log-ratio margins of the pairs above: delta = [2, -1]; beta 0.5 makes beta * delta = [1, -0.5].
DELTA_INPUTS = (torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0]), torch.tensor([-2.0, -2.0]),
                torch.tensor([-2.0, -2.0]))


@pytest.mark.parametrize("loss_type, smoothing, per_pair", [
    ("sigmoid", 0.0, [softplus(-1.0), softplus(0.5)]),
    ("sigmoid", 0.2, [0.8 * softplus(-1.0) + 0.2 * softplus(1.0), 0.8 * softplus(0.5) + 0.2 * softplus(-0.5)]),
    ("robust", 0.2, [(0.8 * softplus(-1.0) - 0.2 * softplus(1.0)) / 0.6,
                     (0.8 * softplus(0.5) - 0.2 * softplus(-0.5)) / 0.6]),
    ("hinge", 0.0, [0.0, 1.5]),
    ("ipo", 0.0, [(2 - 1) ** 2, (-1 - 1) ** 2]),  # 1 / (2 beta) = 1
    ("simpo", 0.0, [softplus(-(1 - 0.5)), softplus(-(-0.5 - 0.5))]),  # gamma 0.5 off beta * delta
])
def test_each_loss_type_matches_hand_computation(loss_type, smoothing, per_pair):
    loss, m = dpo_loss(*DELTA_INPUTS, beta=0.5, loss_type=loss_type, label_smoothing=smoothing)
    assert loss.item() == pytest.approx(sum(per_pair) / 2, abs=1e-6)
    assert m["margin"].item() == pytest.approx(0.25) and m["reward_accuracy"].item() == pytest.approx(0.5)


def test_orpo_matches_hand_computation():
    """Mean log-probs log(0.5) and log(0.2): odds 1 and 0.25, so the log odds ratio is log 4."""
    loss, m = dpo_loss(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.2)]), torch.zeros(1), torch.zeros(1),
                       beta=0.1, loss_type="orpo")
    assert loss.item() == pytest.approx(0.1 * softplus(-math.log(4.0)), abs=1e-6)
    assert m["rewards_chosen"].item() == pytest.approx(0.1 * math.log(0.5), abs=1e-6)


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "hinge", "ipo", "simpo", "orpo"])
def test_every_loss_type_raises_chosen_and_lowers_rejected(loss_type):
    chosen, rejected = torch.tensor([-2.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
    loss, _ = dpo_loss(chosen, rejected, torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.1,
                       loss_type=loss_type, label_smoothing=0.1 if loss_type == "robust" else 0.0)
    loss.backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()


def test_ipo_stops_pushing_once_the_margin_reaches_its_target():
    """Unlike the sigmoid loss, IPO's gradient vanishes at delta = 1 / (2 beta) and turns back beyond it."""
    def gradient(delta: float) -> float:
        chosen = torch.tensor([delta], requires_grad=True)
        dpo_loss(chosen, torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=0.25, loss_type="ipo")[0].backward()
        return chosen.grad.item()
    assert gradient(1.0) < 0 and gradient(2.0) == 0 and gradient(3.0) > 0


def test_policy_equal_to_reference_gives_log_2_and_no_accuracy():
    x = torch.tensor([-4.0, -7.0, -1.0])
    loss, m = dpo_loss(x, x - 1, x, x - 1, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert m["reward_accuracy"].item() == 0.0 and m["margin"].item() == 0.0


def test_gradient_raises_chosen_and_lowers_rejected():
    chosen, rejected = torch.tensor([-2.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
    loss, _ = dpo_loss(chosen, rejected, torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.2)
    loss.backward()
    assert chosen.grad.item() == pytest.approx(-0.1)  # -beta * sigmoid(0)
    assert rejected.grad.item() == pytest.approx(0.1)


def test_global_pair_count_makes_micro_batches_add_up():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(6, generator=g) for _ in range(4))
    whole, whole_m = dpo_loss(pc, pr, rc, rr, beta=0.3)
    parts = [dpo_loss(pc[s], pr[s], rc[s], rr[s], beta=0.3, num_pairs=6) for s in (slice(0, 2), slice(2, 6))]
    assert sum(p[0] for p in parts).item() == pytest.approx(whole.item(), abs=1e-6)
    for name, value in whole_m.items():
        assert sum(p[1][name] for p in parts).item() == pytest.approx(value.item(), abs=1e-6)


# Two pairs, rows [chosen_1, chosen_2, rejected_1, rejected_2], 4 next-token positions each.
LOGPROBS = torch.tensor([[0.0, -1.0, -1.0, 0.0],
                         [0.0, -2.0, 0.0, 0.0],
                         [0.0, -3.0, -1.0, -1.0],
                         [0.0, -1.0, -1.0, 0.0]])
REFERENCE = torch.tensor([[0.0, -2.0, -2.0, 0.0],
                          [0.0, -1.0, 0.0, 0.0],
                          [0.0, -2.0, -2.0, -2.0],
                          [0.0, -1.0, -2.0, 0.0]])
MASK = torch.tensor([[0.0, 1.0, 1.0, 0.0],
                     [0.0, 1.0, 0.0, 0.0],
                     [0.0, 1.0, 1.0, 1.0],
                     [0.0, 1.0, 1.0, 0.0]])


def test_sequence_logprob_sum_and_average():
    assert sequence_logprob(LOGPROBS, MASK).tolist() == [-2.0, -2.0, -5.0, -2.0]
    assert sequence_logprob(LOGPROBS, MASK, average=True).tolist() == pytest.approx([-1.0, -2.0, -5 / 3, -1.0])
    assert sequence_logprob(LOGPROBS, torch.zeros_like(MASK), average=True).tolist() == [0.0] * 4


def test_objective_sums_log_probs_by_default():
    # log-ratios: chosen [-2-(-4), -2-(-1)] = [2, -1]; rejected [-5-(-6), -2-(-3)] = [1, 1]
    loss, m = dpo_objective(LOGPROBS, REFERENCE, MASK, beta=0.5)
    margins = [0.5 * (2 - 1), 0.5 * (-1 - 1)]
    assert loss.item() == pytest.approx(sum(softplus(-x) for x in margins) / 2, abs=1e-6)
    assert m["margin"].item() == pytest.approx(sum(margins) / 2)
    assert m["reward_accuracy"].item() == 0.5
    assert m["sft_loss"].item() == pytest.approx((2 + 2) / 2)  # chosen NLL sums, per pair


def test_objective_averaging_and_sft_term():
    cfg = dict(beta=0.5, average_log_probs=True, sft_loss_weight=0.25,
                    sft_average_log_probs=True)
    loss, m = dpo_objective(LOGPROBS, REFERENCE, MASK, **cfg)
    # per-token mean log-ratios: chosen [2/2, -1/1] = [1, -1]; rejected [1/3, 1/2]
    margins = [0.5 * (1 - 1 / 3), 0.5 * (-1 - 1 / 2)]
    preference = sum(softplus(-x) for x in margins) / 2
    sft = (1.0 + 2.0) / 2  # chosen mean NLLs [1, 2], averaged over pairs
    assert m["preference_loss"].item() == pytest.approx(preference, abs=1e-6)
    assert m["sft_loss"].item() == pytest.approx(sft, abs=1e-6)
    assert loss.item() == pytest.approx(preference + 0.25 * sft, abs=1e-6)


def test_objective_rejects_an_odd_number_of_rows():
    with pytest.raises(ValueError, match="two halves"):
        dpo_objective(LOGPROBS[:3], REFERENCE[:3], MASK[:3], beta=0.05)


# --------------------------------------------------------------------------- TRL


def _trl_loss(logprobs, ref_logprobs, mask, beta, loss_types, loss_weights, label_smoothing=0.0):
    """TRL's own DPOTrainer._compute_loss on fixed tensors: the model is a stub whose fused LM head
    returns our per-token log-probs (zero outside the completion, as TRL's labels=-100 gives), and
    the reference log-probs are "precomputed" sequence sums."""
    trainer_mod = pytest.importorskip("trl.trainer.dpo_trainer", reason="trl is not installed (dev extra)")
    rows, width = logprobs.shape
    n = rows // 2
    completion_mask = torch.cat([torch.zeros(rows, 1), mask], dim=1).long()  # [2N, T]; token 0 is prompt

    class StubModel:
        training = True

        def __call__(self, **kwargs):
            zeros = torch.zeros(rows, width)
            return SimpleNamespace(log_probs=logprobs * mask, entropy=zeros, mean_logits=zeros,
                                   is_top1=zeros.bool())

    model = StubModel()
    ref_sums = (ref_logprobs * mask).sum(-1)
    inputs = {"input_ids": torch.ones(rows, width + 1, dtype=torch.long),
              "attention_mask": torch.ones(rows, width + 1, dtype=torch.long),
              "completion_mask": completion_mask,
              "ref_chosen_logps": ref_sums[:n], "ref_rejected_logps": ref_sums[n:]}
    trainer = SimpleNamespace(
        model=model, accelerator=SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x,
                                                 gather_for_metrics=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=loss_types, loss_weights=loss_weights, beta=beta, use_weighting=False,
        label_smoothing=label_smoothing,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    loss = trainer_mod.DPOTrainer._compute_loss(trainer, model, inputs, False)
    return loss, trainer._metrics["train"]


def _fixed_tensors(equal_chosen_lengths: bool = False):
    g = torch.Generator().manual_seed(1)
    rows, width = 8, 7
    logprobs = -torch.rand(rows, width, generator=g) * 3
    ref = -torch.rand(rows, width, generator=g) * 3
    lengths = torch.randint(1, width, (rows,), generator=g)
    if equal_chosen_lengths:
        lengths[: rows // 2] = 4
    mask = (torch.arange(width)[None] >= width - lengths[:, None]).float()  # completions at the end
    return logprobs, ref, mask


@pytest.mark.parametrize("beta", [0.05, 0.5])
def test_sigmoid_loss_and_metrics_match_trl(beta):
    logprobs, ref, mask = _fixed_tensors()
    ours, m = dpo_objective(logprobs, ref, mask, beta=beta)
    theirs, trl_m = _trl_loss(logprobs, ref, mask, beta, ["sigmoid"], [1.0])
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)
    assert m["rewards_chosen"].item() == pytest.approx(trl_m["rewards/chosen"][0], abs=1e-5)
    assert m["rewards_rejected"].item() == pytest.approx(trl_m["rewards/rejected"][0], abs=1e-5)
    assert m["margin"].item() == pytest.approx(trl_m["rewards/margins"][0], abs=1e-5)
    assert m["reward_accuracy"].item() == pytest.approx(trl_m["rewards/accuracies"][0], abs=1e-5)


def test_averaged_log_probs_match_trl_sigmoid_norm():
    logprobs, ref, mask = _fixed_tensors()
    cfg = dict(beta=0.3, average_log_probs=True)
    ours, _ = dpo_objective(logprobs, ref, mask, **cfg)
    theirs, _ = _trl_loss(logprobs, ref, mask, 0.3, ["sigmoid_norm"], [1.0])
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)


def test_sft_term_matches_trl_when_chosen_lengths_are_equal():
    # TRL's "sft" loss is the token mean over the whole batch: our per-sequence mean equals it
    # when every chosen reply has the same length.
    logprobs, ref, mask = _fixed_tensors(equal_chosen_lengths=True)
    cfg = dict(beta=0.1, sft_loss_weight=0.7, sft_average_log_probs=True)
    ours, _ = dpo_objective(logprobs, ref, mask, **cfg)
    theirs, _ = _trl_loss(logprobs, ref, mask, 0.1, ["sigmoid", "sft"], [1.0, 0.7])
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)


@pytest.mark.parametrize("loss_type, smoothing, average", [
    ("hinge", 0.0, False), ("robust", 0.2, False), ("ipo", 0.0, True),  # TRL's IPO takes per-token means
])
def test_loss_variants_match_trl(loss_type, smoothing, average):
    logprobs, ref, mask = _fixed_tensors()
    cfg = dict(beta=0.3, loss_type=loss_type, label_smoothing=smoothing,
                    average_log_probs=average)
    ours, _ = dpo_objective(logprobs, ref, mask, **cfg)
    theirs, _ = _trl_loss(logprobs, ref, mask, 0.3, [loss_type], [1.0], label_smoothing=smoothing)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)


def test_reference_free_losses_need_no_reference_log_probs():
    logprobs, _, mask = _fixed_tensors()
    cfg = dict(beta=0.05, loss_type="simpo", average_log_probs=True)
    without, _ = dpo_objective(logprobs, None, mask, **cfg)
    with_zero_reference, _ = dpo_objective(logprobs, torch.zeros_like(logprobs), mask, **cfg)
    assert without.item() == with_zero_reference.item()


def _mean_logps(logprobs, mask):
    means = (logprobs * mask).sum(-1) / mask.sum(-1)
    return means.chunk(2)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_simpo_matches_trl_cpo_trainer(smoothing):
    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer", reason="trl is not installed (dev extra)")
    logprobs, _, mask = _fixed_tensors()
    cfg = dict(beta=2.0, loss_type="simpo", simpo_gamma=0.8, label_smoothing=smoothing,
                    average_log_probs=True)
    ours, m = dpo_objective(logprobs, None, mask, **cfg)
    trainer = SimpleNamespace(alpha=0.0, beta=2.0, simpo_gamma=0.8, loss_type="simpo", label_smoothing=smoothing,
                              accelerator=SimpleNamespace(device=torch.device("cpu")))
    losses, chosen_rewards, rejected_rewards = cpo.CPOTrainer.cpo_loss(trainer, *_mean_logps(logprobs, mask))
    assert ours.item() == pytest.approx(losses.mean().item(), abs=1e-5)
    assert m["rewards_chosen"].item() == pytest.approx(chosen_rewards.mean().item(), abs=1e-5)


def test_orpo_matches_trl_orpo_trainer():
    orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer", reason="trl is not installed (dev extra)")
    logprobs, _, mask = _fixed_tensors()
    logprobs = logprobs / 4  # mean token probabilities from about 0.7 to 1: ORPO's odds near p = 1
    cfg = dict(beta=0.1, loss_type="orpo", average_log_probs=True)
    ours, m = dpo_objective(logprobs, None, mask, **cfg)
    trainer = SimpleNamespace(beta=0.1, accelerator=SimpleNamespace(device=torch.device("cpu")))
    losses, chosen_rewards, rejected_rewards, _, _ = orpo.ORPOTrainer.odds_ratio_loss(
        trainer, *_mean_logps(logprobs, mask))
    assert ours.item() == pytest.approx(-losses.mean().item(), abs=1e-6)  # TRL subtracts its term from the NLL
    assert m["rewards_rejected"].item() == pytest.approx(rejected_rewards.mean().item(), abs=1e-6)

"""The DPO objective and its variants as pure functions on tensors.

The implicit reward of a reply is beta * (log pi(reply) - log pi_ref(reply)). Each loss pushes
the chosen reply's reward above the rejected one's through the log-ratio margin
delta = (log pi - log pi_ref)(chosen) - (log pi - log pi_ref)(rejected):

- sigmoid (DPO): -log sigmoid(beta delta); with label smoothing e, the conservative cDPO
  (1 - e) * -log sigmoid(beta delta) + e * -log sigmoid(-beta delta), for labels flipped with
  probability e;
- robust (robust DPO): the unbiased form for such labels,
  ((1 - e) * -log sigmoid(beta delta) - e * -log sigmoid(-beta delta)) / (1 - 2e);
- hinge (SLiC): max(0, 1 - beta delta);
- ipo (IPO): (delta - 1 / (2 beta))^2, which regresses the margin to a fixed value instead of
  pushing it without bound; its authors' results use per-token mean log-probs
  (dpo.preference_average_log_probs=true).

Two losses need no reference model (its log-probs count as 0) and take per-token mean log-probs:
- simpo (SimPO): -log sigmoid(beta delta - gamma), a margin of gamma between the mean log-probs
  (label smoothing as for sigmoid);
- orpo (ORPO): -beta log sigmoid(log odds(chosen) - log odds(rejected)), odds p / (1 - p) of the
  mean token probability p, beside the SFT term on the chosen reply (dpo.sft_loss_weight).

Like the SFT loss, every term is summed over pairs and divided by the pair count of the *global*
batch, so micro-batching leaves gradients and metrics unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from posttrain.algos.rm import preference_metrics


def sequence_logprob(logprobs: torch.Tensor, loss_mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Log-prob of each row's masked tokens [B]: the sum, or the per-token mean if `average`."""
    total = (logprobs * loss_mask).sum(-1)
    return total / loss_mask.sum(-1).clamp(min=1.0) if average else total


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    num_pairs: int | float | None = None,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The preference loss of `loss_type` from sequence log-probs [N] of N pairs, and its reward metrics.

    `num_pairs` is the global batch's pair count (default N); loss and metrics are sums divided by it.
    """
    n = float(num_pairs if num_pairs is not None else policy_chosen.numel())
    chosen_ratio, rejected_ratio = policy_chosen - reference_chosen, policy_rejected - reference_rejected
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        per_pair = _smoothed_logistic_loss(beta * delta, label_smoothing)
    elif loss_type == "robust":
        per_pair = (-(1 - label_smoothing) * F.logsigmoid(beta * delta)
                    + label_smoothing * F.logsigmoid(-beta * delta)) / (1 - 2 * label_smoothing)
    elif loss_type == "hinge":
        per_pair = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        per_pair = (delta - 1 / (2 * beta)) ** 2
    elif loss_type == "simpo":
        per_pair = _smoothed_logistic_loss(beta * delta - simpo_gamma, label_smoothing)
    elif loss_type == "orpo":
        per_pair = -beta * F.logsigmoid(log_odds(policy_chosen) - log_odds(policy_rejected))
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}")
    metrics = preference_metrics(beta * chosen_ratio, beta * rejected_ratio, n)
    metrics["reward_accuracy"] = metrics.pop("accuracy")  # ties (step 0) count as wrong
    return per_pair.sum() / n, metrics


def _smoothed_logistic_loss(margin: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-log sigmoid(margin), with the fraction `label_smoothing` of the labels taken as flipped."""
    return -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)


def log_odds(mean_logprob: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) for p = exp(mean_logprob); expm1 keeps 1 - p exact near p = 1."""
    return mean_logprob - torch.log(-torch.expm1(mean_logprob))


def dpo_objective(
    logprobs: torch.Tensor,
    reference_logprobs: torch.Tensor | None,
    loss_mask: torch.Tensor,
    num_pairs: int | float | None = None,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    average_log_probs: bool = False,
    sft_loss_weight: float = 0.0,
    sft_average_log_probs: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss of one micro-batch whose rows are [chosen_1..N, rejected_1..N].

    Per-token log-probs and mask are [2N, T]; the reference's are None for a reference-free loss.
    The preference term (`dpo_loss` of `loss_type`) uses sums of log-probs, or per-token means with
    `average_log_probs`; `sft_loss_weight` adds the NLL of the chosen replies (their sums, or
    means with `sft_average_log_probs`).
    """
    if logprobs.shape[0] % 2:
        raise ValueError(f"expected chosen and rejected rows in two halves, got {logprobs.shape[0]} rows")
    n = num_pairs if num_pairs is not None else logprobs.shape[0] // 2
    policy_chosen, policy_rejected = sequence_logprob(logprobs, loss_mask, average_log_probs).chunk(2)
    if reference_logprobs is None:
        reference_chosen = reference_rejected = torch.zeros_like(policy_chosen)
    else:
        reference_chosen, reference_rejected = sequence_logprob(reference_logprobs, loss_mask,
                                                                average_log_probs).chunk(2)
    preference, metrics = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected,
                                   beta, n, loss_type, label_smoothing, simpo_gamma)
    chosen_logprobs, chosen_mask = logprobs.chunk(2)[0], loss_mask.chunk(2)[0]
    sft = -sequence_logprob(chosen_logprobs, chosen_mask, sft_average_log_probs).sum() / float(n)
    metrics["preference_loss"] = preference.detach()
    metrics["sft_loss"] = sft.detach()
    loss = preference + sft_loss_weight * sft if sft_loss_weight else preference
    return loss, metrics

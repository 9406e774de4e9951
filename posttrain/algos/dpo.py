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

Like the SFT loss, every term is summed over pairs and divided by the pair count of the *global*
batch, so micro-batching leaves gradients and metrics unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from posttrain.algos.rm import preference_metrics
from posttrain.config import DPOConfig, DPOLossType


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
    loss_type: DPOLossType = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The preference loss of `loss_type` from sequence log-probs [N] of N pairs, and its reward metrics.

    `num_pairs` is the global batch's pair count (default N); loss and metrics are sums divided by it.
    """
    n = float(num_pairs if num_pairs is not None else policy_chosen.numel())
    chosen_ratio, rejected_ratio = policy_chosen - reference_chosen, policy_rejected - reference_rejected
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        per_pair = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    elif loss_type == "robust":
        per_pair = (-(1 - label_smoothing) * F.logsigmoid(beta * delta)
                    + label_smoothing * F.logsigmoid(-beta * delta)) / (1 - 2 * label_smoothing)
    elif loss_type == "hinge":
        per_pair = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        per_pair = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}")
    metrics = preference_metrics(beta * chosen_ratio, beta * rejected_ratio, n)
    metrics["reward_accuracy"] = metrics.pop("accuracy")  # ties (step 0) count as wrong
    return per_pair.sum() / n, metrics


def dpo_objective(
    logprobs: torch.Tensor,
    reference_logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    cfg: DPOConfig,
    num_pairs: int | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss of one micro-batch whose rows are [chosen_1..N, rejected_1..N].

    Per-token log-probs and mask are [2N, T]. The preference term uses sums (or per-token means
    with `preference_average_log_probs`); `sft_loss_weight` adds the NLL of the chosen replies.
    """
    if logprobs.shape[0] % 2:
        raise ValueError(f"expected chosen and rejected rows in two halves, got {logprobs.shape[0]} rows")
    n = num_pairs if num_pairs is not None else logprobs.shape[0] // 2
    avg = cfg.preference_average_log_probs
    policy_chosen, policy_rejected = sequence_logprob(logprobs, loss_mask, avg).chunk(2)
    reference_chosen, reference_rejected = sequence_logprob(reference_logprobs, loss_mask, avg).chunk(2)
    preference, metrics = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected,
                                   cfg.reference_policy_kl_penalty, n, cfg.loss_type, cfg.label_smoothing)
    chosen_logprobs, chosen_mask = logprobs.chunk(2)[0], loss_mask.chunk(2)[0]
    sft = -sequence_logprob(chosen_logprobs, chosen_mask, cfg.sft_average_log_probs).sum() / float(n)
    metrics["preference_loss"] = preference.detach()
    metrics["sft_loss"] = sft.detach()
    loss = preference + cfg.sft_loss_weight * sft if cfg.sft_loss_weight else preference
    return loss, metrics

"""The DPO objective as pure functions on tensors.

The implicit reward of a reply is beta * (log pi(reply) - log pi_ref(reply)); the sigmoid loss
-log sigmoid(reward_chosen - reward_rejected) pushes the chosen reply's reward above the
rejected one's. Like the SFT loss, every term is summed over pairs and divided by the pair count
of the *global* batch, so micro-batching leaves gradients and metrics unchanged.
"""

from __future__ import annotations

import torch

from posttrain.algos.rm import rm_loss
from posttrain.config import DPOConfig


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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sigmoid DPO loss from sequence log-probs [N] of N pairs, and its reward metrics.

    `num_pairs` is the global batch's pair count (default N); loss and metrics are sums divided by it.
    """
    # The Bradley-Terry loss of a reward model, with DPO's implicit reward beta * log(pi / pi_ref).
    loss, metrics = rm_loss(beta * (policy_chosen - reference_chosen), beta * (policy_rejected - reference_rejected),
                            num_pairs)
    metrics["reward_accuracy"] = metrics.pop("accuracy")  # ties (step 0) count as wrong
    return loss, metrics


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
                                   cfg.reference_policy_kl_penalty, n)
    chosen_logprobs, chosen_mask = logprobs.chunk(2)[0], loss_mask.chunk(2)[0]
    sft = -sequence_logprob(chosen_logprobs, chosen_mask, cfg.sft_average_log_probs).sum() / float(n)
    metrics["preference_loss"] = preference.detach()
    metrics["sft_loss"] = sft.detach()
    loss = preference + cfg.sft_loss_weight * sft if cfg.sft_loss_weight else preference
    return loss, metrics

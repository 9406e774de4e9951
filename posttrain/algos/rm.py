"""The Bradley-Terry reward-model objective as pure functions on tensors.

A reward model maps a (prompt, reply) sequence to one scalar; the loss
-log sigmoid(r_chosen - r_rejected) is the negative log-likelihood of the observed preference
under the Bradley-Terry model. As in DPO, every term is summed over pairs and divided by the pair
count of the *global* batch, so micro-batching leaves gradients and metrics unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rm_loss(
    rewards_chosen: torch.Tensor,
    rewards_rejected: torch.Tensor,
    num_pairs: int | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry loss from the scalar rewards [N] of N pairs, and its metrics.

    `num_pairs` is the global batch's pair count (default N); loss and metrics are sums divided by it.
    """
    n = float(num_pairs if num_pairs is not None else rewards_chosen.numel())
    loss = -F.logsigmoid(rewards_chosen - rewards_rejected).sum() / n
    return loss, preference_metrics(rewards_chosen, rewards_rejected, n)


def preference_metrics(rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor, num_pairs: float
                       ) -> dict[str, torch.Tensor]:
    """Accuracy, margin and mean rewards of N pairs, as sums divided by the global pair count."""
    margin = (rewards_chosen - rewards_rejected).detach()
    return {
        "accuracy": (margin > 0).float().sum() / num_pairs,  # ties count as wrong
        "margin": margin.sum() / num_pairs,
        "rewards_chosen": rewards_chosen.detach().sum() / num_pairs,
        "rewards_rejected": rewards_rejected.detach().sum() / num_pairs,
    }


def rm_objective(scores: torch.Tensor, num_pairs: int | float | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one micro-batch whose rows are [chosen_1..N, rejected_1..N], from its scores [2N]."""
    if scores.ndim != 1 or scores.shape[0] % 2:
        raise ValueError(f"expected one score per row with chosen and rejected rows in two halves, "
                         f"got scores of shape {tuple(scores.shape)}")
    chosen, rejected = scores.float().chunk(2)
    return rm_loss(chosen, rejected, num_pairs if num_pairs is not None else chosen.numel())

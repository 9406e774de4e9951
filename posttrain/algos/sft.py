"""The SFT objective as a pure function on tensors."""

from __future__ import annotations

import torch


def nll_loss(logprobs: torch.Tensor, loss_mask: torch.Tensor, num_target_tokens: int | float) -> torch.Tensor:
    """Summed negative log-likelihood of the masked tokens divided by the global token count.

    Dividing by the count over the *whole* global batch (not per micro-batch) makes gradient
    accumulation, micro-batch size and packing leave the gradient unchanged.
    """
    return -(logprobs * loss_mask).sum() / max(float(num_target_tokens), 1.0)

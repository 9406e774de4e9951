"""Advantage estimators for group-sampled RL (GRPO and its relatives), on [num_prompts, group] rewards."""

from __future__ import annotations

from typing import Literal

import torch

Baseline = Literal["mean", "leave_one_out"]


def group_advantages(rewards: torch.Tensor, baseline: Baseline = "mean", normalize_std: bool = True,
                     eps: float = 1e-6, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Reward minus the group's baseline, optionally divided by the group's standard deviation.

    With n valid samples in a group (`valid`, [num_prompts, group] bool; all by default):
        mean:          A_i = r_i - mean_j r_j
        leave_one_out: A_i = r_i - mean_{j != i} r_j = (r_i - mean_j r_j) * n / (n - 1)   (RLOO)
        normalize_std: A_i / (std_j r_j + eps), the unbiased std (ddof=1), as in TRL
    where j runs over the group's valid samples only. Invalid samples get 0, and so does every
    sample of a group with fewer than two valid ones or whose valid rewards are all equal.
    """
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [num_prompts, group>=2], got {tuple(rewards.shape)}")
    if baseline not in ("mean", "leave_one_out"):
        raise ValueError(f"unknown baseline {baseline!r}; use 'mean' or 'leave_one_out'")
    valid = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid.bool()
    weights = valid.float()
    count = weights.sum(dim=1, keepdim=True)
    # Shifted by each group's first valid reward (which changes no advantage) so that equal rewards
    # become exact zeros: the float mean of equal values can miss them by a rounding error, which the
    # division by a zero std (+ eps) would blow up into the same large advantage for every sample.
    first = rewards.float().gather(1, valid.float().argmax(dim=1, keepdim=True))
    rewards = (rewards.float() - first) * weights
    mean = rewards.sum(dim=1, keepdim=True) / count.clamp(min=1)
    advantages = (rewards - mean) * weights
    if baseline == "leave_one_out":
        advantages = advantages * count / (count - 1).clamp(min=1)
    if normalize_std:
        std = (((rewards - mean) * weights) ** 2).sum(dim=1, keepdim=True).div((count - 1).clamp(min=1)).sqrt()
        advantages = advantages / (std + eps)
    return advantages * (count >= 2)


def informative_groups(rewards: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """DAPO dynamic sampling: a group whose (valid) rewards are all equal carries no gradient signal."""
    if valid is None:
        return (rewards.max(dim=1).values - rewards.min(dim=1).values) > 0
    highest = rewards.masked_fill(~valid.bool(), -torch.inf).max(dim=1).values
    lowest = rewards.masked_fill(~valid.bool(), torch.inf).min(dim=1).values
    return highest > lowest


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO soft overlong punishment: 0 up to `max_length - buffer`, then a linear ramp to -penalty.

    Responses at or beyond `max_length` get the full -penalty.
    """
    if not 0 < buffer <= max_length:
        raise ValueError(f"overlong buffer must be in (0, max_length], got {buffer}")
    excess = (lengths.float() - (max_length - buffer)).clamp(min=0) / buffer
    return -penalty * excess.clamp(max=1.0)

"""Advantage estimators for group-sampled RL (GRPO and its relatives), on [num_prompts, group] rewards."""

from __future__ import annotations

from typing import Literal

import torch

Baseline = Literal["mean", "leave_one_out"]


def group_advantages(rewards: torch.Tensor, baseline: Baseline = "mean", normalize_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """Reward minus the group's baseline, optionally divided by the group's standard deviation.

    `leave_one_out` compares each sample with the mean of the *other* samples of its group (RLOO),
    which keeps the baseline independent of the sample it scores. The std is the unbiased one
    (ddof=1), as in TRL; a group whose rewards are all equal gets zero advantages.
    """
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [num_prompts, group>=2], got {tuple(rewards.shape)}")
    rewards = rewards.float()
    # Shifted by each group's first reward (which changes no advantage) so that equal rewards become exact
    # zeros: the float mean of equal values can miss them by a rounding error, which the division by a
    # zero std (+ eps) would blow up into the same large advantage for every sample of the group.
    rewards = rewards - rewards[:, :1]
    group = rewards.shape[1]
    mean = rewards.mean(dim=1, keepdim=True)
    if baseline == "mean":
        advantages = rewards - mean
    elif baseline == "leave_one_out":
        advantages = (rewards - mean) * group / (group - 1)
    else:
        raise ValueError(f"unknown baseline {baseline!r}; use 'mean' or 'leave_one_out'")
    if normalize_std:
        advantages = advantages / (rewards.std(dim=1, keepdim=True) + eps)
    return advantages


def informative_groups(rewards: torch.Tensor) -> torch.Tensor:
    """DAPO dynamic sampling: a group whose rewards are all equal carries no gradient signal."""
    return (rewards.max(dim=1).values - rewards.min(dim=1).values) > 0


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO soft overlong punishment: 0 up to `max_length - buffer`, then a linear ramp to -penalty.

    Responses at or beyond `max_length` get the full -penalty.
    """
    if not 0 < buffer <= max_length:
        raise ValueError(f"overlong buffer must be in (0, max_length], got {buffer}")
    excess = (lengths.float() - (max_length - buffer)).clamp(min=0) / buffer
    return -penalty * excess.clamp(max=1.0)

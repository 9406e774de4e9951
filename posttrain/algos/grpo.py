"""The clipped policy-gradient loss of GRPO/PPO-style training, as pure functions on [B, T] tensors."""

from __future__ import annotations

from typing import Literal

import torch

Normalization = Literal["token", "sequence", "dr_grpo"]
KLEstimator = Literal["k1", "k2", "k3"]


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref): exp(d) - d - 1 with d = log pi_ref - log pi.

    Unbiased for samples drawn from pi, and never negative.
    """
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1.0


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (Schulman's k1, k2, k3):
    k1 = log pi - log pi_ref (unbiased, can be negative), k2 = (log pi - log pi_ref)^2 / 2 (biased,
    low variance), k3 (unbiased, non-negative; NeMo RL's default)."""
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k2":
        return 0.5 * (logprobs - ref_logprobs) ** 2
    if estimator == "k3":
        return kl_k3(logprobs, ref_logprobs)
    raise ValueError(f"unknown KL estimator {estimator!r}; use k1, k2 or k3")


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, normalization: Normalization, *,
              global_tokens: float, global_sequences: float, max_response_length: int | None = None) -> torch.Tensor:
    """Reduce a per-token loss to this micro-batch's share of the global-batch loss.

    token:     sum over all tokens / tokens in the global batch (long answers weigh more).
    sequence:  mean over each sequence's tokens, summed / sequences in the global batch.
    dr_grpo:   sum over all tokens / (sequences in the global batch x a constant length), which
               removes the length bias of per-sequence averaging (Dr. GRPO).
    """
    masked = per_token * mask
    if normalization == "token":
        return masked.sum() / max(global_tokens, 1.0)
    if normalization == "sequence":
        per_sequence = masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return per_sequence.sum() / max(global_sequences, 1.0)
    if normalization == "dr_grpo":
        if not max_response_length:
            raise ValueError("dr_grpo normalization needs max_response_length")
        return masked.sum() / (max(global_sequences, 1.0) * max_response_length)
    raise ValueError(f"unknown normalization {normalization!r}")


def clipped_pg_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ratio_clip_min: float = 0.2,
    ratio_clip_max: float = 0.2,
    dual_clip: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: KLEstimator = "k3",
    importance_weights: torch.Tensor | None = None,
    sequence_level_ratio: bool = False,
    normalization: Normalization = "token",
    global_tokens: float,
    global_sequences: float,
    max_response_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate with asymmetric clip (clip-higher), optional dual clip and a KL penalty.

    `advantages` is per sequence [B] (broadcast over tokens) or per token [B, T].
    `importance_weights` [B, T] corrects for generator/trainer mismatch (e.g. a truncated
    pi_trainer / pi_generator ratio); it multiplies the policy-gradient term only.
    `sequence_level_ratio` (GSPO) gives every token of a sequence the sequence's ratio, the
    geometric mean of its token ratios, so clipping keeps or drops whole responses; with
    "sequence" normalization this is GSPO's objective.
    Returns the loss and per-micro-batch sums for metrics (divide by token counts to average).
    """
    if advantages.ndim == 1:
        advantages = advantages[:, None]
    mask = mask.float()
    log_ratio = logprobs - old_logprobs
    if sequence_level_ratio:
        mean = (log_ratio * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        log_ratio = mean.expand_as(logprobs)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - ratio_clip_min, 1.0 + ratio_clip_max)
    pg = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        # For negative advantages the surrogate above is unbounded in the ratio; cap it at c * |A|.
        pg = torch.where(advantages < 0, torch.minimum(pg, -advantages * dual_clip), pg)
    if importance_weights is not None:
        pg = pg * importance_weights
    per_token = pg
    kl = None
    if ref_logprobs is not None and kl_coef != 0.0:
        kl = kl_estimate(logprobs, ref_logprobs, kl_estimator)
        per_token = per_token + kl_coef * kl
    loss = aggregate(per_token, mask, normalization, global_tokens=global_tokens,
                     global_sequences=global_sequences, max_response_length=max_response_length)
    with torch.no_grad():
        was_clipped = (clipped > unclipped).float()
        metrics = {
            "clipped_tokens": (was_clipped * mask).sum(),
            "ratio_sum": (ratio * mask).sum(),
            "tokens": mask.sum(),
        }
        if kl is not None:
            metrics["kl_sum"] = (kl * mask).sum()
    return loss, metrics

"""The clipped policy-gradient loss of GRPO/PPO-style training, as pure functions on [B, T] tensors."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

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


@dataclass(frozen=True)
class GRPOObjective:
    """One optimizer step's objective in the Policy API's form, `(model, micro-batch) -> (loss,
    metrics)`: the clipped-ratio loss of `clipped_pg_loss` on a `collate_trajectories` micro-batch.

    `score(model, batch) -> (log-probs, entropy)` is the trainer's forward at the sampling
    temperature (`posttrain.train.logprobs.response_logprobs`); it is passed in so that this layer
    stays pure tensor code. The batch may carry `old_logprobs` (the pre-update policy's, when a
    rollout feeds several optimizer steps; else the current log-probs, detached, so the ratio is 1)
    and `ref_logprobs` (the reference's, for the KL penalty). Build it with `from_config` and give
    each step its global normalisers with `for_step`.
    Metrics are sums over the micro-batch's trained tokens (divide by `tokens`), except
    `mismatch_max`, a maximum: |log pi_old - log pi_generator| is the generator/trainer mismatch.
    """

    score: Callable[[Any, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]
    max_response_length: int  # the most sampled tokens an episode can hold (Dr. GRPO's constant)
    ratio_clip_min: float = 0.2
    ratio_clip_max: float = 0.2
    dual_clip: float | None = None
    kl_coef: float = 0.0
    kl_estimator: KLEstimator = "k3"
    importance_sampling_cap: float | None = None  # None: no generator/trainer importance correction
    sequence_level_ratio: bool = False
    normalization: Normalization = "token"
    global_tokens: float = 0.0
    global_sequences: float = 0.0

    @classmethod
    def from_config(cls, loss_fn: Any, score: Callable, max_response_length: int) -> GRPOObjective:
        """From the `loss_fn` config section; its booleans are translated here, and only here."""
        if not loss_fn.token_level_loss:
            normalization = "sequence"
        else:
            normalization = "dr_grpo" if loss_fn.constant_normalization else "token"
        return cls(
            score=score, max_response_length=max_response_length,
            ratio_clip_min=loss_fn.ratio_clip_min, ratio_clip_max=loss_fn.ratio_clip_max,
            dual_clip=loss_fn.ratio_clip_c, kl_coef=loss_fn.reference_policy_kl_penalty,
            kl_estimator=loss_fn.reference_policy_kl_type,
            importance_sampling_cap=(loss_fn.importance_sampling_cap
                                     if loss_fn.use_importance_sampling_correction else None),
            sequence_level_ratio=loss_fn.sequence_level_importance_ratios, normalization=normalization,
        )

    def for_step(self, global_tokens: float, global_sequences: float) -> GRPOObjective:
        """The objective of an optimizer step over that many trained tokens and sequences (all ranks)."""
        return dataclasses.replace(self, global_tokens=global_tokens, global_sequences=global_sequences)

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logprobs, entropy = self.score(model, batch)
        mask = batch["loss_mask"]
        old = batch["old_logprobs"] if "old_logprobs" in batch else logprobs.detach()
        generator = batch["generator_logprobs"]
        weights = None
        if self.importance_sampling_cap is not None:
            weights = torch.exp(old - generator).clamp(max=self.importance_sampling_cap)
        loss, metrics = clipped_pg_loss(
            logprobs, old, batch["advantages"], mask,
            ratio_clip_min=self.ratio_clip_min, ratio_clip_max=self.ratio_clip_max, dual_clip=self.dual_clip,
            ref_logprobs=batch.get("ref_logprobs"), kl_coef=self.kl_coef, kl_estimator=self.kl_estimator,
            importance_weights=weights, sequence_level_ratio=self.sequence_level_ratio,
            normalization=self.normalization, global_tokens=self.global_tokens,
            global_sequences=self.global_sequences, max_response_length=self.max_response_length,
        )
        with torch.no_grad():
            gap = (old - generator).abs() * mask
            metrics["entropy_sum"] = (entropy * mask).sum()
            metrics["mismatch_sum"] = gap.sum()
            metrics["mismatch_max"] = gap.max()
            metrics["importance_weight_sum"] = (weights * mask).sum() if weights is not None else mask.sum()
        return loss, metrics

"""The GRPO policy worker: one per data-parallel rank, run as a Ray actor.

It turns sampled trajectories into micro-batches (each group's responses packed after one copy
of their prompt), scores them with the reference model
(and, when a rollout is split into several optimizer steps, with the pre-update policy), then
takes the optimizer steps of the clipped policy-gradient loss.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from posttrain.algos.grpo import clipped_pg_loss
from posttrain.config import GRPORunConfig
from posttrain.data.collate import PADDING, SHARED_PREFIX, shared_prefix_attention_mask
from posttrain.train.logprobs import packed_logits, picked_logprobs, supports_shared_prefix, token_entropy
from posttrain.train.model import DTYPES
from posttrain.train.policy_group import PolicyWorker


@dataclass
class Trajectory:
    prompt_ids: list[int]
    response_ids: list[int]
    generator_logprobs: list[float]
    advantage: float
    response_mask: list[int] | None = None  # multi-turn: 0 at the environment's tokens (no loss); None: all 1

    @property
    def num_trained(self) -> int:
        return len(self.response_ids) if self.response_mask is None else sum(self.response_mask)


@dataclass
class Minibatch:
    """The trajectories of one optimizer step on this rank, and the loss normalisers of the whole
    (all-rank) step, so that per-rank losses add up to the global loss."""

    trajectories: list[Trajectory]
    global_tokens: float
    global_sequences: float


def collate_trajectories(trajectories: list[Trajectory], pad_token_id: int, share_prompts: bool = True,
                         linear_to_attention_cost: float | None = None) -> dict[str, torch.Tensor]:
    """Rows for one forward pass, with per-token fields laid out [trajectory, response token].

    With `share_prompts`, the responses to one prompt (consecutive trajectories with the same
    prompt, as a GRPO group arrives) are packed after a single copy of it: a custom attention mask
    lets each response see the prompt and its own earlier tokens only, and its positions continue
    the prompt's, so every token has exactly the context it has in its own sequence. The prompt,
    most of the tokens in a group, then costs one forward and backward instead of G. But attention
    over a row costs its width squared whatever the mask, so with long responses one row per group
    would cost more than it saves: given `linear_to_attention_cost` (see `packing_cost_ratio`), a
    row takes the next response only while that is cheaper than a new row with its own copy of the
    prompt. Without sharing (attention kernels that take no custom mask), each trajectory is its
    own right-padded row.
    `source_index` holds, for each response token, the flat (row * width + column) index of the
    position whose logits predict it.
    """
    groups: list[list[Trajectory]] = []
    for t in trajectories:
        row = groups[-1] if groups else None
        if share_prompts and row and row[0].prompt_ids == t.prompt_ids and _cheaper_in_the_row(
                len(t.prompt_ids), sum(len(r.response_ids) for r in row), len(t.response_ids),
                linear_to_attention_cost):
            row.append(t)
        else:
            groups.append([t])
    width = max(len(g[0].prompt_ids) + sum(len(t.response_ids) for t in g) for g in groups)
    span = max(len(t.response_ids) for t in trajectories)
    input_ids = torch.full((len(groups), width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(groups), width), dtype=torch.long)
    segment = torch.full((len(groups), width), PADDING, dtype=torch.long)  # or SHARED_PREFIX, or k for response k
    per_token = (len(trajectories), span)
    source_index = torch.zeros(per_token, dtype=torch.long)
    targets = torch.zeros(per_token, dtype=torch.long)
    loss_mask = torch.zeros(per_token)
    generator_logprobs = torch.zeros(per_token)
    i = 0
    for row, group in enumerate(groups):
        p = len(group[0].prompt_ids)
        input_ids[row, :p] = torch.tensor(group[0].prompt_ids)
        position_ids[row, :p] = torch.arange(p)
        segment[row, :p] = SHARED_PREFIX
        column = p
        for k, t in enumerate(group, start=1):
            r = len(t.response_ids)
            input_ids[row, column : column + r] = torch.tensor(t.response_ids)
            position_ids[row, column : column + r] = torch.arange(p, p + r)
            segment[row, column : column + r] = k
            # response token j is predicted by the token before it: the prompt's last one for j = 0
            predictors = torch.tensor([p - 1, *range(column, column + r - 1)][:r], dtype=torch.long)
            source_index[i, :r] = row * width + predictors
            targets[i, :r] = torch.tensor(t.response_ids)
            loss_mask[i, :r] = 1.0 if t.response_mask is None else torch.tensor(t.response_mask, dtype=torch.float32)
            generator_logprobs[i, :r] = torch.tensor(t.generator_logprobs)
            column += r
            i += 1
    if share_prompts:
        attention_mask = shared_prefix_attention_mask(segment)
    else:
        attention_mask = (segment != PADDING).long()
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "attention_mask": attention_mask,
        "source_index": source_index,
        "targets": targets,
        "loss_mask": loss_mask,
        "generator_logprobs": generator_logprobs,
        "advantages": torch.tensor([t.advantage for t in trajectories], dtype=torch.float32),
    }


def packing_cost_ratio(model_config) -> float:
    """FLOPs of one token through a layer's linear maps over those of one (query, key) pair of its
    attention: how much attention one prompt token's linear work is worth."""
    config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    d = config.hidden_size
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    linear = 2 * d * (config.num_attention_heads * head_dim) + 2 * d * kv * head_dim  # q, o; k, v
    linear += 3 * d * getattr(config, "intermediate_size", 4 * d)  # gated MLP
    return linear / (2 * config.num_attention_heads * head_dim)  # scores and weighted sum, per pair


def _cheaper_in_the_row(prompt: int, responses: int, new: int, ratio: float | None) -> bool:
    """Whether a response of `new` tokens costs less added to a row holding the prompt and
    `responses` tokens (its linear work, and the growth of the row's squared width in attention)
    than in a new row of its own (the prompt's linear work again, and that row's attention):
    new + 2*(prompt+responses)*new + new^2 / ratio <= prompt + new + ((prompt+new)^2) / ratio, which
    reduces to 2 * new * responses - prompt^2 <= prompt * ratio."""
    return ratio is None or 2 * new * responses - prompt * prompt <= prompt * ratio


def response_logprobs(model, batch: dict[str, torch.Tensor], temperature: float = 1.0,
                      entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [N, span] of each response token of a `collate_trajectories` batch under the
    temperature-scaled distribution (so that trainer and generator score tokens alike), and, if
    asked, the entropy of the distribution predicting each token (a diagnostic, no gradient). Both
    are computed once per predicting position and then picked per token."""
    flat, source = packed_logits(model, batch, batch["loss_mask"].bool())
    if temperature != 1.0:
        flat = flat / temperature
    logprobs = picked_logprobs(flat, source, batch["targets"])
    return logprobs, token_entropy(flat)[source] if entropy else None


class GRPOPolicyWorker(PolicyWorker):
    """A policy worker that also scores rollouts and takes GRPO's optimizer steps. Several form one
    FSDP2 group (the policy and the reference model are sharded); see PolicyWorker for set-up."""

    def __init__(self, cfg: GRPORunConfig, total_optimizer_steps: int, *, rank: int = 0, world_size: int = 1,
                 weights_path: str | None = None):
        super().__init__(cfg.policy, total_optimizer_steps, rank=rank, world_size=world_size, seed=cfg.grpo.seed,
                         weights_path=weights_path, with_reference=cfg.loss_fn.reference_policy_kl_penalty > 0)
        self.run_cfg = cfg
        self.temperature = cfg.policy.generation.temperature
        # The most sampled tokens an episode can hold (Dr. GRPO's constant normaliser).
        self.max_trained_tokens = min(cfg.policy.generation.max_new_tokens * cfg.grpo.max_rollout_turns,
                                      cfg.policy.max_total_sequence_length)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Weights for the generators, in their precision and on the CPU (Ray moves them); whole on
        rank 0, empty on the others. Every rank must be called."""
        dtype = DTYPES[self.cfg.precision]
        return {k: v.detach().to("cpu", dtype) for k, v in self.policy.full_state_dict().items()}

    # ------------------------------------------------------------------ training

    @torch.no_grad()
    def _score(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with self.policy.autocast():
            return response_logprobs(model, batch, self.temperature)[0]

    def _same_counts_on_every_rank(self, steps: list[tuple[Minibatch, list[dict]]], pad: int,
                                   share: bool) -> list[tuple[Minibatch, list[dict]]]:
        """FSDP2 ranks gather each layer's weights together, so each must run as many forward and
        backward passes as the others: a rank with fewer micro-batches in a step (an uneven or empty
        shard) adds ones with nothing to train on (zero loss, gradient and metrics)."""
        if self.world_size == 1:
            return steps
        counts = torch.tensor([len(micro) for _, micro in steps])
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        padded = []
        for (mb, micro), count in zip(steps, counts.tolist(), strict=True):
            filler = collate_trajectories([Trajectory([pad], [pad], [0.0], 0.0)], pad, share)
            filler["loss_mask"].zero_()
            padded.append((mb, micro + [filler] * (count - len(micro))))
        return padded

    def train(self, minibatches: list[Minibatch]) -> dict[str, float]:
        """One optimizer step per minibatch; returns metrics summed over ranks (rank 0's view)."""
        loss_cfg = self.run_cfg.loss_fn
        micro_size = self.cfg.train_micro_batch_size
        pad = self.policy.tokenizer.pad_token_id
        share = supports_shared_prefix(self.policy.model)
        cost_ratio = packing_cost_ratio(self.policy.model.config)
        steps = []
        start = time.perf_counter()
        for mb in minibatches:
            # In arrival order, so that a group's responses stay together and share their prompt.
            ts = mb.trajectories
            micro = [collate_trajectories(ts[i : i + micro_size], pad, share, cost_ratio)
                     for i in range(0, len(ts), micro_size)]
            steps.append((mb, micro))
        steps = [(mb, [{k: v.to(self.policy.device) for k, v in b.items()} for b in micro])
                 for mb, micro in self._same_counts_on_every_rank(steps, pad, share)]
        # Scores that must come from the weights *before* any update of this rollout.
        if self.policy.with_reference:
            with self.policy.reference_model() as reference:
                for _, micro in steps:
                    for batch in micro:
                        batch["ref_logprobs"] = self._score(reference, batch)
        self.policy.model.eval()
        if len(steps) > 1:
            for _, micro in steps:
                for batch in micro:
                    batch["old_logprobs"] = self._score(self.policy.model, batch)
        logprob_time = time.perf_counter() - start

        sums = torch.zeros(7, device=self.policy.device)  # clipped, ratio, kl, entropy, tokens, |mismatch|, is-weight
        max_mismatch = torch.zeros((), device=self.policy.device)
        losses, grad_norms, lrs = [], [], []
        start = time.perf_counter()
        for mb, micro in steps:
            def loss_fn(model, batch, mb=mb):
                nonlocal max_mismatch
                logprobs, entropy = response_logprobs(model, batch, self.temperature, entropy=True)
                mask = batch["loss_mask"]
                old = batch["old_logprobs"] if "old_logprobs" in batch else logprobs.detach()
                generator = batch["generator_logprobs"]
                weights = None
                if loss_cfg.use_importance_sampling_correction:
                    weights = torch.exp(old - generator).clamp(max=loss_cfg.importance_sampling_cap)
                loss, m = clipped_pg_loss(
                    logprobs, old, batch["advantages"], mask,
                    ratio_clip_min=loss_cfg.ratio_clip_min, ratio_clip_max=loss_cfg.ratio_clip_max,
                    dual_clip=loss_cfg.ratio_clip_c, ref_logprobs=batch.get("ref_logprobs"),
                    kl_coef=loss_cfg.reference_policy_kl_penalty, kl_estimator=loss_cfg.reference_policy_kl_type,
                    importance_weights=weights,
                    sequence_level_ratio=loss_cfg.sequence_level_importance_ratios,
                    normalization=_normalization(self.run_cfg), global_tokens=mb.global_tokens,
                    global_sequences=mb.global_sequences,
                    max_response_length=self.max_trained_tokens,
                )
                gap = (old - generator).abs() * mask
                sums.add_(torch.stack([
                    m["clipped_tokens"], m["ratio_sum"], m.get("kl_sum", torch.zeros(())).to(sums.device),
                    (entropy * mask).sum(), m["tokens"], gap.sum(),
                    ((weights if weights is not None else torch.ones_like(mask)) * mask).sum(),
                ]).detach())
                max_mismatch = torch.maximum(max_mismatch, gap.max().detach())
                return loss

            out = self.policy.train_step(micro, loss_fn)
            losses.append(out["loss"])
            grad_norms.append(out["grad_norm"])
            lrs.append(out["lr"])
        train_time = time.perf_counter() - start
        if self.world_size > 1:
            dist.all_reduce(sums)
            dist.all_reduce(max_mismatch, op=dist.ReduceOp.MAX)
        clipped, ratio, kl, entropy, tokens, mismatch, is_weight = (float(x) for x in sums)
        tokens = max(tokens, 1.0)
        return {
            "train/loss": sum(losses) / len(losses),
            "train/grad_norm": sum(grad_norms) / len(grad_norms),
            "train/lr": lrs[-1],
            "train/optimizer_steps": len(steps),
            "train/clip_fraction": clipped / tokens,
            "train/ratio_mean": ratio / tokens,
            "train/kl": kl / tokens,
            "train/entropy": entropy / tokens,
            "train/gen_logprob_mismatch": mismatch / tokens,
            "train/gen_logprob_mismatch_max": float(max_mismatch),
            "train/importance_weight_mean": is_weight / tokens,
            "time/logprobs_s": logprob_time,
            "time/training_s": train_time,
        }


def _normalization(cfg: GRPORunConfig) -> str:
    if not cfg.loss_fn.token_level_loss:
        return "sequence"
    return "dr_grpo" if cfg.loss_fn.constant_normalization else "token"

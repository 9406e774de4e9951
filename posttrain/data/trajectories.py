"""Sampled trajectories, the value type GRPO trains on, and their collation into micro-batches.

A trajectory is one prompt and one sampled response (a multi-turn episode's tokens, the
environment's masked out), the generator's log-probs of its tokens and its advantage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.data.collate import PADDING, SHARED_PREFIX, shared_prefix_attention_mask
from posttrain.data.model_shape import attention_width, linear_params_per_layer


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
    return linear_params_per_layer(model_config) / (2 * attention_width(model_config))  # scores and weighted sum


def _cheaper_in_the_row(prompt: int, responses: int, new: int, ratio: float | None) -> bool:
    """Whether a response of `new` tokens costs less added to a row holding the prompt and
    `responses` tokens (its linear work, and the growth of the row's squared width in attention)
    than in a new row of its own (the prompt's linear work again, and that row's attention):
    new + 2*(prompt+responses)*new + new^2 / ratio <= prompt + new + ((prompt+new)^2) / ratio, which
    reduces to 2 * new * responses - prompt^2 <= prompt * ratio."""
    return ratio is None or 2 * new * responses - prompt * prompt <= prompt * ratio

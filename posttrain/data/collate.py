"""Micro-batches for training: right-padded rows, or sequences packed into one row.

Packed rows carry `position_ids` that restart at 0 for each sequence and no attention mask;
transformers then builds a block-diagonal causal mask, so packed and padded batches compute the
same per-token log-probs while packing wastes no compute on padding.
"""

from __future__ import annotations

import torch

from posttrain.data.conversations import Sample


def pad_batch(samples: list[Sample], pad_token_id: int) -> dict[str, torch.Tensor]:
    width = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((len(samples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    loss_mask = torch.zeros((len(samples), width), dtype=torch.float32)
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        input_ids[row, :n] = torch.tensor(s.input_ids)
        attention_mask[row, :n] = 1
        loss_mask[row, :n] = torch.tensor(s.loss_mask, dtype=torch.float32)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def pack_sequences(samples: list[Sample], max_tokens: int) -> list[list[int]]:
    """First-fit decreasing bin packing: groups of sample indices whose total length fits."""
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].input_ids), reverse=True)
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(samples[i].input_ids)
        if n > max_tokens:
            raise ValueError(f"a sequence of {n} tokens does not fit a packed row of {max_tokens} tokens")
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(max_tokens - n)
    return bins


def pack_rows(rows: list[list[Sample]]) -> dict[str, torch.Tensor]:
    """Each row holds whole sequences back to back; rows are right-filled to a common width.

    The filler starts a fresh position run of its own, so it forms a separate (masked) segment
    and never becomes part of a real sequence's attention.
    """
    width = max(sum(len(s.input_ids) for s in row) for row in rows)
    input_ids = torch.zeros((len(rows), width), dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.float32)
    for r, row in enumerate(rows):
        offset = 0
        for s in row:
            n = len(s.input_ids)
            input_ids[r, offset : offset + n] = torch.tensor(s.input_ids)
            position_ids[r, offset : offset + n] = torch.arange(n)
            loss_mask[r, offset : offset + n] = torch.tensor(s.loss_mask, dtype=torch.float32)
            offset += n
        position_ids[r, offset:] = torch.arange(width - offset)
    return {"input_ids": input_ids, "position_ids": position_ids, "loss_mask": loss_mask}


def make_micro_batches(
    samples: list[Sample],
    micro_batch_size: int,
    pad_token_id: int,
    pack: tuple[int, int] | None = None,
    token_budget: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Split one global batch into micro-batches of `micro_batch_size` padded sequences.

    `pack=(row_tokens, micro_batch_tokens)` switches on packing: sequences are packed into rows of
    at most `row_tokens`, and rows are stacked while the micro-batch stays within its token budget
    (attention cost grows with the square of the row length, so rows are kept short).
    `token_budget` switches on dynamic batching: a micro-batch takes as many sequences as fit in
    that many padded tokens, so short sequences need fewer forward passes.
    """
    if pack is not None:
        row_tokens, budget = pack
        rows = [[samples[i] for i in group] for group in pack_sequences(samples, row_tokens)]
        per_micro_batch = max(1, budget // row_tokens)
        return [pack_rows(rows[i : i + per_micro_batch]) for i in range(0, len(rows), per_micro_batch)]
    # Sorting by length before chunking keeps padding small; the loss is normalised per global batch,
    # so the order does not change the result.
    groups = micro_batch_groups([len(s.input_ids) for s in samples], micro_batch_size, token_budget)
    return [pad_batch([samples[i] for i in group], pad_token_id) for group in groups]


def micro_batch_groups(widths: list[int], micro_batch_size: int, token_budget: int | None = None,
                       rows_per_item: int = 1) -> list[list[int]]:
    """Item indices grouped into micro-batches, shortest first: `micro_batch_size` items each, or,
    with a `token_budget` (dynamic batching), as many as fit in that many padded tokens, where an
    item is `rows_per_item` rows padded to the widest item of its micro-batch."""
    order = sorted(range(len(widths)), key=lambda i: widths[i])
    if token_budget is None:
        return [order[start : start + micro_batch_size] for start in range(0, len(order), micro_batch_size)]
    groups = fill_token_budget([rows_per_item * widths[i] for i in order], token_budget)
    return [[order[k] for k in group] for group in groups]


def fill_token_budget(ascending_sizes: list[int], token_budget: int) -> list[list[int]]:
    """Consecutive groups of positions in `ascending_sizes` whose padded size (count x the
    largest, which is the last) stays within `token_budget`."""
    groups: list[list[int]] = []
    for k, n in enumerate(ascending_sizes):
        if n > token_budget:
            raise ValueError(f"a sequence (or pair) of {n} padded tokens does not fit a micro-batch of "
                             f"{token_budget} tokens")
        if groups and (len(groups[-1]) + 1) * n <= token_budget:
            groups[-1].append(k)
        else:
            groups.append([k])
    return groups


# Column labels of shared-prefix rows: the prefix every sequence of the row continues, padding,
# and (any other value) the number of the sequence a column belongs to.
SHARED_PREFIX, PADDING = 0, -1


def shared_prefix_attention_mask(segment: torch.Tensor) -> torch.Tensor:
    """The boolean [rows, 1, width, width] mask of rows labelled by `segment` [rows, width]: a token
    sees the shared prefix and the earlier tokens of its own sequence, never another sequence, so
    it has the context it has in a row of its own. Padding sees only itself (a row with nothing to
    attend to would give NaN)."""
    width = segment.shape[1]
    query, key = segment[:, :, None], segment[:, None, :]
    sees = (query != PADDING) & ((key == SHARED_PREFIX) | (key == query))
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    return ((sees & causal) | torch.eye(width, dtype=torch.bool))[:, None]

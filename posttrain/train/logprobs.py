"""Per-token log-probabilities of the tokens that were actually there.

Only the chosen token's log-prob is needed, so log_softmax is never materialised for the whole
vocabulary in float32: each chunk of positions computes `logit[target] - logsumexp(logits)`.
"""

from __future__ import annotations

import functools
import inspect

import torch


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """log p(targets[b, t] | logits[b, t]) for logits [B, T, V] and targets [B, T], in float32."""
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1)
    pieces = []
    for start in range(0, max(flat_logits.shape[0], 1), chunk_size):  # no positions: one empty piece
        chunk = flat_logits[start : start + chunk_size].float()
        picked = chunk.gather(-1, flat_targets[start : start + chunk_size, None]).squeeze(-1)
        pieces.append(picked - torch.logsumexp(chunk, dim=-1))
    return torch.cat(pieces).view(targets.shape)


@torch.no_grad()
def token_entropy(logits: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Entropy of each position's distribution [B, T] (a diagnostic: no gradient)."""
    flat = logits.reshape(-1, logits.shape[-1])
    pieces = []
    for start in range(0, flat.shape[0], chunk_size):
        logp = flat[start : start + chunk_size].float().log_softmax(-1)
        pieces.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(pieces).view(logits.shape[:-1])


def sequence_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and loss mask [B, K] of the K columns of tokens 1..T-1 where some row has a target.

    The LM head and the softmax run only at the positions that predict a target token: prompt
    positions (most of a typical SFT batch) get no logits at all, which saves the largest matmul of
    a big-vocabulary model. Entries without a target are 0; every caller masks them out.
    """
    loss_mask = batch["loss_mask"][:, 1:]
    predictors = loss_mask.any(dim=0).nonzero().squeeze(-1)  # position t predicts token t + 1
    mask = loss_mask[:, predictors]
    rows, kept = mask.nonzero(as_tuple=True)
    columns = predictors[kept]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    if is_right_padding(inputs.get("attention_mask")):
        del inputs["attention_mask"]
    picked = token_logprobs(logits_at(model, inputs, rows, columns), batch["input_ids"][rows, columns + 1])
    return torch.zeros(mask.shape, dtype=picked.dtype, device=picked.device).index_put((rows, kept), picked), mask


def is_right_padding(mask: torch.Tensor | None) -> bool:
    """Whether a 2-D attention mask only marks trailing pads (each row: ones, then zeros).

    Such a mask can be left out of a causal LM's forward pass: a token never attends to later
    positions, so no real token sees the pads after it, and the pads' own outputs are never read
    (position ids are 0, 1, ... either way). Without it transformers takes the plain causal path:
    no [B, 1, T, T] mask is built, SDPA runs its causal kernel (flash attention on GPU, which takes
    no arbitrary mask) with native grouped-query attention, for the same log-probs.
    """
    return mask is not None and mask.dim() == 2 and bool((mask[:, 1:] <= mask[:, :-1]).all())


def logits_at(model, inputs: dict[str, torch.Tensor], rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Logits [N, V] of the positions (rows[i], columns[i]) of a forward pass over `inputs`.

    `logits_to_keep` trims the final hidden states to the distinct columns, and a pre-hook on the
    LM head keeps just the wanted positions of them, so the head runs once per position asked for,
    not once per row and column. Logit post-processing inside the model (soft-capping, scaling)
    is elementwise and still applies.
    """
    distinct = torch.unique(columns)  # sorted
    at_distinct = torch.searchsorted(distinct, columns)

    def pick(hidden: torch.Tensor) -> torch.Tensor:  # [B, K or T, ...] -> [N, ...]
        # Hidden states arrive at the distinct columns (`logits_to_keep`) or at every column; when
        # the two counts are equal, every column is kept and both indexings agree.
        return hidden[rows, at_distinct if hidden.shape[1] == len(distinct) else columns]

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:  # no separate LM head module to hook: pick from the logits instead
        return pick(model(**inputs, use_cache=False, **_only_positions(model, distinct)).logits)
    hook = head.register_forward_pre_hook(lambda module, args: (pick(args[0]), *args[1:]))
    try:
        logits = model(**inputs, use_cache=False, **_only_positions(model, distinct)).logits
    finally:
        hook.remove()
    if logits.shape[:-1] != rows.shape:
        raise RuntimeError(f"{type(model).__name__} reshapes the LM head's output ({tuple(logits.shape)} for "
                           f"{len(rows)} positions); posttrain expects logits = head(hidden states)")
    return logits


def _only_positions(model, positions: torch.Tensor) -> dict[str, torch.Tensor]:
    """transformers' `logits_to_keep` (a tensor of positions), where the model's forward takes it."""
    return {"logits_to_keep": positions} if _takes_logits_to_keep(type(model)) else {}


@functools.cache
def _takes_logits_to_keep(model_class: type) -> bool:  # once per class, not on every forward pass
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def supports_shared_prefix(model) -> bool:
    """Whether `model` takes the custom 4-D attention mask of shared-prefix rows: SDPA or eager
    attention (flash-attention kernels take no arbitrary mask) and no sliding-window layers
    (transformers uses a custom 4-D mask as it is, so a window would be silently dropped)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return all(kind == "full_attention" for kind in layer_types)
    return getattr(config, "sliding_window", None) is None or not getattr(config, "use_sliding_window", True)


def packed_logits(model, batch: dict[str, torch.Tensor], needed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [P, V] of the P distinct positions of packed rows (explicit positions) that predict
    a `needed` token ([S, T] like `source_index`), and `source_index` renumbered to pick each
    sequence's predicting positions from them (entries not needed pick some kept position). The LM
    head skips every other position, such as a shared prompt's. The attention mask is either 2-D
    padding (left out when it is right padding) or the boolean 4-D mask of shared-prefix rows."""
    mask = batch["attention_mask"]
    if mask.dim() == 4 and model.config._attn_implementation == "eager":  # eager adds the mask to the scores
        blocked = torch.finfo(model.dtype).min
        mask = torch.zeros(mask.shape, dtype=model.dtype, device=mask.device).masked_fill(~mask, blocked)
    width = batch["input_ids"].shape[1]
    source = batch["source_index"]
    positions, number = torch.unique(source[needed], return_inverse=True)  # flat row * width + column
    if positions.numel() == 0:  # nothing needed (every reply truncated away): one position keeps the shapes valid
        positions = torch.zeros(1, dtype=torch.long, device=source.device)
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    if not is_right_padding(mask):
        inputs["attention_mask"] = mask
    logits = logits_at(model, inputs, positions // width, positions % width)
    renumbered = torch.zeros_like(source)
    renumbered[needed] = number
    return logits, renumbered


def shared_prefix_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs [S, T-1] and loss mask of the S sequences packed in `batch` by
    `make_shared_prefix_micro_batches`: one forward over the packed rows, then each sequence's
    tokens gathered from the positions that predict them."""
    flat, source = packed_logits(model, batch, batch["target_mask"].bool())
    return picked_logprobs(flat, source, batch["targets"]), batch["target_mask"]


def picked_logprobs(flat_logits: torch.Tensor, source: torch.Tensor, targets: torch.Tensor,
                    chunk_size: int = 1024) -> torch.Tensor:
    """log p(targets | flat_logits[source]) in float32, shaped like `targets`, without gathering a
    [..., V] copy of the logits per target: a shared prompt's last position predicts the first token
    of every reply, so the softmax normaliser is computed once per position and picked by `source`."""
    lse = torch.cat([torch.logsumexp(flat_logits[start : start + chunk_size].float(), dim=-1)
                     for start in range(0, flat_logits.shape[0], chunk_size)])
    return flat_logits[source, targets].float() - lse[source]


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

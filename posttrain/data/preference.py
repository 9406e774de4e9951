"""Preference pairs for DPO: a prompt with a chosen and a rejected reply.

Both replies go through the same chat-template tokenization as SFT (`tokenize_conversation`), so
the two sequences share the prompt's tokens exactly and only the reply's assistant tokens are in
the loss mask. A row is `prompt` (a string or a list of messages) plus `chosen` and `rejected`
(each the assistant's reply text, or a list of messages ending in the assistant's turn).
HelpSteer3-style rows (`context`, `response1`, `response2`, `overall_preference`, as in
`nvidia/HelpSteer3`) are recognised and turned into such pairs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from posttrain.config import DataConfig
from posttrain.data.collate import (
    PADDING,
    SHARED_PREFIX,
    micro_batch_groups,
    pad_batch,
    shared_prefix_attention_mask,
)
from posttrain.data.conversations import (
    Sample,
    check_messages,
    check_one_format,
    check_text,
    row_tools,
    tokenize_conversation,
    tokenize_prompt_completion,
)
from posttrain.data.sources import DataError, RowSource, load_validation_rows

CHOSEN_KEY = "chosen"
REJECTED_KEY = "rejected"

Messages = list[dict[str, str]]
HELPSTEER_KEYS = ("context", "response1", "response2", "overall_preference")

log = logging.getLogger(__name__)


@dataclass
class PreferencePair:
    chosen: Sample
    rejected: Sample


def from_helpsteer(row: dict[str, Any], cfg: DataConfig, where: str) -> dict[str, Any] | None:
    """A HelpSteer3 row as prompt/chosen/rejected, or None for a tie (it prefers neither response).

    `overall_preference` runs from -3 (response1 much better) to 3 (response2 much better).
    """
    score = row["overall_preference"]
    if isinstance(score, bool) or not isinstance(score, int) or not -3 <= score <= 3:
        raise DataError(f"{where}: 'overall_preference' must be an integer from -3 to 3, got {score!r}")
    if score == 0:
        return None
    better, worse = ("response1", "response2") if score < 0 else ("response2", "response1")
    return {cfg.prompt_key: row["context"], CHOSEN_KEY: row[better], REJECTED_KEY: row[worse]}


def row_to_pair(row: dict[str, Any], cfg: DataConfig, where: str) -> tuple[Messages, Messages, Messages]:
    """Validate one row: (prompt messages, chosen reply messages, rejected reply messages)."""
    for key in (cfg.prompt_key, CHOSEN_KEY, REJECTED_KEY):
        if key not in row:
            raise DataError(f"{where}: missing field '{key}'; a preference row needs '{cfg.prompt_key}', "
                            f"'{CHOSEN_KEY}' and '{REJECTED_KEY}' (found {sorted(row)})")
    prompt = row[cfg.prompt_key]
    messages = (check_messages(prompt, where, cfg.prompt_key) if isinstance(prompt, list)
                else [{"role": "user", "content": check_text(prompt, where, cfg.prompt_key)}])
    if messages[-1]["role"] == "assistant":
        raise DataError(f"{where}: field '{cfg.prompt_key}' ends with an assistant message; the assistant's "
                        f"turn belongs in '{CHOSEN_KEY}' and '{REJECTED_KEY}'")
    if cfg.system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": cfg.system_prompt})
    if messages[0]["role"] == "assistant":
        raise DataError(f"{where}: the conversation starts with an assistant message; chat templates need a "
                        "system or user message first (data.system_prompt adds one)")
    replies = []
    for key in (CHOSEN_KEY, REJECTED_KEY):
        value = row[key]
        reply = (check_messages(value, where, key) if isinstance(value, list)
                 else [{"role": "assistant", "content": check_text(value, where, key)}])
        if reply[-1]["role"] != "assistant":
            raise DataError(f"{where}: field '{key}' must end with the assistant's turn, "
                            f"but its last message has role {reply[-1]['role']!r}")
        replies.append(reply)
    if replies[0] == replies[1]:
        raise DataError(f"{where}: '{CHOSEN_KEY}' and '{REJECTED_KEY}' are identical, so the pair prefers nothing")
    return messages, replies[0], replies[1]


class PreferenceDataset:
    """Rows validated up front (so a bad row fails before training), tokenized on access."""

    def __init__(self, source: RowSource, tokenizer, cfg: DataConfig, max_length: int):
        self.source, self.tokenizer, self.max_length = source, tokenizer, max_length
        self.chat = cfg.use_chat_template
        if self.chat and not getattr(tokenizer, "chat_template", None):
            raise DataError("the tokenizer has no chat template: set policy.tokenizer.chat_template, "
                            "or data.use_chat_template=false for plain prompt + reply text")
        self.rows: list[tuple[Messages, Messages, Messages]] = []
        self.source_rows: list[int] = []  # the source row of each pair, for error messages
        self.tools: list[list[dict[str, Any]] | None] = []  # each pair's tools for the chat template
        ties = 0
        for i in range(len(source)):
            row, where = source.rows[i], source.describe(i)
            # A HelpSteer3 row is told by its own fields ('context' is too common a column name to tell it by).
            check_one_format(row, {"pair": (CHOSEN_KEY, REJECTED_KEY),
                                   "HelpSteer3": ("response1", "response2", "overall_preference")}, where,
                             "a row is a pair or a HelpSteer3 row, so remove the fields of the other")
            if all(key in row for key in HELPSTEER_KEYS):
                row = from_helpsteer(row, cfg, where)
                if row is None:
                    ties += 1
                    continue
            self.rows.append(row_to_pair(row, cfg, where))
            self.source_rows.append(i)
            self.tools.append(row_tools(row, cfg.tools_key, where))
        if ties:
            log.warning("%s: left out %d HelpSteer3 rows with overall_preference 0 (a tie prefers neither "
                        "response); %d pairs remain", source.name, ties, len(self.rows))
        if not self.rows:
            raise DataError(f"{source.name}: no preference pairs (every row is a tie)")
        self.num_ties = ties
        if not self.chat:
            for i, (_, chosen, rejected) in enumerate(self.rows):
                if len(chosen) > 1 or len(rejected) > 1:
                    raise DataError(f"{source.describe(self.source_rows[i])}: without a chat template "
                                    "(data.use_chat_template=false) each reply must be a single assistant message")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> PreferencePair:
        prompt, chosen, rejected = self.rows[index]
        try:
            tools = self.tools[index]
            return PreferencePair(self._tokenize(prompt, chosen, tools), self._tokenize(prompt, rejected, tools))
        except DataError as err:
            raise DataError(f"{self.source.describe(self.source_rows[index])}: {err}") from err

    def _tokenize(self, prompt: Messages, reply: Messages, tools: list[dict[str, Any]] | None) -> Sample:
        if self.chat:
            return tokenize_conversation(self.tokenizer, prompt + reply, self.max_length, trainable_from=len(prompt),
                                         tools=tools)
        text = "\n".join(m["content"] for m in prompt)
        return tokenize_prompt_completion(self.tokenizer, text, reply[-1]["content"], self.max_length)


def load_validation_pairs(data: DataConfig, tokenizer, max_length: int, seed: int) -> list[PreferencePair]:
    """Every validation pair, tokenized once (validation reuses them); [] without a validation set."""
    rows = load_validation_rows(data, seed=seed)
    if rows is None:
        return []
    dataset = PreferenceDataset(rows, tokenizer, data, max_length)
    return [dataset[i] for i in range(len(dataset))]


def pair_lengths(pairs: list[PreferencePair]) -> list[int]:
    """The lengths of the sequences a step over `pairs` trains on: each chosen and each rejected reply."""
    return [len(s.input_ids) for p in pairs for s in (p.chosen, p.rejected)]


def pair_step_metrics(pairs: list[PreferencePair], num_micro_batches: int, elapsed: float) -> dict[str, float]:
    """Size and truncation of one training step over `pairs` (DPO and RM log the same)."""
    return {
        "train/num_micro_batches": num_micro_batches,
        "train/step_time_s": elapsed,
        "train/truncated_fraction": sum(p.chosen.truncated or p.rejected.truncated for p in pairs) / len(pairs),
    }


def make_pair_micro_batches(pairs: list[PreferencePair], micro_batch_size: int, pad_token_id: int,
                            token_budget: int | None = None) -> list[dict[str, torch.Tensor]]:
    """`micro_batch_size` pairs per micro-batch (or, with `token_budget`, as many as fit in that
    many padded tokens), padded together: rows [chosen_1..n, rejected_1..n], so one forward pass
    scores both replies (the layout `dpo_objective` expects)."""
    widths = [max(len(p.chosen.input_ids), len(p.rejected.input_ids)) for p in pairs]
    batches = []
    for group in micro_batch_groups(widths, micro_batch_size, token_budget, rows_per_item=2):
        chunk = [pairs[i] for i in group]
        batches.append(pad_batch([p.chosen for p in chunk] + [p.rejected for p in chunk], pad_token_id))
    return batches


def make_shared_prefix_micro_batches(pairs: list[PreferencePair], micro_batch_size: int, pad_token_id: int,
                                     token_budget: int | None = None) -> list[dict[str, torch.Tensor]]:
    """`micro_batch_size` pairs per micro-batch (or, with `token_budget`, as many as fit in that
    many padded tokens), one row per pair with the prompt scored once.

    A row holds the tokens chosen and rejected share (the prompt, and any common start of the two
    replies) once, then the rest of the chosen sequence, then the rest of the rejected one. A custom
    attention mask lets the rejected tokens see the shared part but not the chosen reply, and both
    continue the shared part's positions, so every token has exactly the context it has in its own
    sequence: per-token log-probs equal those of `make_pair_micro_batches`, while the prompt costs
    one forward instead of two. `shared_prefix_logprobs` reads them back as rows
    [chosen_1..n, rejected_1..n], the layout `dpo_objective` expects.
    """
    widths = [_shared_row_length(p) for p in pairs]
    return [_shared_prefix_batch([pairs[i] for i in group], pad_token_id)
            for group in micro_batch_groups(widths, micro_batch_size, token_budget)]


def _shared_length(pair: PreferencePair) -> int:
    n = 0
    for a, b in zip(pair.chosen.input_ids, pair.rejected.input_ids, strict=False):
        if a != b:
            break
        n += 1
    return n


def _shared_row_length(pair: PreferencePair) -> int:
    return len(pair.chosen.input_ids) + len(pair.rejected.input_ids) - _shared_length(pair)


_CHOSEN, _REJECTED = 1, 2  # sequence numbers in a shared-prefix row


def _shared_prefix_batch(pairs: list[PreferencePair], pad_token_id: int) -> dict[str, torch.Tensor]:
    n = len(pairs)
    width = max(_shared_row_length(p) for p in pairs)
    span = max(len(s.input_ids) for p in pairs for s in (p.chosen, p.rejected)) - 1  # predicted tokens per sequence
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    segment = torch.full((n, width), PADDING, dtype=torch.long)
    # For sequence s (chosen rows first) and its token t+1: the target, its loss-mask bit, and the
    # flat index (row * width + column) of the position whose logits predict it.
    targets = torch.zeros((2 * n, span), dtype=torch.long)
    target_mask = torch.zeros((2 * n, span), dtype=torch.float32)
    source_index = torch.zeros((2 * n, span), dtype=torch.long)
    for row, pair in enumerate(pairs):
        chosen, rejected = pair.chosen.input_ids, pair.rejected.input_ids
        shared = _shared_length(pair)
        c, r = len(chosen) - shared, len(rejected) - shared  # tokens after the shared part
        input_ids[row, : shared + c] = torch.tensor(chosen)
        input_ids[row, shared + c : shared + c + r] = torch.tensor(rejected[shared:], dtype=torch.long)
        position_ids[row, : shared + c] = torch.arange(shared + c)
        position_ids[row, shared + c : shared + c + r] = torch.arange(shared, shared + r)
        segment[row, :shared] = SHARED_PREFIX
        segment[row, shared : shared + c] = _CHOSEN
        segment[row, shared + c : shared + c + r] = _REJECTED
        # A token at index j of the chosen sequence sits in column j; of the rejected one, in column
        # j below the shared length and j + c after it.
        j = torch.arange(len(chosen) - 1)
        source_index[row, : len(j)] = row * width + j
        j = torch.arange(len(rejected) - 1)
        source_index[n + row, : len(j)] = row * width + torch.where(j < shared, j, j + c)
        for s, sample in ((row, pair.chosen), (n + row, pair.rejected)):
            targets[s, : len(sample.input_ids) - 1] = torch.tensor(sample.input_ids[1:], dtype=torch.long)
            target_mask[s, : len(sample.input_ids) - 1] = torch.tensor(sample.loss_mask[1:], dtype=torch.float32)
    return {"input_ids": input_ids, "position_ids": position_ids,
            "attention_mask": shared_prefix_attention_mask(segment),
            "targets": targets, "target_mask": target_mask, "source_index": source_index}

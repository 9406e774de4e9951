"""Prompts with reference answers for RL: what the policy sees and what the environment checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from posttrain.config import DataConfig
from posttrain.data.conversations import check_messages, check_text, tokenize_prompt
from posttrain.data.sources import DataError, RowSource


@dataclass
class Prompt:
    messages: list[dict[str, str]]
    token_ids: list[int]
    metadata: dict[str, Any]  # {"answer": ...} plus the row's other scalar fields


class PromptDataset:
    """Rows are validated and tokenized up front: prompts are short and reused every epoch."""

    def __init__(self, source: RowSource, tokenizer, cfg: DataConfig, max_prompt_length: int,
                 tools: list | None = None,
                 limit_source: str = "policy.max_total_sequence_length - policy.generation.max_new_tokens"):
        self.prompts: list[Prompt] = []
        for i in range(len(source)):
            where = source.describe(i)
            row = source.rows[i]
            for key in (cfg.prompt_key, cfg.answer_key):
                if key not in row:
                    raise DataError(f"{where}: missing field '{key}' (found {sorted(row)}); set data.prompt_key "
                                    "/ data.answer_key to the dataset's column names")
            prompt = row[cfg.prompt_key]
            messages = (check_messages(prompt, where, cfg.prompt_key) if isinstance(prompt, list)
                        else [{"role": "user", "content": check_text(prompt, where, cfg.prompt_key)}])
            if cfg.system_prompt and messages[0]["role"] != "system":
                messages.insert(0, {"role": "system", "content": cfg.system_prompt})
            ids = tokenize_prompt(tokenizer, messages, tools)
            if len(ids) > max_prompt_length:
                raise DataError(f"{where}: the prompt has {len(ids)} tokens, more than the {max_prompt_length} "
                                f"allowed ({limit_source})")
            metadata = {k: v for k, v in row.items() if k != cfg.prompt_key and isinstance(v, str | int | float | bool)}
            metadata["answer"] = _answer_text(row[cfg.answer_key], where, cfg.answer_key)
            self.prompts.append(Prompt(messages, ids, metadata))

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> Prompt:
        return self.prompts[index]


def _answer_text(value: Any, where: str, key: str) -> str:
    """The reference answer as text; a null, empty or structured one would be checked as its repr
    (e.g. "None"), so that no response could ever earn the reward."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise DataError(f"{where}: field '{key}' must be a string or a number, got {type(value).__name__}")
    if not str(value).strip():
        raise DataError(f"{where}: field '{key}' is empty")
    return str(value)

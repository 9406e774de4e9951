"""The SFT conversation pipeline: rows into conversations, conversations into token ids with a loss mask.

Only assistant turns are trained on. We find them by rendering the chat template on growing
prefixes of the conversation: the text a prefix adds when it ends with an assistant message is
that message (plus its end-of-turn marker, so the model learns to stop).

Tool-calling conversations keep what chat templates render of them: an assistant message's
`tool_calls`, a tool message's `name` and `tool_call_id`, and the row's tools (`data.tools_key`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from posttrain.config import DataConfig
from posttrain.data.sources import DataError, RowSource

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Sample:
    input_ids: list[int]
    loss_mask: list[int]  # 1 where the token is a training target
    truncated: bool = False


def row_to_messages(row: dict[str, Any], cfg: DataConfig, where: str) -> list[dict[str, str]]:
    """Validate one row and return it as a chat conversation."""
    fmt = cfg.format
    if fmt == "auto":
        check_one_format(row, {"messages": (cfg.messages_key,),
                               "prompt_completion": (cfg.prompt_key, cfg.completion_key)}, where,
                         "set data.format=messages or data.format=prompt_completion to say which one to train on, "
                         "or remove the other fields")
        if cfg.messages_key in row:
            fmt = "messages"
        elif cfg.prompt_key in row and cfg.completion_key in row:
            fmt = "prompt_completion"
        else:
            raise DataError(f"{where}: expected a '{cfg.messages_key}' field or '{cfg.prompt_key}' and "
                            f"'{cfg.completion_key}' fields, found {sorted(row)}")
    if fmt == "messages":
        if cfg.messages_key not in row:
            raise DataError(f"{where}: missing field '{cfg.messages_key}' (found {sorted(row)})")
        messages = check_messages(row[cfg.messages_key], where, cfg.messages_key)
    else:
        for key in (cfg.prompt_key, cfg.completion_key):
            if key not in row:
                raise DataError(f"{where}: missing field '{key}' (found {sorted(row)})")
        prompt, completion = row[cfg.prompt_key], row[cfg.completion_key]
        messages = (check_messages(prompt, where, cfg.prompt_key) if isinstance(prompt, list)
                    else [{"role": "user", "content": check_text(prompt, where, cfg.prompt_key)}])
        if isinstance(completion, list):
            messages += check_messages(completion, where, cfg.completion_key)
        else:
            messages.append({"role": "assistant", "content": check_text(completion, where, cfg.completion_key)})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant message, so nothing to train on")
    if cfg.system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": cfg.system_prompt})
    if messages[0]["role"] == "assistant":
        raise DataError(f"{where}: the conversation starts with an assistant message; chat templates need a "
                        "system or user message first (data.system_prompt adds one)")
    return messages


def check_one_format(row: dict[str, Any], formats: dict[str, tuple[str, ...]], where: str, choose: str) -> None:
    """A row with the fields of two formats (`formats`: name -> its fields) is an error naming
    them: reading it as either one would silently drop what the other fields hold. `choose` says
    how to pick one."""
    present = {name: [key for key in keys if key in row] for name, keys in formats.items()}
    found = [f"{', '.join(repr(k) for k in keys)} ({name})" for name, keys in present.items() if keys]
    if len(found) > 1:
        raise DataError(f"{where}: conflicting format fields {' and '.join(found)}; {choose}")


def check_text(value: Any, where: str, key: str) -> str:
    """A prompt or reply given as text; an empty one has nothing to ask or to train on."""
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string or a list of messages, "
                        f"got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field '{key}' is empty")
    return value


def row_tools(row: dict[str, Any], key: str, where: str) -> list[dict[str, Any]] | None:
    """The row's tool schemas for the chat template's `tools`, None when it has none."""
    tools = row.get(key)
    if tools is None:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            tools = None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(f"{where}: field '{key}' must be a list of tool schemas (JSON objects) or a JSON string "
                        "of one; set data.tools_key to the dataset's column")
    return tools or None


def check_messages(value: Any, where: str, key: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{key}' must be a non-empty list of messages")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise DataError(f"{where}: {key}[{i}] must be an object with 'role' and 'content'")
        if msg["role"] not in ROLES:
            raise DataError(f"{where}: {key}[{i}] has role {msg['role']!r}; expected one of {list(ROLES)}")
        calls = msg.get("tool_calls") if msg["role"] == "assistant" else None
        if calls is not None and (not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls)):
            raise DataError(f"{where}: {key}[{i}].tool_calls must be a list of objects")
        content = "" if msg["content"] is None and calls else msg["content"]  # a call alone may have no text
        if not isinstance(content, str):
            raise DataError(f"{where}: {key}[{i}].content must be a string, got {type(content).__name__}")
        if msg["role"] in ("user", "assistant") and not content.strip() and not calls:
            raise DataError(f"{where}: {key}[{i}] is an empty {msg['role']} message")
        kept: dict[str, Any] = {"role": msg["role"], "content": content}
        if calls:
            kept["tool_calls"] = calls
        if msg["role"] == "tool":
            kept |= {k: msg[k] for k in ("name", "tool_call_id") if isinstance(msg.get(k), str)}
        out.append(kept)
    return out


def tokenize_conversation(tokenizer, messages: list[dict[str, Any]], max_length: int,
                          trainable_from: int = 0, tools: list[dict[str, Any]] | None = None) -> Sample:
    """Token ids of the rendered conversation, with the mask set on assistant turns only.

    `trainable_from` leaves assistant turns before that message index out of the mask (DPO trains
    on the reply, not on assistant turns that are part of its prompt). `tools` are rendered as the
    chat template shows them.
    """
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant" or i < trainable_from:
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True, tools=tools)
        upto = _render(tokenizer, messages[: i + 1], add_generation_prompt=False, tools=tools)
        if not before.startswith(done) or not upto.startswith(before):
            raise DataError(
                "the tokenizer's chat template renders a conversation differently from its prefixes, so "
                "assistant tokens cannot be located; set policy.tokenizer.chat_template to a template "
                "that only appends")
        segments += [(before[len(done):], False), (upto[len(before):], True)]
        done = upto
    ids: list[int] = []
    mask: list[int] = []
    for text, trainable in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        ids += piece
        mask += [int(trainable)] * len(piece)
    return _finish(ids, mask, max_length)


def tokenize_prompt_completion(tokenizer, prompt: str, completion: str, max_length: int) -> Sample:
    """Plain-text format for models without a chat template: prompt + completion + EOS."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        completion_ids = completion_ids + [tokenizer.eos_token_id]
    return _finish(prompt_ids + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids), max_length)


def _finish(ids: list[int], mask: list[int], max_length: int) -> Sample:
    truncated = len(ids) > max_length
    ids, mask = ids[:max_length], mask[:max_length]
    if mask:
        mask[0] = 0  # nothing predicts the first token
    return Sample(ids, mask, truncated)


def _render(tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool,
            tools: list[dict[str, Any]] | None = None) -> str:
    if not messages and not add_generation_prompt:
        return ""
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


class SFTDataset:
    """Rows validated up front (so a bad row fails before training), tokenized on access."""

    def __init__(self, source: RowSource, tokenizer, cfg: DataConfig, max_length: int):
        self.source, self.tokenizer, self.max_length = source, tokenizer, max_length
        self.chat = cfg.use_chat_template
        if self.chat and not getattr(tokenizer, "chat_template", None):
            raise DataError("the tokenizer has no chat template: set policy.tokenizer.chat_template, "
                            "or data.use_chat_template=false for plain prompt + completion text")
        self.conversations = [row_to_messages(source.rows[i], cfg, source.describe(i)) for i in range(len(source))]
        self.tools = [row_tools(source.rows[i], cfg.tools_key, source.describe(i)) for i in range(len(source))]
        if not self.chat:
            for i, messages in enumerate(self.conversations):
                if sum(m["role"] == "assistant" for m in messages) > 1 or messages[-1]["role"] != "assistant":
                    raise DataError(f"{source.describe(i)}: without a chat template (data.use_chat_template="
                                    "false) a row must end in its only assistant message")

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, index: int) -> Sample:
        messages = self.conversations[index]
        try:
            if self.chat:
                return tokenize_conversation(self.tokenizer, messages, self.max_length, tools=self.tools[index])
            prompt = "\n".join(m["content"] for m in messages[:-1])
            return tokenize_prompt_completion(self.tokenizer, prompt, messages[-1]["content"], self.max_length)
        except DataError as err:
            raise DataError(f"{self.source.describe(index)}: {err}") from err


def tokenize_prompt(tokenizer, messages: list[dict[str, str]], tools: list | None = None) -> list[int]:
    """Prompt ids ending with the assistant header, exactly as training renders the same turn;
    `tools` (functions or JSON schemas) are shown to the model as the chat template does."""
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]

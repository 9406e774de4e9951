"""Rows -> conversations -> token ids with a loss mask on assistant turns only."""

import json
import re

import pytest

from posttrain.config import DataConfig
from posttrain.data.conversations import SFTDataset, row_to_messages, tokenize_conversation
from posttrain.data.sources import DataError, load_rows
from posttrain.demo.tiny_model import build_tiny_tokenizer

WHERE = "data.jsonl, line 7"

CONVERSATION = [
    {"role": "system", "content": "You are a helpful math tutor."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "The answer is 5."},
    {"role": "user", "content": "And 7 * 8?"},
    {"role": "assistant", "content": "56"},
]

# Renders messages last-first, so a longer conversation does not extend its prefix.
REVERSED_TEMPLATE = (
    "{% for message in messages|reverse %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def runs(ids, mask):
    """Maximal runs of consecutive masked-in tokens."""
    out, cur = [], []
    for i, m in zip(ids, mask, strict=True):
        if m:
            cur.append(i)
        elif cur:
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out


# --------------------------------------------------------------------------- row_to_messages


def test_messages_format():
    row = {"messages": CONVERSATION, "extra": 1}
    assert row_to_messages(row, DataConfig(), WHERE) == CONVERSATION


def test_messages_format_drops_extra_message_fields():
    row = {"messages": [{"role": "user", "content": "hi", "name": "bob"},
                        {"role": "assistant", "content": "yo", "weight": 0}]}
    assert row_to_messages(row, DataConfig(), WHERE) == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


def test_prompt_completion_strings():
    row = {"prompt": "What is 1 + 1?", "completion": "2"}
    assert row_to_messages(row, DataConfig(), WHERE) == [
        {"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "2"}]


def test_prompt_completion_message_lists():
    row = {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
           "completion": [{"role": "assistant", "content": "A"}]}
    assert row_to_messages(row, DataConfig(), WHERE) == [
        {"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"}]


def test_custom_keys():
    cfg = DataConfig(prompt_key="q", completion_key="a")
    assert row_to_messages({"q": "Q", "a": "A"}, cfg, WHERE) == [
        {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]


def test_system_prompt_inserted_only_when_missing():
    cfg = DataConfig(system_prompt="Be brief.")
    got = row_to_messages({"prompt": "Q", "completion": "A"}, cfg, WHERE)
    assert got == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q"},
                   {"role": "assistant", "content": "A"}]
    # A row with its own system message keeps it.
    assert row_to_messages({"messages": CONVERSATION}, cfg, WHERE) == CONVERSATION


@pytest.mark.parametrize(
    ("row", "cfg", "pattern"),
    [
        ({"text": "x"}, DataConfig(), r"expected a 'messages' field or 'prompt' and 'completion' fields, "
                                      r"found \['text'\]"),
        ({"prompt": "x"}, DataConfig(format="prompt_completion"), r"missing field 'completion'"),
        ({"prompt": "x"}, DataConfig(), r"expected a 'messages' field"),
        ({"messages": []}, DataConfig(), r"field 'messages' must be a non-empty list of messages"),
        ({"messages": [{"role": "user"}]}, DataConfig(), r"messages\[0\] must be an object with 'role' and 'content'"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}, DataConfig(),
         r"messages\[1\] has role 'bot'; expected one of"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 5}]}, DataConfig(),
         r"messages\[1\]\.content must be a string, got int"),
        ({"prompt": 3, "completion": "a"}, DataConfig(), r"field 'prompt' must be a string or a list of messages"),
        ({"prompt": "q", "completion": None}, DataConfig(),
         r"field 'completion' must be a string or a list of messages, got NoneType"),
        ({"messages": [{"role": "user", "content": "q"}]}, DataConfig(), r"no assistant message"),
        ({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "q"}]},
         DataConfig(), r"no assistant message"),
        ({"prompt": "", "completion": "a"}, DataConfig(), r"field 'prompt' is empty"),
        ({"prompt": "q", "completion": " \n"}, DataConfig(), r"field 'completion' is empty"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}, DataConfig(),
         r"messages\[1\] is an empty assistant message"),
        ({"prompt": "q", "completion": "a"}, DataConfig(format="messages"), r"missing field 'messages'"),
    ],
)
def test_row_errors_name_location(row, cfg, pattern):
    with pytest.raises(DataError, match=pattern) as info:
        row_to_messages(row, cfg, WHERE)
    assert str(info.value).startswith(WHERE + ": ")


def test_a_row_with_the_fields_of_two_formats_names_the_file_the_row_and_the_fields(tmp_path, tokenizer):
    path = tmp_path / "data.jsonl"
    rows = [{"messages": CONVERSATION}, {"messages": CONVERSATION, "prompt": "What is 2 + 3?", "completion": "5"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(DataError, match=re.escape(
            f"{path}, line 2: conflicting format fields 'messages' (messages) and 'prompt', 'completion' "
            "(prompt_completion); set data.format=messages or data.format=prompt_completion")):
        SFTDataset(load_rows(str(path), "train"), tokenizer, DataConfig(), 64)
    with pytest.raises(DataError, match=r"'messages' \(messages\) and 'prompt' \(prompt_completion\)"):
        row_to_messages({"messages": CONVERSATION, "prompt": "q"}, DataConfig(), WHERE)
    # data.format says which one the rows are.
    assert row_to_messages(rows[1], DataConfig(format="messages"), WHERE) == CONVERSATION
    assert row_to_messages(rows[1], DataConfig(format="prompt_completion"), WHERE)[-1]["content"] == "5"


# --------------------------------------------------------------------------- tokenize_conversation


def test_eos_token_is_im_end(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.chat_template is not None


def test_only_assistant_turns_are_trained(tokenizer):
    sample = tokenize_conversation(tokenizer, CONVERSATION, max_length=1000)
    assert len(sample.input_ids) == len(sample.loss_mask)
    assert not sample.truncated
    # Each assistant turn is trained with its end-of-turn marker and the newline the template adds.
    assert [tokenizer.decode(r) for r in runs(sample.input_ids, sample.loss_mask)] == [
        "The answer is 5.<|im_end|>\n", "56<|im_end|>\n"]
    trained = [i for i, m in zip(sample.input_ids, sample.loss_mask, strict=True) if m]
    assert tokenizer.decode(trained) == "The answer is 5.<|im_end|>\n56<|im_end|>\n"
    untrained = [i for i, m in zip(sample.input_ids, sample.loss_mask, strict=True) if not m]
    assert tokenizer.decode(untrained) == (
        "<|im_start|>system\nYou are a helpful math tutor.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
        "<|im_start|>user\nAnd 7 * 8?<|im_end|>\n<|im_start|>assistant\n")


def test_ids_equal_tokenized_full_chat(tokenizer):
    """Tokenizing segment by segment must not change the ids the model sees at inference."""
    sample = tokenize_conversation(tokenizer, CONVERSATION, max_length=1000)
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n56<|im_end|>\n")
    assert sample.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_first_token_always_masked(tokenizer, monkeypatch):
    # A template that renders only assistant text makes the very first token trainable.
    monkeypatch.setattr(tokenizer, "chat_template",
                        "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}{% endif %}"
                        "{% endfor %}")
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "hello world"}]
    sample = tokenize_conversation(tokenizer, msgs, 100)
    assert len(sample.input_ids) >= 2
    assert tokenizer.decode(sample.input_ids) == "hello world"
    assert sample.loss_mask == [0] + [1] * (len(sample.input_ids) - 1)


def test_conversation_starting_with_assistant(tokenizer, tmp_path):
    """Either reject the row up front (naming it) or train on it; never a bare error mid-training."""
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps({"messages": [{"role": "assistant", "content": "Hi"}]})])
    try:
        ds = SFTDataset(load_rows(str(path), "train"), tokenizer, DataConfig(), max_length=100)
        sample = ds[0]
    except DataError as err:
        assert str(err).startswith(f"{path}, line 1: ")
        return
    assert sample.loss_mask[0] == 0
    assert [tokenizer.decode(r) for r in runs(sample.input_ids, sample.loss_mask)] == ["Hi<|im_end|>\n"]


def test_truncation(tokenizer):
    full = tokenize_conversation(tokenizer, CONVERSATION, max_length=1000)
    assert len(full.input_ids) > 10
    cut = tokenize_conversation(tokenizer, CONVERSATION, max_length=10)
    assert cut.truncated
    assert cut.input_ids == full.input_ids[:10]
    assert cut.loss_mask == full.loss_mask[:10]
    exact = tokenize_conversation(tokenizer, CONVERSATION, max_length=len(full.input_ids))
    assert not exact.truncated
    assert exact.input_ids == full.input_ids


def test_non_prefix_consistent_template_raises(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", REVERSED_TEMPLATE)
    with pytest.raises(DataError, match="renders a conversation differently from its prefixes"):
        tokenize_conversation(tokenizer, CONVERSATION, 1000)


# --------------------------------------------------------------------------- SFTDataset


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_dataset_tokenizes_rows(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps({"prompt": "What is 1 + 1?", "completion": "2"})])
    ds = SFTDataset(load_rows(str(path), "train"), tokenizer, DataConfig(), max_length=100)
    assert len(ds) == 1
    sample = ds[0]
    assert [tokenizer.decode(r) for r in runs(sample.input_ids, sample.loss_mask)] == ["2<|im_end|>\n"]


def test_dataset_bad_row_fails_at_construction(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        json.dumps({"prompt": "q", "completion": "a"}),
        "",
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]}),
    ])
    with pytest.raises(DataError, match=r"has role 'robot'") as info:
        SFTDataset(load_rows(str(path), "train"), tokenizer, DataConfig(), max_length=100)
    assert str(info.value).startswith(f"{path}, line 3: ")


def test_dataset_requires_chat_template(tokenizer, monkeypatch, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps({"prompt": "q", "completion": "a"})])
    source = load_rows(str(path), "train")
    monkeypatch.setattr(tokenizer, "chat_template", None)
    with pytest.raises(DataError, match="the tokenizer has no chat template"):
        SFTDataset(source, tokenizer, DataConfig(), max_length=100)
    # Plain prompt + completion text needs no template.
    ds = SFTDataset(source, tokenizer, DataConfig(use_chat_template=False), max_length=100)
    sample = ds[0]
    trained = [i for i, m in zip(sample.input_ids, sample.loss_mask, strict=True) if m]
    assert tokenizer.decode(trained) == "a<|im_end|>"


def test_dataset_template_error_names_row(tokenizer, monkeypatch, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps({"prompt": "q", "completion": "a"})])
    ds = SFTDataset(load_rows(str(path), "train"), tokenizer, DataConfig(), max_length=100)
    monkeypatch.setattr(tokenizer, "chat_template", REVERSED_TEMPLATE)
    with pytest.raises(DataError, match="^" + re.escape(f"{path}, line 1: the tokenizer's chat template")):
        ds[0]


# --------------------------------------------------------------------------- tool calling

TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t.function.name }}{% endfor %}<|im_end|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }} {{ c.function.arguments | tojson }}"
    "</tool_call>{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MULTIPLY = {"type": "function", "function": {
    "name": "multiply", "description": "Multiply two whole numbers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}
TOOL_CONVERSATION = [
    {"role": "user", "content": "What is 6 * 7?"},
    {"role": "assistant", "content": "",
     "tool_calls": [{"type": "function", "function": {"name": "multiply", "arguments": {"a": 6, "b": 7}}}]},
    {"role": "tool", "name": "multiply", "content": "42"},
    {"role": "assistant", "content": "It is 42."},
]


def test_tool_calls_and_tool_message_names_are_kept():
    assert row_to_messages({"messages": TOOL_CONVERSATION}, DataConfig(), WHERE) == TOOL_CONVERSATION


def test_sft_on_a_tool_calling_conversation_shows_the_tools_and_trains_the_calls(tmp_path):
    tok = build_tiny_tokenizer()
    tok.chat_template = TOOLS_TEMPLATE
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps({"messages": TOOL_CONVERSATION, "tools": [MULTIPLY]}),
                                              json.dumps({"messages": TOOL_CONVERSATION, "tools": json.dumps([MULTIPLY])}),
                                              json.dumps({"messages": TOOL_CONVERSATION})])
    ds = SFTDataset(load_rows(str(path), "train"), tok, DataConfig(), max_length=400)
    for index in (0, 1):  # the tools as a list, or as a JSON string of one
        sample = ds[index]
        assert tok.decode(sample.input_ids).startswith("<|im_start|>system\nTools: multiply<|im_end|>\n")
        assert [tok.decode(r) for r in runs(sample.input_ids, sample.loss_mask)] == [
            '<tool_call>multiply {"a": 6, "b": 7}</tool_call><|im_end|>\n', "It is 42.<|im_end|>\n"]
    assert not tok.decode(ds[2].input_ids).startswith("<|im_start|>system")  # a row without tools


@pytest.mark.parametrize(("row", "pattern"), [
    ({"messages": TOOL_CONVERSATION, "tools": "not json"}, r"field 'tools' must be a list of tool schemas"),
    ({"messages": TOOL_CONVERSATION, "tools": {"name": "multiply"}}, r"field 'tools' must be a list"),
    ({"messages": [TOOL_CONVERSATION[0], {"role": "assistant", "content": "", "tool_calls": "multiply"}]},
     r"messages\[1\]\.tool_calls must be a list of objects"),
    ({"messages": [TOOL_CONVERSATION[0], {"role": "assistant", "content": ""}]}, r"messages\[1\] is an empty assistant"),
])
def test_tool_row_errors_name_the_row(tmp_path, row, pattern):
    tok = build_tiny_tokenizer()
    tok.chat_template = TOOLS_TEMPLATE
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(row)])
    with pytest.raises(DataError, match=r"d\.jsonl, line 1: .*" + pattern):
        SFTDataset(load_rows(str(path), "train"), tok, DataConfig(), max_length=400)

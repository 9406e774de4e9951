"""Preference rows -> (prompt, chosen, rejected) -> two token sequences masked on the reply only."""

import json

import pytest

from posttrain.config import ArithmeticTaskConfig, DataConfig
from posttrain.data.arithmetic import make_preference_pairs, make_problems
from posttrain.data.conversations import tokenize_conversation
from posttrain.data.preference import PreferenceDataset, make_pair_micro_batches, row_to_pair
from posttrain.data.sources import DataError, load_rows, load_validation_rows
from posttrain.demo.tiny_model import build_tiny_tokenizer

WHERE = "prefs.jsonl, line 3"
CFG = DataConfig()


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def masked_text(tokenizer, sample):
    return tokenizer.decode([t for t, m in zip(sample.input_ids, sample.loss_mask, strict=True) if m])


def test_string_fields():
    prompt, chosen, rejected = row_to_pair({"prompt": "2+2?", "chosen": "4", "rejected": "5"}, CFG, WHERE)
    assert prompt == [{"role": "user", "content": "2+2?"}]
    assert chosen == [{"role": "assistant", "content": "4"}]
    assert rejected == [{"role": "assistant", "content": "5"}]


def test_message_list_fields_and_system_prompt():
    row = {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                      {"role": "user", "content": "2+2?"}],
           "chosen": [{"role": "assistant", "content": "4"}],
           "rejected": [{"role": "assistant", "content": "5"}]}
    prompt, chosen, _ = row_to_pair(row, DataConfig(system_prompt="Be exact."), WHERE)
    assert [m["role"] for m in prompt] == ["system", "user", "assistant", "user"]
    assert chosen == [{"role": "assistant", "content": "4"}]


@pytest.mark.parametrize("row, pattern", [
    ({"prompt": "q", "chosen": "a"}, "missing field 'rejected'"),
    ({"chosen": "a", "rejected": "b"}, "missing field 'prompt'"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "field 'prompt' must be a string"),
    ({"prompt": "q", "chosen": None, "rejected": "b"}, "field 'chosen' must be a string"),
    ({"prompt": "q", "chosen": "a", "rejected": [{"role": "user", "content": "b"}]},
     "field 'rejected' must end with the assistant's turn"),
    ({"prompt": "q", "chosen": [{"role": "assistant"}], "rejected": "b"}, r"chosen\[0\] must be an object"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "chosen": "a", "rejected": "b"}, "'prompt' ends with an assistant message"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "identical"),
    ({"prompt": "q", "chosen": "a", "rejected": ""}, "field 'rejected' is empty"),
    ({"prompt": " ", "chosen": "a", "rejected": "b"}, "field 'prompt' is empty"),
])
def test_malformed_rows_name_the_row(row, pattern):
    with pytest.raises(DataError, match=pattern) as err:
        row_to_pair(row, CFG, WHERE)
    assert str(err.value).startswith(WHERE)


def test_only_the_reply_is_trained(tokenizer, tmp_path):
    row = {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                      {"role": "user", "content": "What is 2 + 2?"}],
           "chosen": "4", "rejected": "5"}
    source = load_rows(str(write_jsonl(tmp_path / "p.jsonl", [row])), "train")
    pair = PreferenceDataset(source, tokenizer, CFG, 256)[0]
    # The prompt's earlier assistant turn ("hello") is context, not a target.
    assert masked_text(tokenizer, pair.chosen).strip() == "4<|im_end|>"
    assert masked_text(tokenizer, pair.rejected).strip() == "5<|im_end|>"
    # Both sequences share the prompt tokens exactly, and equal the SFT tokenization of the full chat.
    n = len(pair.chosen.input_ids) - sum(pair.chosen.loss_mask)
    assert pair.chosen.input_ids[:n] == pair.rejected.input_ids[:n]
    full = tokenize_conversation(tokenizer, row["prompt"] + [{"role": "assistant", "content": "4"}], 256)
    assert full.input_ids == pair.chosen.input_ids


def test_dataset_reports_the_bad_line(tokenizer, tmp_path):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    with pytest.raises(DataError, match=rf"{path}, line 3: missing field 'rejected'"):
        PreferenceDataset(load_rows(str(path), "train"), tokenizer, CFG, 64)


def test_plain_text_mode(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1 plus 1 is", "chosen": " 2", "rejected": " 3"}])
    pair = PreferenceDataset(load_rows(str(path), "train"), tokenizer, DataConfig(use_chat_template=False), 64)[0]
    assert pair.chosen.input_ids[-1] == tokenizer.eos_token_id
    assert sum(pair.chosen.loss_mask) == len(tokenizer(" 2", add_special_tokens=False)["input_ids"]) + 1
    multi = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "q", "chosen": [{"role": "user", "content": "x"},
                                                                          {"role": "assistant", "content": "a"}],
                                                "rejected": "b"}])
    with pytest.raises(DataError, match="m.jsonl, line 1: without a chat template"):
        PreferenceDataset(load_rows(str(multi), "train"), tokenizer, DataConfig(use_chat_template=False), 64)


def test_micro_batches_put_chosen_and_rejected_in_halves(tokenizer):
    cfg = ArithmeticTaskConfig(num_train=5)
    source = load_rows("arithmetic_preference", "train", arithmetic=cfg)
    pairs = [PreferenceDataset(source, tokenizer, CFG, 64)[i] for i in range(5)]
    batches = make_pair_micro_batches(pairs, 2, tokenizer.pad_token_id)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    seen = set()
    for b in batches:
        n = b["input_ids"].shape[0] // 2
        for i in range(n):
            chosen = b["input_ids"][i][b["attention_mask"][i].bool()].tolist()
            rejected = b["input_ids"][n + i][b["attention_mask"][n + i].bool()].tolist()
            match = [p for p in pairs if p.chosen.input_ids == chosen]
            assert match and match[0].rejected.input_ids == rejected
            seen.add(tuple(chosen))
    assert len(seen) == 5


def test_arithmetic_preference_pairs():
    cfg = ArithmeticTaskConfig(num_train=300, num_val=50)
    train = make_preference_pairs(cfg, "train", seed=3)
    problems = make_problems(cfg, "train", seed=3)
    assert [r["prompt"] for r in train] == [r["prompt"] for r in problems]
    for row in train:
        assert row["chosen"] == row["answer"]
        assert 1 <= abs(int(row["rejected"]) - int(row["chosen"])) <= 2
    val = make_preference_pairs(cfg, "validation", seed=3)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in val}  # held-out split kept apart
    assert train == make_preference_pairs(cfg, "train", seed=3)  # deterministic


def test_wrong_operation_pairs_reject_the_other_operations_result():
    cfg = ArithmeticTaskConfig(max_operand=9, operations=["+", "-", "*"], num_train=200, num_val=20,
                               rejected="wrong_operation")
    for row in make_preference_pairs(cfg, "train", seed=1):
        a, op, b = row["prompt"].removeprefix("What is ").removesuffix("?").split()
        a, b = int(a), int(b)
        other = a - b if op == "+" else a + b
        expected = other if str(other) != row["chosen"] else str(int(row["chosen"]) + 1)
        assert row["rejected"] == str(expected) and row["rejected"] != row["chosen"]
    assert make_preference_pairs(cfg, "train", seed=1)[0]["prompt"] == make_problems(cfg, "train", seed=1)[0]["prompt"]


def test_teacher_errors_do_not_leak_into_chosen():
    cfg = ArithmeticTaskConfig(num_train=100, teacher_error_rate=1.0)
    assert all(r["chosen"] == r["answer"] for r in make_preference_pairs(cfg, "train"))


def test_builtin_task_loads_with_validation_split():
    data = DataConfig(dataset_name="arithmetic_preference", arithmetic=ArithmeticTaskConfig(num_train=10, num_val=4))
    train = load_rows(data.dataset_name, "train", arithmetic=data.arithmetic)
    val = load_validation_rows(data, seed=0)
    assert len(train) == 10 and len(val) == 4
    assert set(train.rows[0]) == {"prompt", "chosen", "rejected", "answer"}
    assert val.describe(1) == "arithmetic_preference[validation], row 1"


def _helpsteer(score, context=None):
    return {"domain": "general", "language": "english",
            "context": context or [{"role": "user", "content": "Name a prime."},
                                   {"role": "assistant", "content": "Which size?"},
                                   {"role": "user", "content": "Small."}],
            "response1": "2", "response2": "9", "overall_preference": score,
            "individual_preference": [{"score": score, "reasoning": "-"}]}


def test_helpsteer3_rows_become_pairs_and_ties_are_left_out_with_a_warning(tmp_path, tokenizer, caplog):
    path = write_jsonl(tmp_path / "hs3.jsonl", [_helpsteer(-2), _helpsteer(0), _helpsteer(3)])
    data = PreferenceDataset(load_rows(str(path), "train"), tokenizer, DataConfig(dataset_name=str(path)), 128)
    assert len(data) == 2 and data.num_ties == 1
    assert "left out 1 HelpSteer3 rows with overall_preference 0" in caplog.text
    prompt, chosen, rejected = data.rows[0]
    assert [m["content"] for m in prompt] == ["Name a prime.", "Which size?", "Small."]  # the whole context
    assert (chosen[-1]["content"], rejected[-1]["content"]) == ("2", "9")  # negative: response1 is better
    _, chosen, rejected = data.rows[1]
    assert (chosen[-1]["content"], rejected[-1]["content"]) == ("9", "2")  # positive: response2 is better
    assert masked_text(tokenizer, data[1].chosen).startswith("9")


def test_helpsteer3_bad_preference_names_the_line(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "hs3.jsonl", [_helpsteer(1), _helpsteer("high")])
    with pytest.raises(DataError, match=r"hs3.jsonl, line 2: 'overall_preference' must be an integer from -3 to 3"):
        PreferenceDataset(load_rows(str(path), "train"), tokenizer, DataConfig(dataset_name=str(path)), 128)


def test_a_row_that_is_both_a_pair_and_a_helpsteer3_row_is_an_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "hs3.jsonl", [_helpsteer(1), {**_helpsteer(2), "prompt": "q", "chosen": "2"}])
    with pytest.raises(DataError, match=r"hs3.jsonl, line 2: conflicting format fields 'chosen' \(pair\) and "
                                        r"'response1', 'response2', 'overall_preference' \(HelpSteer3\)"):
        PreferenceDataset(load_rows(str(path), "train"), tokenizer, DataConfig(dataset_name=str(path)), 128)


def test_a_rows_tools_reach_both_replies(tmp_path):
    tok = build_tiny_tokenizer()
    tok.chat_template = (  # shows the tools' names in a system turn
        "{% if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t.function.name }}{% endfor %}<|im_end|>\n"
        "{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tools = [{"type": "function", "function": {"name": "multiply", "parameters": {"type": "object"}}}]
    row = {"prompt": "What is 6 * 7?", "chosen": "42", "rejected": "41", "tools": tools}
    pair = PreferenceDataset(load_rows(str(write_jsonl(tmp_path / "p.jsonl", [row])), "train"), tok, CFG, 256)[0]
    for sample in (pair.chosen, pair.rejected):
        assert tok.decode(sample.input_ids).startswith("<|im_start|>system\nTools: multiply<|im_end|>\n")
    assert masked_text(tok, pair.chosen).strip() == "42<|im_end|>"
    bad = {**row, "tools": "multiply"}
    with pytest.raises(DataError, match=r"p\.jsonl, line 1: field 'tools' must be a list of tool schemas"):
        PreferenceDataset(load_rows(str(write_jsonl(tmp_path / "p.jsonl", [bad])), "train"), tok, CFG, 256)

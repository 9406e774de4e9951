"""Row sources: file readers report the file and physical line; the built-in task is a clean split."""

import json
import operator
import re

import pytest

from posttrain.config import ArithmeticTaskConfig
from posttrain.data.sources import DataError, load_rows

SMALL = ArithmeticTaskConfig(max_operand=20, operations=["+", "-", "*"], num_train=300, num_val=40)


def test_jsonl_rows_and_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n   \n{"a": 2}\n')
    src = load_rows(str(path), "train")
    assert list(src.rows) == [{"a": 1}, {"a": 2}]
    assert len(src) == 2
    assert src.describe(1) == f"{path}, line 4"  # blank lines still count as physical lines


def test_jsonl_bad_line_reports_physical_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n{"a": \n{"a": 3}\n')
    with pytest.raises(DataError, match="invalid JSON") as info:
        load_rows(str(path), "train")
    assert f"{path}, line 4:" in str(info.value)


def test_jsonl_non_object_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match="expected a JSON object, got list") as info:
        load_rows(str(path), "train")
    assert f"{path}, line 2:" in str(info.value)


def test_jsonl_empty_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match="no rows") as info:
        load_rows(str(path), "train")
    assert str(path) in str(info.value)


def test_json_array(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"a": 1}, {"a": 2}]))
    src = load_rows(str(path), "train")
    assert list(src.rows) == [{"a": 1}, {"a": 2}]
    assert src.describe(1) == f"{path}, row 1"
    path.write_text(json.dumps([{"a": 1}, 3]))
    with pytest.raises(DataError, match=r"row 1: expected a JSON object, got int"):
        load_rows(str(path), "train")


def test_parquet_round_trip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": "c2"}]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    src = load_rows(str(path), "train")
    assert list(src.rows) == rows
    assert src.describe(0) == f"{path}, row 0"


def test_missing_file(tmp_path):
    path = tmp_path / "missing.jsonl"
    with pytest.raises(DataError, match="data file not found") as info:
        load_rows(str(path), "train")
    assert str(path) in str(info.value)


def test_unsupported_suffix_for_existing_file(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match=r"unsupported data file .*d\.csv: use \.jsonl, \.json or \.parquet"):
        load_rows(str(path), "train")


_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
_PROMPT = re.compile(r"What is (\d+) ([-+*]) (\d+)\?")


def test_arithmetic_answers_are_correct():
    src = load_rows("arithmetic", "train", arithmetic=SMALL)
    assert len(src) == SMALL.num_train
    assert src.name == "arithmetic[train]"
    for row in src.rows:
        a, op, b = _PROMPT.fullmatch(row["prompt"]).groups()
        assert 0 <= int(a) <= SMALL.max_operand and 0 <= int(b) <= SMALL.max_operand
        expected = str(_OPS[op](int(a), int(b)))
        assert row["answer"] == expected
        assert row["completion"] == expected


def test_arithmetic_splits_are_disjoint():
    train = {r["prompt"] for r in load_rows("arithmetic", "train", arithmetic=SMALL).rows}
    val = [r["prompt"] for r in load_rows("arithmetic", "validation", arithmetic=SMALL).rows]
    assert len(val) == SMALL.num_val
    assert len(set(val)) == SMALL.num_val  # fewer asked than available: no repeats
    assert train.isdisjoint(val)


def test_arithmetic_disjoint_even_when_oversampled():
    """Asking for more problems than a split holds repeats problems but never leaks across splits."""
    cfg = ArithmeticTaskConfig(max_operand=9, operations=["+"], num_train=500, num_val=50)
    train = {r["prompt"] for r in load_rows("arithmetic", "train", arithmetic=cfg).rows}
    val = {r["prompt"] for r in load_rows("arithmetic", "validation", arithmetic=cfg).rows}
    assert len(train) <= 100 and val
    assert train.isdisjoint(val)


def test_arithmetic_is_deterministic_given_seed():
    a = load_rows("arithmetic", "train", arithmetic=SMALL, seed=3).rows
    b = load_rows("arithmetic", "train", arithmetic=SMALL, seed=3).rows
    c = load_rows("arithmetic", "train", arithmetic=SMALL, seed=4).rows
    assert a == b
    assert a != c


def test_arithmetic_rejects_unknown_operation_and_split():
    with pytest.raises(ValueError, match=r"unknown operation '/'"):
        load_rows("arithmetic", "train", arithmetic=ArithmeticTaskConfig(operations=["/"]))
    with pytest.raises(ValueError, match=r"not 'test'"):
        load_rows("arithmetic", "test", arithmetic=SMALL)


def test_arithmetic_empty_split_is_a_clear_error():
    cfg = ArithmeticTaskConfig(max_operand=2, operations=["+"], num_train=5, num_val=5)
    with pytest.raises(ValueError, match="validation"):
        load_rows("arithmetic", "validation", arithmetic=cfg)


def test_sloppy_teacher_slips_only_the_training_completions():
    cfg = ArithmeticTaskConfig(max_operand=20, num_train=2000, num_val=40, teacher_error_rate=0.8)
    clean = load_rows("arithmetic", "train", arithmetic=ArithmeticTaskConfig(max_operand=20, num_train=2000)).rows
    train = load_rows("arithmetic", "train", arithmetic=cfg).rows
    assert [r["prompt"] for r in train] == [r["prompt"] for r in clean]  # the same problems
    for row in train:
        a, op, b = _PROMPT.fullmatch(row["prompt"]).groups()
        assert row["answer"] == str(_OPS[op](int(a), int(b)))  # what a verifier checks stays exact
        assert int(row["completion"]) - int(row["answer"]) in (0, 1)
    slipped = sum(r["completion"] != r["answer"] for r in train) / len(train)
    assert 0.75 < slipped < 0.85
    val = load_rows("arithmetic", "validation", arithmetic=cfg).rows
    assert all(r["completion"] == r["answer"] for r in val)


def test_teacher_error_rate_outside_unit_interval_is_a_config_error():
    from posttrain.config import ConfigError, SFTRunConfig, load_config

    with pytest.raises(ConfigError, match=r"data.arithmetic.teacher_error_rate must be in \[0, 1\], got 1.5"):
        load_config(SFTRunConfig, None, ["policy.model_name=x", "data.arithmetic.teacher_error_rate=1.5"])


def test_jsonl_bytes_that_are_not_utf8_name_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"a": "ok"}\n\n{"a": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"line 3: not valid UTF-8 \(byte 0xe9 at column 11\)") as info:
        load_rows(str(path), "train")
    assert str(path) in str(info.value)


def test_json_array_bytes_that_are_not_utf8_name_the_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b'[{"a": "caf\xe9"}]')
    with pytest.raises(DataError, match="not valid UTF-8") as info:
        load_rows(str(path), "train")
    assert str(path) in str(info.value)


@pytest.mark.parametrize("name", ["arithmetic", "arithmetic_preference"])
def test_builtin_task_unknown_split_is_a_data_error(name):
    with pytest.raises(DataError, match=rf"{name}\[test\]: arithmetic task has splits 'train' and 'validation'"):
        load_rows(name, "test", arithmetic=SMALL)

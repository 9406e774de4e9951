"""The JSON-lines reader and writer that data files, metrics.jsonl and checkpoints share."""

import json

import pytest

from posttrain.data import DataError
from posttrain.data.jsonl import json_line, read_jsonl, write_jsonl


def test_records_keep_their_physical_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n')
    lines = read_jsonl(path)
    assert lines.records == [{"a": 1}, {"a": 2}]
    assert lines.line_numbers == [1, 3]


def test_a_line_that_is_not_json_is_an_error_unless_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo')  # a writer cut short
    with pytest.raises(DataError, match=r"metrics\.jsonl, line 2: invalid JSON"):
        read_jsonl(path)
    lines = read_jsonl(path, skip_invalid=True)
    assert (lines.records, lines.num_skipped) == ([{"step": 1}], 1)


def test_written_lines_are_strict_json_and_read_back(tmp_path):
    line = json_line({"step": 1, "loss": float("nan"), "grad_norm": float("-inf"), "lr": 0.5})
    assert line.endswith("\n") and line.count("\n") == 1
    json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))

    path = tmp_path / "metrics.jsonl"
    path.write_text("old\n")
    write_jsonl(path, [{"step": 1, "loss": float("inf")}, {"step": 2, "loss": 0.25}])
    assert read_jsonl(path).records == [{"step": 1, "loss": None}, {"step": 2, "loss": 0.25}]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no partial file left behind

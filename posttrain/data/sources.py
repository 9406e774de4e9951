"""Reading rows from the built-in task, JSONL/JSON/Parquet files or Hugging Face datasets.

Whatever the source, the result is a sequence of dict rows plus a `describe(i)` that names
where row i came from (file and line, or dataset split and index) for error messages.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.config import ArithmeticTaskConfig, DataConfig
from posttrain.data import DataError
from posttrain.data.jsonl import read_jsonl


@dataclass
class RowSource:
    rows: Sequence[dict[str, Any]]
    name: str
    line_numbers: list[int] | None = None  # JSONL: physical line of each row (blank lines skipped)

    def __len__(self) -> int:
        return len(self.rows)

    def describe(self, index: int) -> str:
        if self.line_numbers is not None:
            return f"{self.name}, line {self.line_numbers[index]}"
        return f"{self.name}, row {index}"


BUILTIN_TASKS = ("arithmetic", "arithmetic_preference")
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


def load_rows(
    name: str,
    split: str,
    *,
    subset: str | None = None,
    arithmetic: ArithmeticTaskConfig | None = None,
    seed: int = 0,
) -> RowSource:
    """Load a dataset by name: built-in task, local file, or Hugging Face dataset (split)."""
    if name in BUILTIN_TASKS:
        from posttrain.data.arithmetic import make_preference_pairs, make_problems

        make = make_problems if name == "arithmetic" else make_preference_pairs
        try:
            rows = make(arithmetic or ArithmeticTaskConfig(), split, seed)
        except ValueError as err:  # an unknown split or operation: a data error, not a crash
            raise DataError(f"{name}[{split}]: {err}") from err
        return RowSource(rows, f"{name}[{split}]")
    path = Path(name)
    if is_data_file(name):
        if not path.is_file():
            raise DataError(f"data file not found: {path}")
        if path.suffix == ".parquet":
            return _read_parquet(path)
        return _read_json_lines(path) if path.suffix == ".jsonl" else _read_json_array(path)
    if path.is_file():
        raise DataError(f"unsupported data file {path}: use .jsonl, .json or .parquet")
    return _read_hf(name, split, subset)  # a hub name, or a local folder `datasets` understands


def load_validation_rows(data: DataConfig, seed: int) -> RowSource | None:
    """`data.val_dataset_name` if set, else the `data.val_split` of the training dataset (a single
    local file has no splits, so it has no validation set unless one is named)."""
    if data.val_dataset_name:
        name = data.val_dataset_name
    elif data.val_split and not is_data_file(data.dataset_name):
        name = data.dataset_name
    else:
        return None
    return load_rows(name, data.val_split or "validation", subset=data.dataset_config,
                     arithmetic=data.arithmetic, seed=seed)


def is_data_file(name: str) -> bool:
    """A single local file (which has no splits), as opposed to a built-in task or HF dataset."""
    return Path(name).suffix in _FILE_SUFFIXES


def _read_json_lines(path: Path) -> RowSource:
    lines = read_jsonl(path)
    if not lines.records:
        raise DataError(f"{path}: no rows")
    return RowSource(lines.records, str(path), lines.line_numbers)


def _read_json_array(path: Path) -> RowSource:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 ({err.reason} at byte {err.start})") from err
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON ({err.msg} at line {err.lineno})") from err
    if not isinstance(data, list) or not data:
        raise DataError(f"{path}: expected a non-empty JSON array of objects")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path}, row {i}: expected a JSON object, got {type(row).__name__}")
    return RowSource(data, str(path))


def _read_parquet(path: Path) -> RowSource:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read Parquet file ({err})") from err
    if table.num_rows == 0:
        raise DataError(f"{path}: no rows")
    return RowSource(table.to_pylist(), str(path))


def _read_hf(name: str, split: str, subset: str | None) -> RowSource:
    import datasets

    try:
        ds = datasets.load_dataset(name, subset, split=split)
    except ValueError as err:  # unknown split names the valid ones in its message
        raise DataError(f"Hugging Face dataset {name!r} (subset {subset!r}), split {split!r}: {err}") from err
    except Exception as err:
        raise DataError(f"cannot load Hugging Face dataset {name!r} (subset {subset!r}, split {split!r}): "
                        f"{type(err).__name__}: {err}") from err
    return RowSource(ds, f"{name}[{split}]")

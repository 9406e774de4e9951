"""JSON lines, one record per line: read with errors that name the file and line, written as strict JSON.

Data files (`.jsonl` datasets), `metrics.jsonl` and the checkpoint state share these, so that
what one part of a run writes, the others (and jq, pandas or JavaScript) read back.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.data import DataError


@dataclass
class JsonLines:
    records: list[dict[str, Any]] = field(default_factory=list)
    line_numbers: list[int] = field(default_factory=list)  # physical line of each record (blank lines skipped)
    num_skipped: int = 0  # lines that are not JSON, left out with `skip_invalid`


def read_jsonl(path: Path, *, skip_invalid: bool = False) -> JsonLines:
    """The JSON objects of a file, one per non-blank line; a bad line raises a DataError naming its number.

    `skip_invalid` leaves out lines that are not JSON instead, for a file a run writes itself:
    a writer interrupted mid-record (a crashed run's `metrics.jsonl`) leaves a line cut short.
    Bytes that are not UTF-8 are escaped on reading, so that the error names their line rather
    than failing somewhere in the file's read buffer.
    """
    out = JsonLines()
    with path.open(encoding="utf-8-sig", errors="surrogateescape") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                line.encode("utf-8")
            except UnicodeEncodeError as err:
                raise DataError(f"{path}, line {lineno}: not valid UTF-8 (byte "
                                f"0x{ord(line[err.start]) - 0xDC00:02x} at column {err.start + 1})") from err
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                if skip_invalid:
                    out.num_skipped += 1
                    continue
                raise DataError(f"{path}, line {lineno}: invalid JSON ({err.msg} at column {err.colno})") from err
            if not isinstance(record, dict):
                raise DataError(f"{path}, line {lineno}: expected a JSON object, got {type(record).__name__}")
            out.records.append(record)
            out.line_numbers.append(lineno)
    return out


def json_line(record: Mapping[str, Any]) -> str:
    """One record as a line of strict JSON (see `strict_json_numbers`), newline included."""
    return json.dumps(strict_json_numbers(record)) + "\n"


def write_jsonl(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Replace `path` with `records`, atomically: a crash while writing keeps the old file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(json_line(record) for record in records), encoding="utf-8")
    partial.replace(path)


def strict_json_numbers(values: Mapping[str, Any]) -> dict[str, Any]:
    """NaN and infinities as null: Python would write them as bare NaN/Infinity, which is not
    JSON, and jq, JavaScript and most other readers reject the whole file."""
    return {name: None if isinstance(v, float) and not math.isfinite(v) else v for name, v in values.items()}

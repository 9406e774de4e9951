"""Math benchmarks by their Hugging Face names, plus any dataset with a prompt and an answer column.

A benchmark fixes its subset, split and columns, and maps each row to {"problem", "answer"}
(GSM8K's answer field is a whole solution ending in "#### 72"); explicit `data.*` keys win.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from posttrain.config import EvalDataConfig
from posttrain.data.sources import DataError, RowSource, load_rows


def gsm8k_answer(solution: str) -> str:
    """The final answer after '####' (thousands separators dropped: "1,200" -> "1200")."""
    _, marker, after = str(solution).rpartition("####")
    if not marker or not after.strip():
        raise ValueError(f"GSM8K answer has no '#### <answer>' line: {solution!r}")
    return after.strip().replace(",", "")


@dataclass(frozen=True)
class Benchmark:
    name: str  # Hugging Face dataset name
    subset: str | None
    split: str
    prompt_key: str
    answer_key: str
    answer_fn: Callable[[Any], str] = str


BENCHMARKS = {
    "math500": Benchmark("HuggingFaceH4/MATH-500", None, "test", "problem", "answer"),
    "aime2024": Benchmark("HuggingFaceH4/aime_2024", None, "train", "problem", "answer"),
    "gsm8k": Benchmark("openai/gsm8k", "main", "test", "question", "answer", gsm8k_answer),
}
_BY_NAME = {b.name.lower(): b for b in BENCHMARKS.values()} | BENCHMARKS


def find_benchmark(name: str) -> Benchmark | None:
    """The benchmark called `name` (HF name, any case, or short alias), or None for other datasets."""
    return _BY_NAME.get(name.lower())


def map_row(row: dict[str, Any], benchmark: Benchmark, prompt_key: str, answer_key: str, where: str) -> dict[str, Any]:
    """A benchmark row as {"problem", "answer"} plus its other scalar fields (kept in the report)."""
    for key in (prompt_key, answer_key):
        if key not in row:
            raise DataError(f"{where}: missing field '{key}' (found {sorted(row)}); set data.prompt_key / "
                            "data.answer_key to the dataset's column names")
        if row[key] is None:  # a column some rows lack: the gold answer must not become the text "None"
            raise DataError(f"{where}: field '{key}' is null")
    try:
        answer = benchmark.answer_fn(row[answer_key])
    except ValueError as err:
        raise DataError(f"{where}: {err}") from err
    extra = {k: v for k, v in row.items() if k not in (prompt_key, answer_key) and isinstance(v, str | int | float | bool)}
    return {**extra, "problem": row[prompt_key], "answer": answer}


def load_eval_rows(cfg: EvalDataConfig) -> tuple[RowSource, str, str]:
    """(rows, prompt key, answer key), truncated to `data.max_samples`."""
    benchmark = find_benchmark(cfg.dataset_name)
    if benchmark is None:
        source = load_rows(cfg.dataset_name, cfg.split or "test", subset=cfg.dataset_config)
        prompt_key, answer_key = cfg.prompt_key or "prompt", cfg.answer_key or "answer"
    else:
        raw = load_rows(benchmark.name, cfg.split or benchmark.split, subset=cfg.dataset_config or benchmark.subset)
        count = len(raw) if cfg.max_samples is None else min(cfg.max_samples, len(raw))
        src_prompt, src_answer = cfg.prompt_key or benchmark.prompt_key, cfg.answer_key or benchmark.answer_key
        rows = [map_row(dict(raw.rows[i]), benchmark, src_prompt, src_answer, raw.describe(i)) for i in range(count)]
        source, prompt_key, answer_key = RowSource(rows, raw.name, raw.line_numbers), "problem", "answer"
    if cfg.max_samples is not None and len(source) > cfg.max_samples:
        lines = source.line_numbers[: cfg.max_samples] if source.line_numbers else None
        source = RowSource(source.rows[: cfg.max_samples] if isinstance(source.rows, list)
                           else [source.rows[i] for i in range(cfg.max_samples)], source.name, lines)
    return source, prompt_key, answer_key

"""Turn `metrics.jsonl` into PNG charts, for runs logged without TensorBoard or W&B."""

from __future__ import annotations

import math
import re
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from posttrain.data.jsonl import read_jsonl

_UNSAFE_FILENAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]")


def plot_metrics(log_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write one PNG per metric plus `all_metrics.png` (a grid of all of them); return their paths.

    Figures are drawn with the Agg canvas directly rather than through pyplot, so this works
    headless and leaves the caller's matplotlib backend and open figures alone.
    """
    series = _read_series(Path(log_dir) / "metrics.jsonl")
    out = Path(out_dir) if out_dir is not None else Path(log_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    if not series:
        return []

    written: list[Path] = []
    used_stems = {"all_metrics"}
    for name, points in series.items():
        fig = Figure(figsize=(6, 4), layout="constrained")
        _draw(fig.add_subplot(), name, points)
        path = out / f"{_unique_stem(name, used_stems)}.png"
        fig.savefig(path, dpi=100)
        written.append(path)

    ncols = math.ceil(math.sqrt(len(series)))
    nrows = math.ceil(len(series) / ncols)
    grid = Figure(figsize=(4.5 * ncols, 3.2 * nrows), layout="constrained")
    axes = grid.subplots(nrows, ncols, squeeze=False).flat
    for (name, points), ax in zip(series.items(), axes, strict=False):
        _draw(ax, name, points)
    for ax in axes:  # cells left over in the last row
        ax.set_visible(False)
    path = out / "all_metrics.png"
    grid.savefig(path, dpi=100)
    written.append(path)
    return written


def _read_series(path: Path) -> dict[str, dict[int, float]]:
    """Collect `{metric: {step: value}}`; the last value logged at a step wins.

    A resumed run re-logs the steps after its last checkpoint, so later lines replace earlier ones.
    """
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    series: dict[str, dict[int, float]] = {}
    lines = read_jsonl(path)
    for lineno, record in zip(lines.line_numbers, lines.records, strict=True):
        if not isinstance(record.get("step"), int):
            raise ValueError(f"{path}, line {lineno}: expected an object with an integer 'step'")
        step = record.pop("step")
        for name, value in record.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                series.setdefault(name, {})[step] = float(value)
    return series


def _draw(ax: Axes, name: str, points: dict[int, float]) -> None:
    steps = sorted(points)
    # Markers keep sparse metrics (one validation point) visible; dense curves read better without.
    ax.plot(steps, [points[s] for s in steps], marker="o" if len(steps) <= 50 else None, markersize=3)
    ax.set_title(name)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)


def _unique_stem(name: str, used: set[str]) -> str:
    """`train/loss` -> `train_loss`, with a numeric suffix if two names map to the same file."""
    base = _UNSAFE_FILENAME_CHARS.sub("_", name) or "metric"
    stem, n = base, 1
    while stem in used:
        n += 1
        stem = f"{base}_{n}"
    used.add(stem)
    return stem

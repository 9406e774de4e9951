import json
from pathlib import Path

import pytest

from posttrain.logging import plot_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write(log_dir: Path, records: list[dict]) -> None:
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_writes_one_valid_png_per_metric_and_a_grid(tmp_path):
    records = [{"step": s, "train/loss": 2.0 / s, "train/lr": 1e-5 * s, "note": "text"} for s in range(1, 11)]
    records[4]["val/loss"] = 0.9
    records[9]["val/loss"] = 0.7
    _write(tmp_path, records)

    paths = plot_metrics(tmp_path)

    assert [p.name for p in paths] == ["train_loss.png", "train_lr.png", "val_loss.png", "all_metrics.png"]
    for path in paths:
        assert path.parent == tmp_path / "plots"
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_out_dir_and_resumed_steps(tmp_path):
    # A resumed run re-logs step 2; the later value must win rather than drawing a loop.
    _write(tmp_path / "run", [{"step": 1, "m": 1.0}, {"step": 2, "m": 5.0}, {"step": 2, "m": 2.0}])
    out = tmp_path / "elsewhere"
    paths = plot_metrics(tmp_path / "run", out)
    assert [p.name for p in paths] == ["m.png", "all_metrics.png"]
    assert all(p.parent == out for p in paths)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_metrics(tmp_path / "nope")


def test_malformed_line_names_the_line_number(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": \n')
    with pytest.raises(ValueError, match="line 2"):
        plot_metrics(tmp_path)

import io
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from posttrain.config import LoggerConfig
from posttrain.logging import MetricsLogger


def _cfg(tmp_path: Path, **overrides) -> LoggerConfig:
    cfg = LoggerConfig(log_dir=str(tmp_path / "logs"), tensorboard_enabled=False)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def _quiet() -> Console:
    return Console(file=io.StringIO())


def _read_jsonl(cfg: LoggerConfig) -> list[dict]:
    return [json.loads(line) for line in (Path(cfg.log_dir) / "metrics.jsonl").read_text().splitlines()]


def test_jsonl_converts_scalars_and_appends_across_instances(tmp_path):
    cfg = _cfg(tmp_path)
    with MetricsLogger(cfg, console=_quiet()) as logger:
        logger.log({"train/loss": torch.tensor(1.5), "train/lr": np.float32(0.25)}, step=1)
        logger.log({"train/loss": 1.25, "train/tokens": 7}, step=2)
    with MetricsLogger(cfg, console=_quiet()) as logger:
        logger.log({"val/loss": 0.5}, step=3)

    assert _read_jsonl(cfg) == [
        {"step": 1, "train/loss": 1.5, "train/lr": 0.25},
        {"step": 2, "train/loss": 1.25, "train/tokens": 7.0},
        {"step": 3, "val/loss": 0.5},
    ]


def test_a_resumed_run_replaces_the_records_of_the_steps_it_repeats(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(tmp_path, tensorboard_enabled=True)
    with MetricsLogger(cfg, console=_quiet()) as logger:  # preempted after step 5; its checkpoint is step 3
        for step in range(0, 6):
            logger.log({"train/loss": 10.0 + step}, step=step)
    with (Path(cfg.log_dir) / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "train/lo')  # the interruption cut the last line short
    console = Console(file=io.StringIO(), width=300)
    with MetricsLogger(cfg, console=console, resumed_at=3) as logger:
        for step in range(4, 8):
            logger.log({"train/loss": 20.0 + step}, step=step)

    assert _read_jsonl(cfg) == [{"step": s, "train/loss": (10.0 if s <= 3 else 20.0) + s} for s in range(8)]
    assert "dropped 2 records of steps after 3, which this resumed run repeats, and 1 unreadable line" in \
        console.file.getvalue()
    events = EventAccumulator(str(Path(cfg.log_dir) / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (s, (10.0 if s <= 3 else 20.0) + s) for s in range(8)]


def test_each_line_is_on_disk_before_close(tmp_path):
    cfg = _cfg(tmp_path)
    logger = MetricsLogger(cfg, console=_quiet())
    logger.log({"train/loss": 2.0}, step=1)
    assert _read_jsonl(cfg) == [{"step": 1, "train/loss": 2.0}]
    logger.close()
    logger.close()


def test_rejects_non_scalar_and_reserved_names(tmp_path):
    with MetricsLogger(_cfg(tmp_path), console=_quiet()) as logger:
        with pytest.raises(TypeError, match="train/loss"):
            logger.log({"train/loss": torch.ones(3)}, step=1)
        with pytest.raises(ValueError, match="reserved"):
            logger.log({"step": 1.0}, step=1)


def test_tensorboard_scalars_written_only_when_enabled(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    off = _cfg(tmp_path / "off")
    with MetricsLogger(off, console=_quiet()) as logger:
        logger.log({"train/loss": 1.0}, step=1)
    assert not (Path(off.log_dir) / "tensorboard").exists()

    on = _cfg(tmp_path / "on", tensorboard_enabled=True)
    with MetricsLogger(on, console=_quiet()) as logger:
        logger.log({"train/loss": 1.0}, step=1)
        logger.log({"train/loss": 0.75}, step=2)
    tb_dir = Path(on.log_dir) / "tensorboard"
    assert list(tb_dir.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    events = acc.Scalars("train/loss")
    assert [(e.step, e.value) for e in events] == [(1, 1.0), (2, 0.75)]


def test_console_prints_one_line_every_period(tmp_path):
    out = io.StringIO()
    with MetricsLogger(_cfg(tmp_path, console_period=2), console=Console(file=out, width=200)) as logger:
        for step in range(1, 6):
            logger.log({"train/loss": 1.23456789, "train/lr": 3e-5, "train/tokens": 12345}, step=step)

    lines = out.getvalue().splitlines()
    assert lines == [
        f"step {s} | train/loss 1.2346 | train/lr 3.0e-05 | train/tokens 12345" for s in (2, 4)
    ]


def test_missing_wandb_gives_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    cfg = _cfg(tmp_path, wandb_enabled=True)
    with pytest.raises(ImportError, match=r"pip install 'posttrain\[wandb\]'"):
        MetricsLogger(cfg, console=_quiet())
    assert not Path(cfg.log_dir).exists()


def test_wandb_receives_config_and_metrics(tmp_path, monkeypatch):
    calls: list[tuple] = []
    run = types.SimpleNamespace(
        log=lambda metrics, step: calls.append(("log", metrics, step)),
        finish=lambda: calls.append(("finish",)),
    )
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls.append(("init", kwargs)) or run
    monkeypatch.setitem(sys.modules, "wandb", fake)

    cfg = _cfg(tmp_path, wandb_enabled=True)
    with MetricsLogger(cfg, run_config={"sft": {"seed": 1}}, console=_quiet()) as logger:
        logger.log({"train/loss": 1.0}, step=3)

    init_kwargs = calls[0][1]
    assert init_kwargs["project"] == "posttrain" and init_kwargs["config"] == {"sft": {"seed": 1}}
    assert init_kwargs["dir"] == cfg.log_dir
    assert calls[1:] == [("log", {"train/loss": 1.0}, 3), ("finish",)]


def test_mlflow_gets_flat_params_and_valid_metric_names(tmp_path, monkeypatch):
    recorded: dict = {}
    fake = types.ModuleType("mlflow")
    fake.set_tracking_uri = lambda uri: recorded.setdefault("uri", uri)
    fake.set_experiment = lambda name: recorded.setdefault("experiment", name)
    fake.start_run = lambda run_name=None: recorded.setdefault("run_name", run_name)
    fake.log_params = lambda params: recorded.setdefault("params", params)
    fake.log_metrics = lambda metrics, step: recorded.setdefault("metrics", (metrics, step))
    fake.end_run = lambda: recorded.setdefault("ended", True)
    monkeypatch.setitem(sys.modules, "mlflow", fake)

    cfg = _cfg(tmp_path, mlflow_enabled=True)
    cfg.mlflow.tracking_uri = "file:///tmp/mlruns"
    run_config = {"policy": {"model_name": "m", "optimizer": {"betas": [0.9, 0.99]}}, "note": "x" * 600}
    with MetricsLogger(cfg, run_config=run_config, console=_quiet()) as logger:
        logger.log({"train/loss": 1.0, "val/acc@1 (greedy)": 0.5, "/odd//name/": 2.0}, step=4)

    assert recorded["uri"] == "file:///tmp/mlruns" and recorded["experiment"] == "posttrain"
    assert recorded["params"] == {
        "policy.model_name": "m",
        "policy.optimizer.betas": "[0.9, 0.99]",
        "note": "x" * 500,
    }
    assert recorded["metrics"] == ({"train/loss": 1.0, "val/acc_1 _greedy_": 0.5, "odd/name": 2.0}, 4)
    assert recorded["ended"] is True


def test_progress_shows_count_and_info_when_not_a_tty():
    from posttrain.logging import make_progress

    out = io.StringIO()
    with make_progress(Console(file=out, width=120)) as progress:
        task = progress.add_task("train", total=4, info="")
        progress.update(task, advance=4, info="loss 0.5")
    assert "4/4" in out.getvalue() and "loss 0.5" in out.getvalue()


def test_non_finite_values_are_written_as_strict_json_null(tmp_path):
    cfg = _cfg(tmp_path)
    with MetricsLogger(cfg, console=_quiet()) as logger:
        logger.log({"train/loss": float("nan"), "train/grad_norm": float("inf"), "train/lr": 0.5}, step=1)
    text = (Path(cfg.log_dir) / "metrics.jsonl").read_text()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    assert _read_jsonl(cfg) == [{"step": 1, "train/loss": None, "train/grad_norm": None, "train/lr": 0.5}]

"""Fan one stream of scalar metrics out to a JSONL file, the console and optional trackers.

`metrics.jsonl` is always written: it is the record `plot_metrics` and users' own scripts read,
and it needs no extra service. TensorBoard, W&B and MLflow are switched on in `LoggerConfig`.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

from rich.console import Console
from rich.text import Text

from posttrain.config import LoggerConfig
from posttrain.data.jsonl import json_line, read_jsonl, write_jsonl

# MLflow accepts alphanumerics, "_", "-", ".", " " and "/" in every version we support
# (newer ones also take ":", older ones do not), and rejects names that are not normalised paths.
_MLFLOW_BAD_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")
_MLFLOW_PARAM_VALUE_MAX = 500  # the limit of older MLflow servers; newer ones allow more


class MetricsLogger:
    """Send `{name: value}` at a step to every enabled sink; use it as a context manager.

    `resumed_at` is the step of the checkpoint a resumed run continues from: the steps after it
    were logged by the interrupted run and are about to be run (and logged) again, so their old
    records leave `metrics.jsonl` and TensorBoard, and every step keeps one record.
    """

    def __init__(
        self,
        cfg: LoggerConfig,
        run_config: dict[str, Any] | None = None,
        console: Console | None = None,
        resumed_at: int | None = None,
    ) -> None:
        # Import optional trackers first so a missing one fails before anything is created on disk.
        wandb = _import_optional("wandb") if cfg.wandb_enabled else None
        mlflow = _import_optional("mlflow") if cfg.mlflow_enabled else None

        self._cfg = cfg
        self._console = console if console is not None else Console()
        self._tb: Any = None
        self._wandb_run: Any = None
        self._mlflow: ModuleType | None = None
        log_dir = Path(cfg.log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        if resumed_at is not None:
            _drop_records_after(log_dir / "metrics.jsonl", resumed_at, self._console)
        # Append: a resumed run continues the same record.
        self._jsonl = (log_dir / "metrics.jsonl").open("a", encoding="utf-8")
        try:
            if cfg.tensorboard_enabled:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=cfg.tensorboard.log_dir or str(log_dir / "tensorboard"),
                                         purge_step=None if resumed_at is None else resumed_at + 1)
            if wandb is not None:
                self._wandb_run = wandb.init(
                    project=cfg.wandb.project,
                    name=cfg.wandb.name,
                    entity=cfg.wandb.entity,
                    config=run_config,
                    dir=str(log_dir),
                )
            if mlflow is not None:
                if cfg.mlflow.tracking_uri:
                    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
                mlflow.set_experiment(cfg.mlflow.experiment_name)
                mlflow.start_run(run_name=cfg.mlflow.run_name)
                self._mlflow = mlflow
                if run_config:
                    mlflow.log_params(_mlflow_params(run_config))
        except BaseException:
            self.close()
            raise

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Record `metrics` at `step`; values may be floats, ints, numpy scalars or 0-dim tensors."""
        if "step" in metrics:
            raise ValueError("'step' is reserved for the step number; rename that metric")
        values = {name: _to_float(name, value) for name, value in metrics.items()}

        self._jsonl.write(json_line({"step": step, **values}))
        self._jsonl.flush()  # a crash must not lose logged steps
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(name, value, step)
            self._tb.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=step)
        if self._mlflow is not None:
            self._mlflow.log_metrics({_mlflow_name(k): v for k, v in values.items()}, step=step)

        period = self._cfg.console_period
        if period > 0 and step % period == 0:
            line = Text(f"step {step}")
            for name, value in metrics.items():
                line.append(" | ", style="dim")
                line.append(f"{name} ", style="cyan")
                line.append(_format_value(value))
            self._console.print(line, soft_wrap=True)

    def close(self) -> None:
        """Flush and release every sink; safe to call twice."""
        if not self._jsonl.closed:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None
        if self._mlflow is not None:
            self._mlflow.end_run()
            self._mlflow = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _drop_records_after(path: Path, step: int, console: Console) -> None:
    """Rewrite `path` without the records of steps after `step`, nor a line cut short by the
    interruption (atomically: a crash while rewriting keeps the old file)."""
    if not path.is_file():
        return
    lines = read_jsonl(path, skip_invalid=True)
    kept = [record for record in lines.records if record.get("step", 0) <= step]
    repeated, cut = len(lines.records) - len(kept), lines.num_skipped
    if not repeated and not cut:
        return
    write_jsonl(path, kept)
    console.print(f"{path}: dropped {repeated} records of steps after {step}, which this resumed run repeats"
                  + (f", and {cut} unreadable lines (cut short by the interruption)" if cut else ""))


def _import_optional(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ImportError(
            f"logger.{name}_enabled is true but {name} is not installed; "
            f"run `pip install 'posttrain[{name}]'` or set logger.{name}_enabled=false"
        ) from e


def _to_float(name: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"metric {name!r} must be a scalar number, got {type(value).__name__}") from e


def _format_value(value: Any) -> str:
    """Plain decimals for ordinary magnitudes, scientific otherwise, so lines stay short."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    v = float(value)
    if v == 0.0:
        return "0"
    if 1e-3 <= abs(v) < 1e4:
        return f"{v:.4f}"
    return f"{v:.1e}"


def _mlflow_name(name: str) -> str:
    """Map a metric or param name onto one MLflow accepts (`train/loss` stays as is)."""
    cleaned = _MLFLOW_BAD_CHARS.sub("_", name)
    # Empty, "." and ".." path segments make MLflow reject the name as a non-normalised path.
    return "/".join(p for p in cleaned.split("/") if p not in ("", ".", "..")) or "_"


def _mlflow_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a nested config into dotted keys, since MLflow params are flat strings."""
    params: dict[str, str] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            params.update(_mlflow_params(value, prefix=f"{dotted}."))
        else:
            params[_mlflow_name(dotted)] = str(value)[:_MLFLOW_PARAM_VALUE_MAX]
    return params

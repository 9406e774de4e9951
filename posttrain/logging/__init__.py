"""Metrics sinks (JSONL, TensorBoard, W&B, MLflow, console), progress bars and plots."""

from posttrain.logging.metrics import MetricsLogger
from posttrain.logging.plot import plot_metrics
from posttrain.logging.progress import make_progress

__all__ = ["MetricsLogger", "make_progress", "plot_metrics"]

"""Atomic, resumable checkpoints.

A checkpoint is written into a temporary folder and renamed into place only when complete, so
a crash mid-write never leaves a checkpoint that looks valid. `trainer_state.json` records the
step, the data position and the run's identity (model and data settings); resuming refuses a
checkpoint whose identity differs from the current run's.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from posttrain.config import CheckpointingConfig, ConfigError, DataConfig, PolicyConfig, to_dict

STATE_FILE = "trainer_state.json"
PREFIX = "step_"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    def __init__(self, cfg: CheckpointingConfig):
        self.cfg = cfg
        self.root = Path(cfg.checkpoint_dir)

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir()
                 if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()
                 and (p / STATE_FILE).is_file()]
        return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def save(self, step: int, state: dict[str, Any], write_files: Callable[[Path], None]) -> Path:
        """`write_files(tmp_dir)` writes model/optimizer files; the state file is written last."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"{PREFIX}{step}"
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp_{PREFIX}{step}_", dir=self.root))
        try:
            write_files(tmp)
            with open(tmp / STATE_FILE, "w") as f:
                json.dump({"step": step, **state}, f, indent=2, default=str)
                f.flush()
                os.fsync(f.fileno())
            if final.exists():  # an older run's checkpoint at the same step
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._prune()
        return final

    def _prune(self) -> None:
        k = self.cfg.keep_top_k
        found = self.checkpoints()
        if k is None or len(found) <= k:
            return
        latest = found[-1]
        if self.cfg.metric_name:
            def score(path: Path) -> float:
                value = read_state(path).get("metrics", {}).get(self.cfg.metric_name)
                if value is None:
                    return -float("inf")  # checkpoints without the metric go first
                return value if self.cfg.higher_is_better else -value
            ranked = sorted(found, key=score, reverse=True)
        else:
            ranked = list(reversed(found))
        keep = set(ranked[:k]) | {latest}
        for path in found:
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)


def find_resume_checkpoint(cfg: CheckpointingConfig, manager: CheckpointManager) -> Path | None:
    """The checkpoint a run continues from, per `checkpointing.resume`."""
    if cfg.resume == "never":
        return None
    latest = manager.latest()
    if latest is None and cfg.resume == "required":
        raise ConfigError(f"--resume given but no checkpoint found in {cfg.checkpoint_dir}")
    return latest


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / STATE_FILE).read_text())


def check_identity(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to resume a checkpoint made for another model or data (a silent-resume bug otherwise)."""
    diffs = [f"{k}: checkpoint={saved.get(k)!r} run={v!r}" for k, v in current.items() if saved.get(k) != v]
    if diffs:
        raise ConfigError(f"checkpoint {path} was written by a different run; refusing to resume.\n  "
                          + "\n  ".join(diffs)
                          + "\nUse another checkpointing.checkpoint_dir, or checkpointing.resume=never.")


def save_run_checkpoint(manager: CheckpointManager, step: int, save_model: Callable[[Path], None],
                        sampler_state: dict[str, Any], identity: dict[str, Any], metrics: dict[str, Any]) -> None:
    """One training-loop checkpoint: model/optimizer (by `save_model`), RNG, data position, identity."""
    def write(directory: Path) -> None:
        save_model(directory)
        torch.save(rng_state(), directory / "rng.pt")

    manager.save(step, {"identity": identity, "sampler": sampler_state, "metrics": metrics}, write)


def run_identity(policy: PolicyConfig, data: DataConfig, seed: int) -> dict[str, Any]:
    """What must match for a checkpoint to continue an SFT, DPO or RM run."""
    return {
        "model_name": policy.model_name,
        "data": to_dict(data),
        "train_global_batch_size": policy.train_global_batch_size,
        "max_total_sequence_length": policy.max_total_sequence_length,
        "seed": seed,
    }

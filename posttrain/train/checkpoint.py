"""Atomic, resumable checkpoints.

A checkpoint is written into a temporary folder and renamed into place only when complete, so
a crash mid-write never leaves a checkpoint that looks valid. `trainer_state.json` records the
step, the data position and the run's identity (model and data settings); resuming refuses a
checkpoint whose identity differs from the current run's.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from posttrain.config import CheckpointingConfig, ConfigError, DataConfig, PolicyConfig, to_dict
from posttrain.data.jsonl import strict_json_numbers

STATE_FILE = "trainer_state.json"
PREFIX = "step_"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def load_rng_state(file: Path) -> dict[str, Any]:
    """`rng.pt` through torch's restricted unpickler, with numpy's array types (the numpy state's
    key array) its only additions: a file planted in a checkpoint folder cannot run code when a
    run resumes from it."""
    # what a pickled numpy array names: numpy's array constructor (wherever this numpy keeps it),
    # the array and dtype types, and the uint32 dtype of the state's keys
    numpy_array = [np.zeros(0).__reduce__()[0], np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        with torch.serialization.safe_globals(numpy_array):
            return torch.load(file, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ConfigError(f"{file} holds more than tensors, numbers and numpy arrays, so it was not written by "
                          f"posttrain, and it is not loaded (unpickling it could run code); delete "
                          f"{file.parent} to resume from an earlier checkpoint, or set checkpointing.resume=never "
                          f"({str(err).splitlines()[0]})") from err


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_files(directory: Path) -> None:
    """Flush the written files to disk before the (fsynced) state file marks them complete, so that
    after a power loss the state file cannot outlive the weights it describes."""
    for file in directory.rglob("*"):
        if file.is_file():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


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
        # Not tempfile.mkdtemp: its folder is private (0700) and would stay so once renamed into place.
        tmp = self.root / f".tmp_{PREFIX}{step}_{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            write_files(tmp)
            _fsync_files(tmp)
            with open(tmp / STATE_FILE, "w") as f:
                json.dump({"step": step, **state}, f, indent=2, default=str)
                f.flush()
                os.fsync(f.fileno())
            if final.exists():  # an older run's checkpoint at the same step
                self._remove(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._prune()
        return final

    def _remove(self, path: Path) -> None:
        """Rename, then delete: a crash mid-delete must not leave a partial folder that still has its
        state file and so looks complete."""
        doomed = self.root / f".tmp_deleting_{path.name}_{uuid.uuid4().hex[:8]}"
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def _prune(self) -> None:
        k = self.cfg.keep_top_k
        found = self.checkpoints()
        if k is None or len(found) <= k:
            return
        latest = found[-1]
        if self.cfg.metric_name:
            def score(path: Path) -> float:
                value = read_state(path).get("metrics", {}).get(self.cfg.metric_name)
                if value is None or math.isnan(value):
                    return -float("inf")  # checkpoints without the metric (or a diverged one) go first
                return value if self.cfg.higher_is_better else -value
            ranked = sorted(found, key=score, reverse=True)
        else:
            ranked = list(reversed(found))
        keep = set(ranked[:k]) | {latest}
        for path in found:
            if path not in keep:
                self._remove(path)


def find_resume_checkpoint(cfg: CheckpointingConfig, manager: CheckpointManager) -> Path | None:
    """The checkpoint a run continues from, per `checkpointing.resume`. A run with checkpointing off
    neither saves nor resumes: it would otherwise pick up whatever an earlier run left in the folder."""
    if cfg.resume == "never" or not cfg.enabled:
        return None
    latest = manager.latest()
    if latest is None and cfg.resume == "required":
        raise ConfigError(f"checkpointing.resume=required (or --resume) but no checkpoint found in {cfg.checkpoint_dir}")
    return latest


def resumed_message(resume_dir: Path, step: int, total_steps: int) -> str:
    """What a resumed run prints; it says so when the checkpoint leaves no step to train."""
    message = f"[bold]Resumed[/] from {resume_dir} at step {step}"
    if step >= total_steps:
        message += (f"; the run has {total_steps} steps, so none is left to train (raise the step or epoch "
                    "limit to train on, or set checkpointing.resume=never to start over)")
    return message


def resume_training(resume_dir: Path | None, policy, sampler, total_steps: int, console) -> int:
    """Continue from `resume_dir` (if any): the policy's optimizer and schedule state, the data
    sampler's position and the RNG streams are restored, and the run says so; returns the step
    the checkpoint ended (0 without one). The weights were loaded with the policy."""
    if resume_dir is None:
        return 0
    state = read_state(resume_dir)
    policy.load_training_state(resume_dir)
    sampler.load_state_dict(state["sampler"])
    set_rng_state(load_rng_state(resume_dir / "rng.pt"))
    console.print(resumed_message(resume_dir, state["step"], total_steps))
    return state["step"]


def read_state(path: Path) -> dict[str, Any]:
    """The state file, with an error naming the file when it is not JSON (a damaged or hand-edited checkpoint)."""
    file = Path(path) / STATE_FILE
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"checkpoint state {file} is corrupt ({err}); delete {path} to resume from an "
                          "earlier checkpoint, or set checkpointing.resume=never") from err


def _identity_diffs(saved: Any, current: Any, key: str) -> list[str]:
    """One line per differing leaf (`data.shuffle`), not the whole section, so the key is easy to find."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return [line for k in current | saved
                for line in _identity_diffs(saved.get(k), current.get(k), f"{key}.{k}")]
    return [] if saved == current else [f"{key}: checkpoint={saved!r} run={current!r}"]


def check_identity(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to resume a checkpoint made for another model or data (a silent-resume bug otherwise)."""
    diffs = [line for k, v in current.items() for line in _identity_diffs(saved.get(k), v, k)]
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

    manager.save(step, {"identity": identity, "sampler": sampler_state, "metrics": strict_json_numbers(metrics)}, write)


def model_identity(policy: PolicyConfig, data: DataConfig, seed: int) -> dict[str, Any]:
    """What must match for a checkpoint to continue any run: model, data, seed and the adapters'
    shape (a LoRA checkpoint resumes only into the same adapters; None without LoRA, as in
    checkpoints written before LoRA existed)."""
    lora = policy.lora
    return {
        "model_name": policy.model_name,
        "data": to_dict(data),
        "seed": seed,
        "lora": {"dim": lora.dim, "alpha": lora.alpha, "target_modules": list(lora.target_modules),
                 "exclude_modules": list(lora.exclude_modules)} if lora.enabled else None,
    }


def run_identity(policy: PolicyConfig, data: DataConfig, seed: int) -> dict[str, Any]:
    """What must match for a checkpoint to continue an SFT, DPO or RM run."""
    return {
        **model_identity(policy, data, seed),
        "train_global_batch_size": policy.train_global_batch_size,
        "max_total_sequence_length": policy.max_total_sequence_length,
    }

"""Checkpoint -> Hugging Face folder.

A checkpoint (`Policy.save`) already keeps the weights and tokenizer in Hugging Face format
under `model/`, beside the optimizer, schedule, RNG and data-position state that only resuming
needs; converting copies that folder out, byte for byte, so the logits are exactly the trained
model's. The other direction is not offered: an HF folder has no optimizer moments, schedule or
data position, so a "checkpoint" made from one would resume nothing; start a run from it with
`policy.model_name=<folder>` instead.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from posttrain.config import CheckpointingConfig
from posttrain.train.checkpoint import STATE_FILE, CheckpointManager

MODEL_DIR = "model"


def resolve_checkpoint(path: str | Path) -> Path:
    """A step_N checkpoint as given, or the latest one in a `checkpointing.checkpoint_dir`."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if (path / STATE_FILE).is_file():
        return path
    if (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is already a Hugging Face model folder (it has config.json); "
                                "load it directly, e.g. generation.model_name=" + str(path))
    latest = CheckpointManager(CheckpointingConfig(checkpoint_dir=str(path))).latest()
    if latest is None:
        raise FileNotFoundError(f"{path} is neither a checkpoint (no {STATE_FILE}) nor a folder of step_N "
                                "checkpoints")
    return latest


def checkpoint_to_hf(checkpoint: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Copy the checkpoint's model + tokenizer to `out_dir`, atomically (a temp folder renamed into place)."""
    checkpoint = resolve_checkpoint(checkpoint)
    source = checkpoint / MODEL_DIR
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"{source} holds no Hugging Face model (no config.json); is it a posttrain "
                                "checkpoint (step_N/model/)?")
    out = Path(out_dir)
    # Replacing a folder that holds the checkpoint would delete it (--overwrite on the checkpoint_dir);
    # one inside it would be copied into itself and pruned with it.
    if checkpoint.resolve().is_relative_to(out.resolve()) or out.resolve().is_relative_to(checkpoint.resolve()):
        raise FileExistsError(f"output folder {out} overlaps the checkpoint {checkpoint}; choose a folder outside it")
    occupied = any(out.iterdir()) if out.is_dir() else out.exists()
    if occupied and not overwrite:
        raise FileExistsError(f"output folder {out} exists and is not empty; choose another or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp_{out.name}_", dir=out.parent))
    try:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out

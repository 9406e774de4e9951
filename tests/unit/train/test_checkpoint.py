"""Checkpoints: atomic writes, what counts as complete, pruning, identity and RNG state."""

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from posttrain.config import CheckpointingConfig, ConfigError
from posttrain.train.checkpoint import (
    STATE_FILE,
    CheckpointManager,
    check_identity,
    find_resume_checkpoint,
    load_rng_state,
    read_state,
    resumed_message,
    rng_state,
    save_run_checkpoint,
    set_rng_state,
)


def manager(tmp_path, **kwargs):
    return CheckpointManager(CheckpointingConfig(checkpoint_dir=str(tmp_path / "ckpt"), **kwargs))


def write_weights(d):
    (d / "model.bin").write_text("weights")


def steps(mgr):
    return [int(p.name.removeprefix("step_")) for p in mgr.checkpoints()]


def test_save_creates_step_folder_with_state(tmp_path):
    mgr = manager(tmp_path)
    assert mgr.latest() is None
    path = mgr.save(5, {"epoch": 1, "metrics": {"val/loss": 0.5}}, write_weights)
    assert path == tmp_path / "ckpt" / "step_5"
    assert (path / STATE_FILE).is_file()
    assert (path / "model.bin").read_text() == "weights"
    assert read_state(path) == {"step": 5, "epoch": 1, "metrics": {"val/loss": 0.5}}
    assert mgr.latest() == path
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["step_5"]


def test_failed_write_leaves_nothing_behind(tmp_path):
    mgr = manager(tmp_path)
    first = mgr.save(1, {}, write_weights)

    def broken(d):
        (d / "partial.bin").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        mgr.save(2, {}, broken)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_1"]
    assert mgr.latest() == first


def test_incomplete_folders_are_ignored(tmp_path):
    mgr = manager(tmp_path, keep_top_k=None)
    done = mgr.save(3, {}, write_weights)
    root = tmp_path / "ckpt"
    leftover = root / ".tmp_step_9_abc123"
    leftover.mkdir()
    (leftover / STATE_FILE).write_text('{"step": 9}')
    no_state = root / "step_7"
    no_state.mkdir()
    (no_state / "model.bin").write_text("x")
    (root / "step_8").write_text("a file, not a folder")
    assert mgr.checkpoints() == [done]
    assert mgr.latest() == done


def test_checkpoints_sorted_numerically(tmp_path):
    mgr = manager(tmp_path, keep_top_k=None)
    for step in (10, 9, 100):
        mgr.save(step, {}, write_weights)
    assert steps(mgr) == [9, 10, 100]
    assert mgr.latest().name == "step_100"


def test_resave_same_step_replaces(tmp_path):
    mgr = manager(tmp_path)
    mgr.save(4, {"v": 1}, write_weights)
    mgr.save(4, {"v": 2}, write_weights)
    assert steps(mgr) == [4]
    assert read_state(mgr.latest())["v"] == 2


def test_keep_top_k_keeps_newest_by_default(tmp_path):
    mgr = manager(tmp_path, keep_top_k=2)
    for step in range(1, 6):
        mgr.save(step * 10, {}, write_weights)
    assert steps(mgr) == [40, 50]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_40", "step_50"]


def test_keep_top_k_none_keeps_all(tmp_path):
    mgr = manager(tmp_path, keep_top_k=None)
    for step in range(1, 6):
        mgr.save(step, {}, write_weights)
    assert steps(mgr) == [1, 2, 3, 4, 5]


def test_keep_best_by_metric_plus_latest(tmp_path):
    mgr = manager(tmp_path, keep_top_k=2, metric_name="val/loss", higher_is_better=False)
    losses = {1: 0.5, 2: 0.1, 3: 0.3, 4: 0.9}
    for step, loss in losses.items():
        mgr.save(step, {"metrics": {"val/loss": loss}}, write_weights)
    kept = steps(mgr)
    assert 1 not in kept  # worse than 2 and 3
    assert 2 in kept  # the best
    assert 4 in kept  # the latest, although the worst
    mgr.save(5, {"metrics": {"val/loss": 0.2}}, write_weights)
    assert steps(mgr) == [2, 5]  # best two, the latest among them


def test_keep_best_higher_is_better(tmp_path):
    mgr = manager(tmp_path, keep_top_k=1, metric_name="val/acc", higher_is_better=True)
    for step, acc in {1: 0.2, 2: 0.9, 3: 0.5}.items():
        mgr.save(step, {"metrics": {"val/acc": acc}}, write_weights)
    assert steps(mgr) == [2, 3]


def test_checkpoints_without_metric_are_pruned_first(tmp_path):
    mgr = manager(tmp_path, keep_top_k=1, metric_name="val/loss")
    mgr.save(1, {"metrics": {"val/loss": 0.4}}, write_weights)
    mgr.save(2, {}, write_weights)
    mgr.save(3, {"metrics": {"val/loss": 0.9}}, write_weights)
    assert steps(mgr) == [1, 3]


def test_check_identity_lists_differing_key(tmp_path):
    saved = {"model": "tiny-a", "data": "arithmetic", "step": 3}
    check_identity(saved, {"model": "tiny-a", "data": "arithmetic"}, tmp_path)
    with pytest.raises(ConfigError, match="different run; refusing to resume") as info:
        check_identity(saved, {"model": "tiny-b", "data": "arithmetic"}, tmp_path)
    msg = str(info.value)
    assert "model: checkpoint='tiny-a' run='tiny-b'" in msg
    assert "data:" not in msg
    assert str(tmp_path) in msg


def test_check_identity_missing_key_in_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match=r"config_hash: checkpoint=None run='abc'"):
        check_identity({"model": "m"}, {"model": "m", "config_hash": "abc"}, tmp_path)


def test_rng_state_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    torch.save(rng_state(), tmp_path / "rng.pt")
    state = load_rng_state(tmp_path / "rng.pt")  # through the restricted unpickler, as at resume
    first = (torch.rand(5), random.random(), np.random.rand(3))
    set_rng_state(state)
    second = (torch.rand(5), random.random(), np.random.rand(3))
    assert torch.equal(first[0], second[0])
    assert first[1] == second[1]
    assert np.array_equal(first[2], second[2])
    # And the draws really moved the generators on.
    assert not torch.equal(torch.rand(5), first[0])


class _Planted:
    def __reduce__(self):
        return (os.system, ("touch planted-ran",))


def test_an_rng_file_planted_in_a_checkpoint_is_refused_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"python": _Planted()}, tmp_path / "rng.pt")
    with pytest.raises(ConfigError, match=r"rng\.pt holds more than tensors, numbers and numpy arrays, so it was not "
                                          r"written by posttrain, and it is not loaded.*checkpointing\.resume=never"):
        load_rng_state(tmp_path / "rng.pt")
    assert not (tmp_path / "planted-ran").exists()


def test_nan_metric_is_ranked_last_not_kept_as_best(tmp_path):
    # A diverged step (NaN val/loss) must not take a "best" slot from a real one.
    mgr = manager(tmp_path, keep_top_k=2, metric_name="val/loss")
    for step, loss in {1: float("nan"), 2: 0.1, 3: 0.2, 4: 0.3}.items():
        mgr.save(step, {"metrics": {"val/loss": loss}}, write_weights)
    assert steps(mgr) == [2, 3, 4]


def test_a_run_checkpoint_writes_a_diverged_metric_as_strict_json(tmp_path):
    mgr = manager(tmp_path, keep_top_k=1, metric_name="val/loss")
    for step, loss in {1: 0.1, 2: float("nan")}.items():
        save_run_checkpoint(mgr, step, write_weights, {}, {}, {"val/loss": loss})
    text = (tmp_path / "ckpt" / "step_2" / STATE_FILE).read_text()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    assert read_state(tmp_path / "ckpt" / "step_2")["metrics"] == {"val/loss": None}
    assert steps(mgr) == [1, 2]  # the best (step 1) and the latest


def test_checkpoint_folder_follows_the_umask_not_private(tmp_path):
    path = manager(tmp_path).save(1, {}, write_weights)
    assert path.stat().st_mode & 0o777 == (tmp_path / "ckpt").stat().st_mode & 0o777


def test_written_files_are_fsynced_before_the_state_file(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def record(fd):
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    path = manager(tmp_path).save(1, {}, write_weights)
    weights, state = (path / "model.bin").stat().st_ino, (path / STATE_FILE).stat().st_ino
    assert weights in synced and synced.index(weights) < synced.index(state)


def _crash_while_deleting(monkeypatch):
    """rmtree that dies (as a killed process would) after deleting everything but the state file."""
    real_rmtree = shutil.rmtree

    def crash(path, ignore_errors=False):
        for file in Path(path).iterdir():
            if file.name != STATE_FILE:
                file.unlink()
        monkeypatch.setattr(shutil, "rmtree", real_rmtree)
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", crash)


def test_crash_while_pruning_leaves_no_complete_looking_partial_checkpoint(tmp_path, monkeypatch):
    mgr = manager(tmp_path, keep_top_k=1)
    mgr.save(1, {}, write_weights)
    _crash_while_deleting(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        mgr.save(2, {}, write_weights)
    assert steps(mgr) == [2]
    assert all((p / "model.bin").is_file() for p in mgr.checkpoints())


def test_crash_while_replacing_same_step_leaves_no_complete_looking_partial_checkpoint(tmp_path, monkeypatch):
    mgr = manager(tmp_path)
    mgr.save(1, {}, write_weights)
    mgr.save(4, {"v": 1}, write_weights)
    _crash_while_deleting(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        mgr.save(4, {"v": 2}, write_weights)
    assert all((p / "model.bin").is_file() for p in mgr.checkpoints())
    assert steps(mgr) == [1]


def test_corrupt_state_file_names_the_file(tmp_path):
    path = manager(tmp_path).save(1, {}, write_weights)
    (path / STATE_FILE).write_text('{"step": 1, "ident')
    with pytest.raises(ConfigError, match=rf"{STATE_FILE} is corrupt"):
        read_state(path)


def test_check_identity_names_the_nested_key_that_differs(tmp_path):
    data = {"dataset_name": "arithmetic", "shuffle": True, "arithmetic": {"num_train": 10, "num_val": 2}}
    changed = {**data, "arithmetic": {"num_train": 20, "num_val": 2}}
    with pytest.raises(ConfigError) as info:
        check_identity({"data": data, "seed": 1}, {"data": changed, "seed": 1}, tmp_path)
    msg = str(info.value)
    assert "data.arithmetic.num_train: checkpoint=10 run=20" in msg
    assert "shuffle" not in msg and "num_val" not in msg


def test_resumed_message_says_when_nothing_is_left_to_train():
    assert resumed_message(Path("ckpt/step_4"), 4, 10) == "[bold]Resumed[/] from ckpt/step_4 at step 4"
    done = resumed_message(Path("ckpt/step_10"), 10, 6)
    assert done.startswith("[bold]Resumed[/] from ckpt/step_10 at step 10; the run has 6 steps, so none is left")
    assert "checkpointing.resume=never" in done


def test_a_run_with_checkpointing_off_does_not_resume_what_an_earlier_run_left(tmp_path):
    mgr = manager(tmp_path)
    mgr.save(3, {}, write_weights)
    on = CheckpointingConfig(checkpoint_dir=str(tmp_path / "ckpt"))
    assert find_resume_checkpoint(on, mgr) == tmp_path / "ckpt" / "step_3"
    off = CheckpointingConfig(checkpoint_dir=str(tmp_path / "ckpt"), enabled=False)
    assert find_resume_checkpoint(off, mgr) is None

"""`posttrain convert` on fake checkpoints: which paths it refuses (the real model is in tests/e2e)."""

import pytest

from posttrain.train.checkpoint import STATE_FILE
from posttrain.train.convert import checkpoint_to_hf


@pytest.fixture
def root(tmp_path):
    """A checkpoint_dir with one checkpoint whose model/ is a (fake) Hugging Face folder."""
    step = tmp_path / "ckpt" / "step_1"
    (step / "model").mkdir(parents=True)
    (step / "model" / "config.json").write_text("{}")
    (step / STATE_FILE).write_text('{"step": 1}')
    return tmp_path / "ckpt"


def test_copies_the_model_folder(root, tmp_path):
    out = checkpoint_to_hf(root, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


@pytest.mark.parametrize("where", ["ckpt", "ckpt/step_1", "ckpt/step_1/model", "ckpt/step_1/model/hf"])
def test_refuses_an_output_that_holds_or_lies_inside_the_checkpoint(root, tmp_path, where):
    with pytest.raises(FileExistsError, match="overlaps the checkpoint"):
        checkpoint_to_hf(root, tmp_path / where, overwrite=True)
    assert (root / "step_1" / STATE_FILE).is_file()
    assert sorted(p.name for p in (root / "step_1" / "model").iterdir()) == ["config.json"]

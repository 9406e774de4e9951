"""`posttrain convert`: a training checkpoint becomes an HF folder with the same logits."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.cli import main
from posttrain.config import CheckpointingConfig, PolicyConfig
from posttrain.train.checkpoint import CheckpointManager
from posttrain.train.convert import checkpoint_to_hf, resolve_checkpoint
from posttrain.train.policy import Policy

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """A checkpoint written as the training loops write one, after a step that moved the weights."""
    root = tmp_path_factory.mktemp("ckpt")
    cfg = PolicyConfig(model_name=str(tiny_model_dir), device="cpu")
    cfg.optimizer.lr = 1e-2
    policy = Policy(cfg, total_steps=1)
    ids = torch.tensor([policy.tokenizer("What is 2 + 3? 5")["input_ids"]])
    policy.train_step([{"input_ids": ids}], lambda model, batch: model(**batch).logits.float().pow(2).mean())
    manager = CheckpointManager(CheckpointingConfig(checkpoint_dir=str(root)))
    manager.save(1, {"identity": {}}, lambda d: policy.save(d))
    policy.model.eval()
    with torch.no_grad():
        logits = policy.model(input_ids=ids).logits
    return root, ids, logits


def test_converted_folder_loads_with_identical_logits(trained, tiny_model_dir, tmp_path):
    root, ids, logits = trained
    assert main(["convert", str(root), str(tmp_path / "hf")]) == 0  # the root: its latest checkpoint
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, logits)
        original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=ids).logits
    assert not torch.allclose(original, logits)  # the trained weights, not the starting ones
    assert tokenizer("What is 2 + 3? 5")["input_ids"] == ids[0].tolist()
    assert not (tmp_path / "hf" / "optimizer.pt").exists()


def test_convert_refuses_bad_inputs(trained, tiny_model_dir, tmp_path, capsys):
    root, _, _ = trained
    assert resolve_checkpoint(root) == root / "step_1"
    out = checkpoint_to_hf(root / "step_1", tmp_path / "hf")
    with pytest.raises(FileExistsError, match="not empty"):
        checkpoint_to_hf(root, out)
    assert checkpoint_to_hf(root, out, overwrite=True) == out
    assert main(["convert", str(tiny_model_dir), str(tmp_path / "x")]) == 2
    assert "already a Hugging Face model folder" in _err(capsys)
    assert main(["convert", str(tmp_path / "nothing"), str(tmp_path / "y")]) == 2
    assert "checkpoint not found" in _err(capsys)


def _err(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())  # rich wraps long lines

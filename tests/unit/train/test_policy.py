import pytest
import torch

from posttrain.config import OptimizerConfig, PolicyConfig
from posttrain.train.policy import Policy


def _tiny_gradient_step(model_dir, precision: str) -> tuple[Policy, bool]:
    """One step on a loss whose gradient at the float16 logits (~1e-8) is below float16's smallest
    number: unscaled, every gradient would flush to zero and the weights would not move."""
    cfg = PolicyConfig(model_name=str(model_dir), device="cpu", precision=precision,
                       optimizer=OptimizerConfig(lr=1e-3, weight_decay=0.0))
    policy = Policy(cfg, total_steps=1)
    before = [p.detach().clone() for p in policy.model.parameters()]
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(3, 400, (2, 8))}
    policy.train_step([batch], lambda model, b: model(**b).logits.float().mean() * 1e-4)
    moved = any(not torch.equal(a, p) for a, p in zip(before, policy.model.parameters(), strict=True))
    return policy, moved


def test_float16_scales_the_loss_so_small_gradients_survive(tiny_model_dir):
    policy, moved = _tiny_gradient_step(tiny_model_dir, "float16")
    assert policy.grad_scaler is not None and moved


def test_float16_without_the_scaler_would_lose_them(tiny_model_dir, monkeypatch):
    """The control: the same step with scaling switched off leaves the weights unchanged."""
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *args, **kwargs: None)
    _, moved = _tiny_gradient_step(tiny_model_dir, "float16")
    assert not moved


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_no_scaler_where_the_range_is_float32s(tiny_model_dir, precision):
    cfg = PolicyConfig(model_name=str(tiny_model_dir), device="cpu", precision=precision)
    assert Policy(cfg, total_steps=1).grad_scaler is None


def test_the_scale_is_checkpointed(tiny_model_dir, tmp_path):
    policy, _ = _tiny_gradient_step(tiny_model_dir, "float16")
    policy.grad_scaler.update(new_scale=1024.0)
    policy.save(tmp_path)
    restored, _ = _tiny_gradient_step(tiny_model_dir, "float16")
    restored.load_training_state(tmp_path)
    assert restored.grad_scaler.get_scale() == 1024.0

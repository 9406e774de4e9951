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


def _objective(model, batch):
    loss = model(**batch).logits.float().logsumexp(-1).mean() / 10
    return loss, {"tokens": torch.tensor(float(batch["input_ids"].numel())),
                  "width_max": torch.tensor(float(batch["input_ids"].shape[1]))}


def test_objective_metrics_are_summed_and_fillers_count_for_nothing(tiny_model_dir):
    torch.manual_seed(0)
    first, second = {"input_ids": torch.randint(3, 400, (2, 6))}, {"input_ids": torch.randint(3, 400, (1, 4))}
    cfg = PolicyConfig(model_name=str(tiny_model_dir), device="cpu", optimizer=OptimizerConfig(weight_decay=0.0))
    both = Policy(cfg, total_steps=1).train_step([first, second], _objective)
    assert both["metrics"] == {"tokens": 16.0, "width_max": 6.0}  # a sum, and a maximum by its name

    alone, padded = Policy(cfg, total_steps=1), Policy(cfg, total_steps=1)
    out_alone = alone.train_step([first], _objective)
    out_padded = padded.train_step([first, second], _objective, real=1)  # `second` runs as a filler
    assert out_padded["metrics"] == {"tokens": 12.0, "width_max": 6.0}
    assert out_padded["loss"] == pytest.approx(out_alone["loss"]) and out_padded["grad_norm"] == pytest.approx(
        out_alone["grad_norm"])
    evaluated = padded.evaluate([first, second], _objective, real=1)
    assert evaluated["metrics"] == {"tokens": 12.0, "width_max": 6.0}
    assert evaluated["loss"] == pytest.approx(padded.evaluate([first], _objective)["loss"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_gradient_is_refused_and_leaves_the_weights(tiny_model_dir, bad):
    cfg = PolicyConfig(model_name=str(tiny_model_dir), device="cpu", optimizer=OptimizerConfig(lr=1e-2))
    policy = Policy(cfg, total_steps=3)
    batch = {"input_ids": torch.randint(3, 400, (2, 6))}
    policy.train_step([batch], lambda model, b: _objective(model, b)[0])  # a good step first
    before = [p.detach().clone() for p in policy.model.parameters()]
    with pytest.raises(FloatingPointError, match=r"gradient norm is (nan|inf) .* at optimizer step 2: the step was not taken"):
        policy.train_step([batch], lambda model, b: _objective(model, b)[0] * bad)
    assert all(torch.equal(a, p) for a, p in zip(before, policy.model.parameters(), strict=True))
    assert all(p.grad is None for p in policy.model.parameters())
    policy.train_step([batch], lambda model, b: _objective(model, b)[0])  # training can go on from here
    assert all(torch.isfinite(p).all() for p in policy.model.parameters())

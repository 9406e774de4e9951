import functools

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from posttrain.config import ConfigError, LoRAConfig, OptimizerConfig, PolicyConfig
from posttrain.train.lora import ADAPTER_DIR, add_lora, lora_scaling, merged_state_dict
from posttrain.train.policy import Policy, describe_parameters
from posttrain.train.reward_model import load_reward_model

IDS = torch.tensor([[5, 17, 42, 9, 120, 33], [7, 7, 250, 61, 2, 90]])


def _lora_policy(model_dir, weights_path=None, with_reference=True, model_loader=None, **lora) -> Policy:
    cfg = PolicyConfig(model_name=str(model_dir), device="cpu",
                       optimizer=OptimizerConfig(lr=1e-2, weight_decay=0.0),
                       lora=LoRAConfig(enabled=True, dim=4, alpha=8.0, **lora))
    extra = {"model_loader": model_loader} if model_loader else {}
    return Policy(cfg, total_steps=10, weights_path=weights_path, with_reference=with_reference, **extra)


def _train(policy: Policy, steps: int = 3) -> None:
    for _ in range(steps):
        policy.train_step([{"input_ids": IDS}], lambda model, b: -model(**b).logits.float().log_softmax(-1)[..., 3]
                          .mean())


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_merged_state_dict_is_peft_merge_and_unload(tiny_model_dir):
    """Our merge of a (gathered) state dict against PEFT's own in-place merge."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    adapted = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                               init_lora_weights=False))  # random B: a real update
    ours = merged_state_dict(adapted.get_base_model().state_dict(), scaling=8 / 4)
    theirs = adapted.merge_and_unload().state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-6, atol=1e-6, msg=name)


def test_only_the_adapters_train_and_the_reference_stays_the_starting_model(tiny_model_dir):
    starting = _logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    policy = _lora_policy(tiny_model_dir)
    assert policy.reference is None  # no second copy: the base with adapters off
    trained = {n for n, p in policy.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_A" in n or "lora_B" in n for n in trained)
    frozen = {n: p.detach().clone() for n, p in policy.model.named_parameters() if not p.requires_grad}
    _train(policy)
    assert all(torch.equal(p, frozen[n]) for n, p in policy.model.named_parameters() if not p.requires_grad)
    assert not torch.allclose(_logits(policy.model), starting, atol=1e-3)
    with policy.reference_model() as reference:
        assert not reference.training
        torch.testing.assert_close(_logits(reference), starting)
    assert policy.model.training  # mode and adapters are back after the reference pass
    assert not torch.allclose(_logits(policy.model), starting, atol=1e-3)
    assert "M trained" in describe_parameters(policy)


def test_export_is_the_merged_model_and_resumes_from_the_adapter(tiny_model_dir, tmp_path):
    policy = _lora_policy(tiny_model_dir, dropout=0.1)
    _train(policy)
    policy.model.eval()
    adapted_logits = _logits(policy.model)
    out = policy.export_hf(tmp_path / "export")

    merged = AutoModelForCausalLM.from_pretrained(out)  # an ordinary HF model
    assert not any("lora" in name for name in merged.state_dict())
    torch.testing.assert_close(_logits(merged), adapted_logits, rtol=1e-5, atol=1e-5)
    # The adapter folder is PEFT's own format, usable without posttrain.
    with_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / ADAPTER_DIR)
    torch.testing.assert_close(_logits(with_peft.eval()), adapted_logits, rtol=1e-5, atol=1e-5)
    # The generators get the same weights as the export.
    state = policy.full_state_dict()
    assert state.keys() == merged.state_dict().keys()

    resumed = _lora_policy(tiny_model_dir, weights_path=out, dropout=0.1)
    resumed.model.eval()
    torch.testing.assert_close(_logits(resumed.model), adapted_logits)
    assert {n for n, p in resumed.model.named_parameters() if p.requires_grad} == \
        {n for n, p in policy.model.named_parameters() if p.requires_grad}
    with resumed.reference_model() as reference:  # the untouched base, not the merged export
        torch.testing.assert_close(_logits(reference),
                                   _logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir)))


def test_a_reward_model_trains_its_new_head_whole(tiny_model_dir, tmp_path):
    loader = functools.partial(load_reward_model, pad_token_id=0)
    torch.manual_seed(0)
    policy = _lora_policy(tiny_model_dir, model_loader=loader, with_reference=False)
    trained = {n for n, p in policy.model.named_parameters() if p.requires_grad}
    assert any(n.startswith("score.modules_to_save") for n in trained)
    assert not any("score" in n and "lora" in n for n in trained)
    for _ in range(3):
        policy.train_step([{"input_ids": IDS}], lambda model, b: -model(**b).logits.float().mean())
    policy.model.eval()
    scores = _logits(policy.model)
    out = policy.export_hf(tmp_path / "rm")
    reloaded = AutoModelForSequenceClassification.from_pretrained(out)
    torch.testing.assert_close(_logits(reloaded), scores, rtol=1e-5, atol=1e-5)


def test_target_modules_that_do_not_exist_are_a_config_error(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ConfigError, match=r"policy\.lora\.target_modules=\['attention'\]"):
        add_lora(model, LoRAConfig(enabled=True, target_modules=["attention"]))


@pytest.mark.parametrize(("targets", "message"), [(["lm_head"], "shares its weights"),
                                                   (["embed_tokens"], r"\(Embedding\) is not a torch.nn.Linear")])
def test_adapters_that_could_not_be_merged_are_a_config_error(tiny_model_dir, targets, message):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ConfigError, match=message):
        add_lora(model, LoRAConfig(enabled=True, target_modules=targets))


def test_excluded_modules_take_no_adapters(tiny_model_dir):
    policy = _lora_policy(tiny_model_dir, exclude_modules=["down_proj", "o_proj"])
    trained = {n.split(".lora_")[0].rsplit(".", 1)[1] for n, p in policy.model.named_parameters() if p.requires_grad}
    assert trained == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}


def test_chosen_target_modules_only(tiny_model_dir):
    policy = _lora_policy(tiny_model_dir, target_modules=["q_proj", "v_proj"])
    trained = {n.split(".lora_")[0].rsplit(".", 1)[1] for n, p in policy.model.named_parameters() if p.requires_grad}
    assert trained == {"q_proj", "v_proj"}
    assert lora_scaling(policy.cfg.lora) == 2.0


def test_in_bfloat16_the_frozen_base_is_held_in_bfloat16_and_the_adapters_train_in_float32(tiny_model_dir, tmp_path):
    cfg = PolicyConfig(model_name=str(tiny_model_dir), device="cpu", precision="bfloat16",
                       lora=LoRAConfig(enabled=True, dim=4), optimizer=OptimizerConfig(lr=1e-2))
    policy = Policy(cfg, total_steps=3, with_reference=True)
    dtypes = {(p.requires_grad, p.dtype) for p in policy.model.parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}
    _train(policy)
    policy.model.eval()
    with torch.no_grad(), policy.autocast():
        adapted_logits = policy.model(input_ids=IDS).logits.float()
        with policy.reference_model() as reference:
            assert (reference(input_ids=IDS).logits.float() - adapted_logits).abs().max() > 0.5
    merged = AutoModelForCausalLM.from_pretrained(policy.export_hf(tmp_path / "export"))
    assert merged.dtype == torch.bfloat16
    with torch.no_grad():  # the merge rounds W + BA to bfloat16 once
        torch.testing.assert_close(merged(input_ids=IDS).logits.float(), adapted_logits, rtol=0, atol=0.02)


@pytest.mark.parametrize("saved, resumed", [(0.1, 0.3), (0.0, 0.2), (0.2, 0.0)])
def test_a_resumed_run_trains_with_its_own_dropout(tiny_model_dir, tmp_path, saved, resumed):
    policy = _lora_policy(tiny_model_dir, dropout=saved)
    policy.save(tmp_path)
    restored = _lora_policy(tiny_model_dir, weights_path=tmp_path / "model", dropout=resumed)
    rates = {m.p if isinstance(m, torch.nn.Dropout) else 0.0
             for name, m in restored.model.named_modules() if name.endswith("lora_dropout.default")}
    assert rates == {resumed}
    torch.testing.assert_close(restored.full_state_dict(), policy.full_state_dict())

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.config import PolicyConfig
from posttrain.train import model as model_module
from posttrain.train.model import compile_decoder_layers, decoder_layers
from posttrain.train.policy import Policy


def test_decoder_layers_are_the_models_repeated_blocks(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert decoder_layers(model) == list(model.model.layers)


def test_torch_compile_compiles_every_decoder_layer_of_the_policy_and_its_reference(tiny_model_dir):
    cfg = PolicyConfig(model_name=str(tiny_model_dir), torch_compile=True)
    policy = Policy(cfg, 10, device=torch.device("cpu"), with_reference=True)
    for model in (policy.model, policy.reference):
        assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
        assert model._compiled_call_impl is None  # the LM head and its hook stay eager
    eager = Policy(PolicyConfig(model_name=str(tiny_model_dir)), 10, device=torch.device("cpu"))
    assert all(layer._compiled_call_impl is None for layer in eager.model.model.layers)


def test_a_model_without_named_decoder_layers_cannot_be_compiled():
    with pytest.raises(ValueError, match=r"policy\.torch_compile: Linear names no decoder-layer classes"):
        compile_decoder_layers(torch.nn.Linear(2, 2), torch.device("cpu"))


def test_compiling_on_cpu_without_a_cpp_compiler_is_refused(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(model_module.shutil, "which", lambda name: None)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(RuntimeError, match=r"policy\.torch_compile on CPU needs a C\+\+ compiler"):
        compile_decoder_layers(model, torch.device("cpu"))
    assert all(layer._compiled_call_impl is None for layer in model.model.layers)

import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.config import PolicyConfig
from posttrain.train import model as model_module
from posttrain.train.model import compile_decoder_layers, decoder_layers, load_tokenizer
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


# --------------------------------------------------------------------------- resolve_model_source


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """An empty Hugging Face cache, and the hub-reachability answer asked afresh in each test."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    model_module._hub_unreachable.cache_clear()
    yield constants
    model_module._hub_unreachable.cache_clear()


def _fails_at_once(name: str, pattern: str) -> None:
    start = time.monotonic()
    with pytest.raises(model_module.ModelSourceError, match=pattern):
        load_tokenizer(PolicyConfig(model_name=name))
    assert time.monotonic() - start < 5  # not transformers' ~30 s of retries


def test_an_example_configs_missing_model_names_the_command_that_builds_it(tmp_path, monkeypatch, hub):
    monkeypatch.chdir(tmp_path)
    _fails_at_once("runs/tiny-model", re.escape("'runs/tiny-model' (policy.model_name) is not a local folder yet: "
                                                "`posttrain tiny-model runs/tiny-model --size demo` builds it"))
    _fails_at_once("./runs/sft_tiny/checkpoints/final_model", r"`posttrain sft --config sft_tiny` writes it")


def test_a_path_that_is_no_folder_is_neither_a_folder_nor_a_hub_id(tmp_path, hub):
    _fails_at_once(str(tmp_path / "missing"), r"is neither a local folder nor a Hugging Face hub id")
    (tmp_path / "weights.bin").write_text("")
    _fails_at_once(str(tmp_path / "weights.bin"), r"is neither a local folder \(it is a file\) nor a Hugging Face")


def test_a_hub_id_fails_at_once_when_the_hub_is_offline_or_out_of_reach(hub, monkeypatch):
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    _fails_at_once("org/not-cached", r"'org/not-cached' \(policy.model_name\) is neither a local folder nor in the "
                                     r"Hugging Face cache, and the hub is not reachable \(HF_HUB_OFFLINE is set\)")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    _fails_at_once("org/not-cached", r"the hub is not reachable \(http://127\.0\.0\.1:9: ")


def test_a_cached_hub_id_loads_from_the_cache_when_the_hub_is_offline(hub, monkeypatch, tiny_model_dir):
    snapshot = Path(hub.HF_HUB_CACHE) / "models--org--tiny" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_model_dir, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    assert model_module.resolve_model_source("org/tiny") == str(snapshot)
    assert load_tokenizer(PolicyConfig(model_name="org/tiny")).chat_template

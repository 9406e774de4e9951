"""The example configs ship in the package: `--config NAME`, `posttrain examples`, and what the
error for a missing example model says."""

import importlib.resources
import re
import time
from pathlib import Path

import pytest
import yaml

from posttrain.cli import main
from posttrain.train.model import EXAMPLE_MODEL_BUILDERS

CONFIGS = importlib.resources.files("posttrain") / "examples" / "configs"
NAMES = sorted(f.name.removesuffix(".yaml") for f in CONFIGS.iterdir() if f.name.endswith(".yaml"))


def test_the_configs_are_package_data_and_the_clones_examples_folder_is_the_same_files():
    assert {"sft_tiny", "dpo_tiny", "rm_tiny", "grpo_tiny", "eval_math"} <= set(NAMES)
    clone = Path(__file__).parents[2] / "examples" / "configs"
    assert sorted(p.stem for p in clone.glob("*.yaml")) == NAMES
    assert clone.resolve() == Path(str(CONFIGS)).resolve()  # one copy: examples/configs links to the package's


def test_config_takes_a_built_in_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no runs/tiny-model here
    start = time.monotonic()
    assert main(["sft", "--config", "sft_tiny"]) == 2
    assert time.monotonic() - start < 10  # no hub retries
    err = " ".join(capsys.readouterr().err.split())
    assert "'runs/tiny-model' (policy.model_name) is not a local folder yet: " \
           "`posttrain tiny-model runs/tiny-model --size demo` builds it" in err


def test_an_unknown_config_name_lists_the_built_in_ones(capsys):
    with pytest.raises(SystemExit) as info:
        main(["dpo", "--config", "dpo_tinyy"])
    assert info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "'dpo_tinyy' is neither a config file nor a built-in config; the built-in ones are " \
           f"{', '.join(NAMES)}" in err


def test_examples_copies_the_configs_and_keeps_an_edited_copy(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["examples"]) == 0
    out = capsys.readouterr().out
    for name in NAMES:
        copy = tmp_path / "examples" / "configs" / f"{name}.yaml"
        assert copy.read_text() == (CONFIGS / f"{name}.yaml").read_text()
        assert f"examples/configs/{name}.yaml" in out
    assert "examples/configs/sft_tiny.yaml  SFT of the tiny local model" in out

    edited = tmp_path / "examples" / "configs" / "sft_tiny.yaml"
    edited.write_text("# mine\n")
    assert main(["examples"]) == 2
    assert re.search(r"would be replaced: .*sft_tiny\.yaml; pass --overwrite", " ".join(capsys.readouterr().err.split()))
    assert edited.read_text() == "# mine\n"
    assert main(["examples", "--overwrite"]) == 0
    assert edited.read_text() == (CONFIGS / "sft_tiny.yaml").read_text()
    assert main(["examples", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere" / "configs" / "grpo_tiny.yaml").is_file()


@pytest.mark.parametrize("name", NAMES)
def test_every_local_model_an_example_config_starts_from_has_a_builder(name):
    """The error for a missing example model names the command that makes it (EXAMPLE_MODEL_BUILDERS)."""
    cfg = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    models = [section.get("model_name") for section in (cfg.get("policy", {}), cfg.get("generation", {}))]
    for model in filter(None, models):
        path = Path(model)
        if path.parts[0] == "runs":
            assert any(folder in (path, *path.parents) for folder in EXAMPLE_MODEL_BUILDERS), model

from posttrain.cli import main


def test_unknown_key_exits_with_a_message_naming_it(capsys):
    assert main(["sft", "policy.model_name=x", "sft.max_num_step=3"]) == 2
    err = capsys.readouterr().err
    assert "sft.max_num_step" in err and "sft.max_num_steps" in err


def test_missing_config_file_is_reported(capsys, tmp_path):
    assert main(["sft", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_missing_model_path_is_reported(capsys, tmp_path):
    code = main(["sft", f"policy.model_name={tmp_path / 'no-model'}", f"logger.log_dir={tmp_path}",
                 f"checkpointing.checkpoint_dir={tmp_path / 'ck'}"])
    assert code == 2
    assert "no-model" in capsys.readouterr().err


def test_tiny_model_command_builds_a_loadable_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert main(["tiny-model", str(tmp_path / "m"), "--arch", "llama"]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m").config.model_type == "llama"
    assert AutoTokenizer.from_pretrained(tmp_path / "m").chat_template


def test_yaml_holding_a_number_is_reported_with_its_file(capsys, tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("3\n")
    assert main(["sft", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "cfg.yaml" in "".join(err.split()) and "mapping of sections" in " ".join(err.split())

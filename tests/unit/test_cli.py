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

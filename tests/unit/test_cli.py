import pytest

from posttrain.cli import main
from posttrain.config import ConfigError


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


def test_a_reward_fn_that_cannot_be_imported_fails_before_ray_starts(capsys, monkeypatch, tmp_path):
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started before the env config was checked")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(ray, "remote", no_ray)
    code = main(["grpo", "policy.model_name=x", "env.reward_fn=nonexistent_module:fn", f"logger.log_dir={tmp_path}",
                 f"checkpointing.checkpoint_dir={tmp_path / 'ck'}"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2
    assert "env.reward_fn='nonexistent_module:fn': cannot import module 'nonexistent_module'" in err


def _actor_error(method: str, cause: Exception):
    """What ray.get raises for an exception inside an actor method (built without starting Ray)."""
    from ray.exceptions import RayTaskError

    remote_traceback = ("Traceback (most recent call last):\n  File \"posttrain/envs/worker.py\", line 20, in step\n"
                        f"{type(cause).__module__}.{type(cause).__name__}: {cause}")
    return RayTaskError(method, remote_traceback, cause, proctitle=f"ray::{method}", pid=1, ip="127.0.0.1")


def _actor_init_error(cause: Exception):
    """What ray.get raises when the actor's __init__ raised: the actor is dead, the cause is only text."""
    from ray.exceptions import ActorDiedError

    return ActorDiedError(_actor_error("EnvironmentWorker.__init__", cause))


@pytest.mark.parametrize(("make_error", "message"), [
    (lambda: _actor_error("EnvironmentWorker.step", ValueError(
        "EchoEnvironment.step returned rewards of length 2 for 1 samples")).as_instanceof_cause(),
     "error: ValueError: EchoEnvironment.step returned rewards of length 2 for 1 samples (raised in the Ray worker "
     "EnvironmentWorker.step); full traceback in "),
    (lambda: _actor_init_error(ConfigError("env.reward_fn='m:fn': cannot import module 'm'")),
     "error: posttrain.config.loader.ConfigError: env.reward_fn='m:fn': cannot import module 'm' (raised in the "
     "Ray worker EnvironmentWorker.__init__); full traceback in "),
])
def test_an_error_inside_a_ray_actor_ends_the_run_with_its_cause(capsys, monkeypatch, tmp_path, make_error, message):
    def run_sft(cfg):
        raise make_error()

    monkeypatch.setattr("posttrain.loops.sft.run_sft", run_sft)
    command = ["sft", "policy.model_name=x", f"logger.log_dir={tmp_path}"]
    assert main(command) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert err.startswith(message) and "error.log" in err and "Traceback" not in err
    assert "posttrain/envs/worker.py" in (tmp_path / "error.log").read_text()  # the actor's own frames

    assert main(["--debug", *command]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_a_dead_worker_ends_the_run_with_one_line(capsys, monkeypatch, tmp_path):
    from posttrain.cluster import WorkerDiedError

    def run_sft(cfg):
        raise WorkerDiedError("worker group 'policy': rank 1 (on node 10.0.0.2) died: gone")

    monkeypatch.setattr("posttrain.loops.sft.run_sft", run_sft)
    assert main(["sft", "policy.model_name=x", f"logger.log_dir={tmp_path}"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert err == "error: worker group 'policy': rank 1 (on node 10.0.0.2) died: gone"


def test_a_run_that_cannot_score_its_samples_ends_with_one_line(capsys, monkeypatch, tmp_path):
    from posttrain.envs.base import InvalidRolloutsError

    def run_sft(cfg):
        raise InvalidRolloutsError("100% of this step's samples could not be scored")

    monkeypatch.setattr("posttrain.loops.sft.run_sft", run_sft)
    assert main(["sft", "policy.model_name=x", f"logger.log_dir={tmp_path}"]) == 2
    assert " ".join(capsys.readouterr().err.split()) == "error: 100% of this step's samples could not be scored"


def test_an_unexpected_error_keeps_its_traceback(monkeypatch):
    def run_sft(cfg):
        raise RuntimeError("a bug")

    monkeypatch.setattr("posttrain.loops.sft.run_sft", run_sft)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["sft", "policy.model_name=x"])

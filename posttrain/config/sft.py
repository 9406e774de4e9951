"""SFT: the run config of `posttrain sft`."""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.config.loader import require
from posttrain.config.sections import (
    CheckpointingConfig,
    ClusterConfig,
    DataConfig,
    LoggerConfig,
    LoopConfig,
    PolicyConfig,
    check_common,
    check_loop,
)


@dataclass
class SFTConfig(LoopConfig):
    pass


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
        check_loop(self, "sft")
        require(not (p.sequence_packing.enabled and p.dynamic_batching.enabled),
                "policy.sequence_packing.enabled and policy.dynamic_batching.enabled are two ways of filling a "
                "micro-batch; enable one of them")
        for key in ("sequence_packing", "dynamic_batching"):
            budget = getattr(p, key).train_mb_tokens
            require(budget is None or budget >= p.max_total_sequence_length,
                    f"policy.{key}.train_mb_tokens ({budget}) must be at least policy.max_total_sequence_length "
                    f"({p.max_total_sequence_length}), or null, so that the longest sequence fits a micro-batch")
        check_common(self.policy, self.data, self.cluster, self.checkpointing)

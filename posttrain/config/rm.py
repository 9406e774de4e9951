"""Reward models: the run config of `posttrain rm`."""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.config.sections import (
    CheckpointingConfig,
    ClusterConfig,
    DataConfig,
    LoggerConfig,
    LoopConfig,
    PolicyConfig,
    check_common,
    check_loop,
    check_pair_batching,
)


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
        check_loop(self, "rm")
        check_pair_batching(p, "reward models")
        check_common(self.policy, self.data, self.cluster, self.checkpointing)

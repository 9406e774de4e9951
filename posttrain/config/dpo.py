"""DPO: the run config of `posttrain dpo` and its loss settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from posttrain.config.loader import positive, require
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
        check_loop(self, "dpo")
        positive(self, "dpo.reference_policy_kl_penalty")
        require(d.sft_loss_weight >= 0, f"dpo.sft_loss_weight must be >= 0, got {d.sft_loss_weight}")
        require(0 <= d.label_smoothing < 0.5, f"dpo.label_smoothing must be in [0, 0.5), got {d.label_smoothing}")
        require(d.label_smoothing == 0 or d.loss_type in ("sigmoid", "robust", "simpo"),
                f"dpo.label_smoothing applies to loss_type sigmoid, robust or simpo, not {d.loss_type!r}")
        require(d.loss_type not in REFERENCE_FREE_DPO_LOSSES or d.preference_average_log_probs,
                f"dpo.loss_type={d.loss_type} is defined on per-token mean log-probs: set "
                "dpo.preference_average_log_probs=true")
        require(d.simpo_gamma >= 0, f"dpo.simpo_gamma must be >= 0, got {d.simpo_gamma}")
        check_pair_batching(p, "DPO")
        check_common(self.policy, self.data, self.cluster, self.checkpointing)

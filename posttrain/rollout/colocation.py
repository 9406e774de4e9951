"""Colocated generators and trainer taking turns on the same GPUs.

A step generates, then trains. Before training, the generators go to sleep (vLLM's sleep mode at
level 2: the KV cache and the weights freed, since a weight sync always follows the update) and
the policy takes its optimizer state back onto the GPU; before generating again, the policy moves
its optimizer state off the GPU and frees its gradients and cache, and the generators wake up,
ready for the sync that brings them the new weights. On a CPU both sides only switch phase:
there is no device memory to hand over. Not colocated, both calls do nothing.
"""

from __future__ import annotations

import time

from posttrain.cluster import WorkerGroup
from posttrain.train.policy_group import PolicyGroup

# The generators' sleep before an update: weights dropped too, as the sync after it replaces them.
SLEEP_LEVEL = 2


class Colocation:
    def __init__(self, policy: PolicyGroup, generators: WorkerGroup, enabled: bool):
        self.policy, self.generators, self.enabled = policy, generators, enabled
        self.phase = "generation"  # the generators start awake, the policy with no optimizer state yet

    def prepare_for_training(self) -> dict[str, float]:
        """Generators asleep, optimizer state on the policy's device; only before an update (and its sync)."""
        if not self.enabled or self.phase == "training":
            return {}
        start = time.perf_counter()
        self.generators.call_all("sleep", SLEEP_LEVEL)
        self.policy.onload_optimizer()
        self.phase = "training"
        return {"time/prepare_for_training_s": time.perf_counter() - start}

    def prepare_for_generation(self) -> dict[str, float]:
        """Optimizer state off the GPU, generators awake; before the weight sync that follows an update."""
        if not self.enabled or self.phase == "generation":
            return {}
        start = time.perf_counter()
        self.policy.offload_optimizer()
        self.generators.call_all("wake_up")
        self.phase = "generation"
        return {"time/prepare_for_generation_s": time.perf_counter() - start}

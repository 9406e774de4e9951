"""FSDP2 across the data-parallel ranks of a process group (gloo on CPU, NCCL on GPU).

Each rank keeps 1/N of every parameter, gradient and optimizer state. Every decoder layer is its
own FSDP unit, so a rank holds one layer's gathered weights at a time; the root unit holds the
rest (embeddings, final norm, LM head). Whole-model state (checkpoints, exports, weights for the
generators) is gathered to CPU on rank 0, so what is written is an ordinary Hugging Face folder
that any world size can resume from.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from posttrain.train.model import decoder_layers

_FULL_ON_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard_model(model: torch.nn.Module, process_group: dist.ProcessGroup, device: torch.device) -> None:
    """Shard `model` in place across the ranks of `process_group`."""
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder-layer classes (`_no_split_modules`), so it "
                         "cannot be split into FSDP2 units; train it with one worker")
    mesh = DeviceMesh.from_group(process_group, device.type)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for unit in model.modules():
        if isinstance(unit, FSDPModule):
            # Losses are divided by the *global* normaliser, so rank gradients must add up, not average;
            # as a plain sum, which gloo supports (it has no pre-scaled sum).
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU on rank 0 (empty elsewhere); every rank must call it."""
    return get_model_state_dict(model, options=_FULL_ON_CPU)


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The whole optimizer state on CPU on rank 0 (empty elsewhere); every rank must call it."""
    return get_optimizer_state_dict(model, optimizer, options=_FULL_ON_CPU)


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Each rank takes its shard of a whole (unsharded) optimizer state."""
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))

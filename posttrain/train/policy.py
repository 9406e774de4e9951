"""The trainable policy: model, tokenizer, optimizer and schedule on one explicit device.

Nothing here is global, so a Policy can live inside a Ray actor, one per data-parallel rank.
Given a process group of several ranks, the model is sharded with FSDP2 and each rank trains on
its shard of the global batch; gradients are summed across ranks, and since every loss is already
divided by the *global* normaliser, the sum is exactly the single-process gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from posttrain.config import PolicyConfig
from posttrain.train.fsdp import (
    full_model_state,
    full_optimizer_state,
    is_sharded,
    load_full_optimizer_state,
    shard_model,
)
from posttrain.train.logprobs import supports_shared_prefix
from posttrain.train.lora import (
    ADAPTER_DIR,
    add_lora,
    iter_merged,
    lora_scaling,
    merged_state_dict,
    peft_named,
)
from posttrain.train.model import DTYPES, compile_decoder_layers, load_model, load_tokenizer, resolve_device
from posttrain.train.optim import build_optimizer, build_scheduler, move_optimizer_state

# (model, micro-batch) -> loss, or (loss, metrics): the loss already divided by the global batch's
# normaliser, so that micro-batch losses, and their metrics, add up to the batch's values.
Objective = Callable[[torch.nn.Module, dict[str, torch.Tensor]],
                     torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]]
# (model, micro-batch) -> a tensor computed without gradients, such as reference log-probs
Scorer = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]
ModelLoader = Callable[..., torch.nn.Module]  # (cfg, device, path=...) -> model, like `load_model`


def add_metrics(total: dict[str, float], new: dict[str, float]) -> dict[str, float]:
    """Adds `new` into `total` and returns it: how metrics combine over micro-batches, ranks and
    optimizer steps. Values are sums (divided by a count when logged), except those whose name
    ends in `_max`, which are maxima."""
    for name, value in new.items():
        if name not in total:
            total[name] = value
        elif name.endswith("_max"):
            total[name] = max(total[name], value)
        else:
            total[name] += value
    return total


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a DTensor is gathered from every rank of its mesh, on their device)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def describe_parameters(policy) -> str:
    """For the start-up line: e.g. "1.80M parameters", with LoRA "1.80M parameters, 0.05M trained"."""
    text = f"{policy.num_parameters / 1e6:.2f}M parameters"
    if policy.num_trained_parameters < policy.num_parameters:
        text += f", {policy.num_trained_parameters / 1e6:.2f}M trained"
    return text


class Policy:
    def __init__(self, cfg: PolicyConfig, total_steps: int, *, tokenizer=None,
                 weights_path: str | Path | None = None, device: torch.device | None = None,
                 process_group: dist.ProcessGroup | None = None, model_loader: ModelLoader = load_model,
                 with_reference: bool = False):
        self.cfg = cfg
        self.device = device or resolve_device(cfg.device)
        self.process_group = process_group
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg)
        # `model_loader` swaps the causal LM for another head (the reward model's scalar score).
        # With LoRA, `self.model` is still the transformers model (PEFT's layers inside) and
        # `self.adapted` the PEFT wrapper; a resumed run loads the untouched base and its saved adapter.
        self.adapted = None
        if cfg.lora.enabled:
            # The frozen base is never updated, so it needs no float32 master copy: it is held in
            # the compute precision (half the memory in bfloat16); what trains is float32.
            self.model = model_loader(cfg, self.device, dtype=DTYPES[cfg.precision])
            adapter = Path(weights_path) / ADAPTER_DIR if weights_path else None
            self.adapted = add_lora(self.model, cfg.lora, adapter_dir=adapter)
        else:
            self.model = model_loader(cfg, self.device, path=str(weights_path) if weights_path else None)
        self.rank = dist.get_rank(process_group) if process_group is not None else 0
        sharded = process_group is not None and dist.get_world_size(process_group) > 1
        if cfg.torch_compile:
            compile_decoder_layers(self.model, self.device)
        if sharded:
            shard_model(self.model, process_group, self.device)  # before the optimizer: it holds the shards
        # The frozen reference of DPO and of GRPO's KL penalty: always the starting model
        # (policy.model_name), also when resuming; never trained, so kept in the compute precision.
        # With LoRA it is the policy's own frozen base, adapters off (see `reference_model`).
        self.with_reference = with_reference
        self.reference = None
        if with_reference and self.adapted is None:
            self.reference = model_loader(cfg, self.device, dtype=DTYPES[cfg.precision]).eval().requires_grad_(False)
            if cfg.torch_compile:
                compile_decoder_layers(self.reference, self.device)
            if sharded:
                shard_model(self.reference, process_group, self.device)
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        self.scheduler = build_scheduler(self.optimizer, cfg.scheduler, total_steps)
        # float16's narrow range flushes small gradients to zero; the loss is scaled up to keep them
        # (bfloat16 has float32's range and needs no scaling).
        self.grad_scaler = torch.amp.GradScaler(self.device.type) if cfg.precision == "float16" else None
        self.optimizer_offloaded = False  # see `offload_optimizer`

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def num_trained_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    @contextlib.contextmanager
    def reference_model(self) -> Iterator[torch.nn.Module]:
        """The frozen starting model, in eval mode: the loaded reference, or with LoRA the policy
        itself with its adapters switched off for the duration."""
        if self.adapted is None:
            yield self.reference
            return
        training = self.model.training
        self.model.eval()
        try:
            with self.adapted.disable_adapter():
                yield self.model
        finally:
            self.model.train(training)

    @property
    def supports_shared_prefix(self) -> bool:
        return supports_shared_prefix(self.model)

    @property
    def device_name(self) -> str:
        """"cpu", or the GPU's name (what the throughput metrics look its peak up by)."""
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"

    @property
    def model_config(self):
        """The model's transformers config (architecture sizes, attention implementation)."""
        return self.model.config

    def autocast(self):
        """Mixed precision: float32 master weights, `policy.precision` for the forward pass."""
        if self.cfg.precision == "float32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.cfg.precision])

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _losses(self, micro_batches: list[dict[str, torch.Tensor]], objective: Objective, real: int | None,
                metrics: dict[str, float]) -> Iterator[torch.Tensor]:
        """Each micro-batch's loss, its metrics added into `metrics` (see `add_metrics`). Micro-batches
        from index `real` on are fillers: they run (FSDP2 ranks take part in every gather) but count
        for nothing."""
        for i, batch in enumerate(micro_batches):
            with self.autocast():
                out = objective(self.model, self._to_device(batch))
            loss, batch_metrics = out if isinstance(out, tuple) else (out, {})
            if real is not None and i >= real:
                yield loss * 0.0
                continue
            add_metrics(metrics, {name: float(value) for name, value in batch_metrics.items()})
            yield loss

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]], objective: Objective,
                   real: int | None = None) -> dict:
        """One optimizer step over the micro-batches of a global batch; the micro-batches from index
        `real` on are fillers.

        Objectives divide by the global normaliser, so summing the micro-batch gradients gives the
        gradient of the global-batch loss. Sharded ranks must pass the same number of micro-batches
        (each forward and backward gathers and reduces with the others). Returns the loss summed
        over ranks, the grad norm, the learning rate and this rank's summed `metrics`.
        """
        self.onload_optimizer()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        metrics: dict[str, float] = {}
        # Sharded gradients are reduce-scattered after every micro-batch (FSDP2's default): holding
        # them unsharded until the last one would need a whole model's gradients on every rank.
        for loss in self._losses(micro_batches, objective, real, metrics):
            (self.grad_scaler.scale(loss) if self.grad_scaler else loss).backward()
            total += loss.detach()
        if self.process_group is not None:
            dist.all_reduce(total, group=self.process_group)
        if self.grad_scaler:
            self.grad_scaler.unscale_(self.optimizer)
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor when the parameters are sharded
            grad_norm = grad_norm.full_tensor()
        lr = self.scheduler.get_last_lr()[0]
        if self.grad_scaler:  # skips the step when the scaled gradients overflowed, and adapts the scale
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            # A NaN or infinite gradient would write itself into every weight (and every later
            # checkpoint), so the step is refused; the norm is the same on every rank.
            if not torch.isfinite(grad_norm):
                self.optimizer.zero_grad(set_to_none=True)
                raise FloatingPointError(
                    f"the gradient norm is {float(grad_norm)} (loss {total.item()}) at optimizer step "
                    f"{self.scheduler.last_epoch + 1}: the step was not taken and the weights are as before "
                    "it. Lower policy.optimizer.lr, keep policy.max_grad_norm set, or check the objective "
                    "and the data of this step")
            self.optimizer.step()
        self.scheduler.step()
        return {"loss": total.item(), "grad_norm": float(grad_norm), "lr": lr, "metrics": metrics}

    @torch.no_grad()
    def evaluate(self, micro_batches: list[dict[str, torch.Tensor]], objective: Objective,
                 real: int | None = None) -> dict:
        """The objective summed over micro-batches (fillers from index `real` on), in eval mode and
        without gradients: the loss summed over ranks, and this rank's summed `metrics`."""
        self.model.eval()
        total = torch.zeros((), device=self.device)
        metrics: dict[str, float] = {}
        for loss in self._losses(micro_batches, objective, real, metrics):
            total += loss
        if self.process_group is not None:
            dist.all_reduce(total, group=self.process_group)
        return {"loss": total.item(), "metrics": metrics}

    def close(self) -> None:
        """Nothing to release in-process (a PolicyGroup stops its actors here)."""

    def offload_optimizer(self) -> None:
        """Makes room on the GPU for colocated generators: the gradients freed, the optimizer state
        moved to the CPU and the allocator's cache released. The weights stay (the generators'
        next sync reads them). On a CPU only the gradients go. `onload_optimizer` undoes it."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cpu" or self.optimizer_offloaded:
            return
        move_optimizer_state(self.optimizer, "cpu")
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        self.optimizer_offloaded = True

    def onload_optimizer(self) -> None:
        """The optimizer state back on this policy's device (a no-op unless it was offloaded)."""
        if self.optimizer_offloaded:
            move_optimizer_state(self.optimizer, self.device)
            self.optimizer_offloaded = False

    @contextlib.contextmanager
    def _optimizer_on_device(self) -> Iterator[None]:
        """The optimizer state on the device for the duration, offloaded again after if it was."""
        offloaded = self.optimizer_offloaded
        self.onload_optimizer()
        try:
            yield
        finally:
            if offloaded:
                self.offload_optimizer()

    def reference_outputs(self, micro_batches: list[dict[str, torch.Tensor]], fn: Scorer,
                          real: int | None = None) -> list[torch.Tensor]:
        """`fn(reference model, micro-batch)` on the CPU for each micro-batch before index `real`
        (the fillers after it run only to take part in the FSDP2 gathers)."""
        with self.reference_model() as reference:
            return self._outputs(reference, micro_batches, fn, real)

    def policy_outputs(self, micro_batches: list[dict[str, torch.Tensor]], fn: Scorer,
                       real: int | None = None) -> list[torch.Tensor]:
        """`fn(current model, micro-batch)` like `reference_outputs`, in eval mode: scores of the
        weights as they are before an update (GRPO's old log-probs)."""
        training = self.model.training
        self.model.eval()
        try:
            return self._outputs(self.model, micro_batches, fn, real)
        finally:
            self.model.train(training)

    @torch.no_grad()
    def _outputs(self, model: torch.nn.Module, micro_batches: list[dict[str, torch.Tensor]], fn: Scorer,
                 real: int | None) -> list[torch.Tensor]:
        outputs = []
        for batch in micro_batches:
            with self.autocast():
                outputs.append(fn(model, self._to_device(batch)).cpu())
        return outputs[:real]

    def generator_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The weights for the generation backends one tensor at a time, under the plain model's
        names, LoRA merged, in the compute precision on this rank's device. A sharded tensor is
        gathered as it is reached, so every rank must iterate. Tied weights come under each of
        their names: vLLM reloads its output head only from the head's own name."""
        dtype = DTYPES[self.cfg.precision]
        state = self.model.state_dict()
        tensors = (iter_merged(state, lora_scaling(self.cfg.lora), _whole) if self.adapted is not None
                   else ((name, _whole(tensor)) for name, tensor in state.items()))
        for name, tensor in tensors:
            yield name, tensor.detach().to(dtype)

    def generator_weights(self) -> dict[str, torch.Tensor]:
        """`generator_tensors` whole on the CPU, on rank 0 (empty on the others; every rank must call it)."""
        weights = {}
        for name, tensor in self.generator_tensors():
            if self.rank == 0:
                weights[name] = tensor.cpu()
        return weights

    # ------------------------------------------------------------------ persistence

    def save(self, directory: Path) -> None:
        """Model + tokenizer in Hugging Face format, plus optimizer and schedule state, all whole
        (unsharded), written by rank 0; every rank must call it."""
        self.export_hf(directory / "model")
        with self._optimizer_on_device():  # the gather of a sharded state runs on the device's group
            optimizer_state = (full_optimizer_state(self.model, self.optimizer) if is_sharded(self.model)
                               else self.optimizer.state_dict())
        if self.rank != 0:
            return
        torch.save(optimizer_state, directory / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), directory / "scheduler.pt")
        if self.grad_scaler:
            torch.save(self.grad_scaler.state_dict(), directory / "grad_scaler.pt")

    def load_training_state(self, directory: Path) -> None:
        """Optimizer and schedule state; the weights were loaded at construction (`weights_path`).
        Every file goes through torch's restricted unpickler: one planted there cannot run code."""
        optimizer_state = torch.load(directory / "optimizer.pt", map_location="cpu" if is_sharded(self.model)
                                     else self.device, weights_only=True)
        if is_sharded(self.model):
            load_full_optimizer_state(self.model, self.optimizer, optimizer_state)
        else:
            self.optimizer.load_state_dict(optimizer_state)
        self.scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=True))
        if self.grad_scaler and (directory / "grad_scaler.pt").is_file():
            self.grad_scaler.load_state_dict(torch.load(directory / "grad_scaler.pt", weights_only=True))

    def _own_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict, whole (gathered to CPU on rank 0, empty elsewhere, when sharded)."""
        return full_model_state(self.model) if is_sharded(self.model) else self.model.state_dict()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights under the plain model's names, LoRA merged in (gathered to CPU
        on rank 0 when sharded; every rank must call it)."""
        state = self._own_state_dict()
        if self.adapted is None:
            return state
        return merged_state_dict(state, lora_scaling(self.cfg.lora))

    def export_hf(self, directory: str | Path) -> Path:
        """A Hugging Face folder, written by rank 0; every rank must call it. With LoRA the weights
        are merged, and the adapter is saved in PEFT's format in its `adapter/` subfolder."""
        directory = Path(directory)
        if self.adapted is None and not is_sharded(self.model):
            self.model.save_pretrained(directory)
        else:
            state = self._own_state_dict()
            if self.rank == 0:
                if self.adapted is not None:
                    self.adapted.save_pretrained(directory / ADAPTER_DIR, state_dict=peft_named(state))
                    state = merged_state_dict(state, lora_scaling(self.cfg.lora))
                self.model.save_pretrained(directory, state_dict=state)
        if self.rank == 0:
            self.tokenizer.save_pretrained(directory)
        return directory

"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the student: sharding, saving, clipping, and the
loop's `FSDPStrategy` (`opd_sdk.parallel.strategy`).

Use under an initialised process group (torchrun + `accelerate.PartialState`, or
`torch.distributed.init_process_group`); gloo on CPU works, NCCL on GPUs.

Gradients are SUMMED across ranks, not averaged: the trainer divides each rank's
loss by the GLOBAL batch's unit count, so the sum of the ranks' gradients is the
gradient of the whole batch (the same convention as `opd_sdk.parallel.distributed`).

`opd_sdk.rollout.logprobs.sequence_logprobs` detects a sharded model (`is_sharded`) and
runs the root forward, so FSDP's all-gather hooks fire (see there).

Sources: the `fully_shard` / `FSDPModule` docstrings and
`torch.distributed.checkpoint.state_dict` in torch 2.13; the decoder layers to
wrap are found the way accelerate's auto-wrap policy finds them
(`model._no_split_modules`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, fully_shard

from opd_sdk.errors import OPDError
from opd_sdk.parallel.distributed import Distributed

SHARDED_DIR = "sharded"  # a checkpoint's folder of model and optimizer shards


def is_sharded(model: torch.nn.Module) -> bool:
    """True when `fully_shard` was applied to the model's root."""
    return isinstance(model, FSDPModule)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules whose class is named in `_no_split_modules` of the (peft-unwrapped) model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def shard_model(model: torch.nn.Module, *, reshard_after_forward: bool = True) -> torch.nn.Module:
    """Apply `fully_shard` to every decoder layer, then to the root; returns the model (in place).

    Works for a Hugging Face causal LM and a peft-wrapped one (pass the PeftModel: the
    root is then the PeftModel). The root group holds what is outside the layers
    (embeddings, final norm, LM head), so tied embeddings stay in one group. After this
    the parameters are DTensors sharded on dim 0 and `param.grad` too (`.full_tensor()`
    gathers one); build the optimizer AFTER sharding. Gradients are summed across ranks
    (divide factor 1, SUM reduction).

    The root keeps its gathered weights after a forward until its backward (FSDP2's default
    for the root). A no-grad root forward (`generate`, a frozen read) not followed by a
    backward leaves them gathered, and stale once the optimizer steps: call `model.reshard()`
    after `optimizer.step()` (a no-op when already resharded); `sequence_logprobs` does it
    itself after a no-grad pass. Raises OPDError without an initialised process
    group, or when no decoder layer is found (the model names none in `_no_split_modules`).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise OPDError("shard_model needs an initialised torch.distributed process group (run under torchrun)")
    if is_sharded(model):
        return model
    layers = decoder_layers(model)
    if not layers:
        raise OPDError(f"no decoder layer found to shard in {type(model).__name__} (empty _no_split_modules)")
    for layer in layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward)
    fully_shard(model)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # SUM with no pre/post division: the default op for factor 1 is PREMUL_SUM, which gloo lacks.
            module.set_force_sum_reduction_for_comms(True)
    return model


def grad_norm_clip(params, max_norm: float) -> float:
    """Clip the gradients' global L2 norm to max_norm in place; returns the norm before clipping.

    With sharded (DTensor) gradients `torch.nn.utils.clip_grad_norm_` already reduces over the
    ranks and returns a DTensor; we gather it. Works unchanged for plain tensors.
    """
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state, full CPU tensors, on rank 0; {} on the other ranks.

    A collective: every rank must call it. Keys are the model's own `state_dict()` keys (a
    PeftModel's include `base_model.model.`), so rank 0 can pass it to the unwrapped
    model's `save_pretrained(path, state_dict=...)` (a PeftModel's keeps only the adapter).
    A tied parameter (LM head = embeddings) is kept under its first name only, as
    `save_pretrained` saves it.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    first: dict[int, str] = {}
    copies = {name for name, p in model.named_parameters(remove_duplicate=False) if first.setdefault(id(p), name) != name}
    return {k: v for k, v in state.items() if k not in copies}


def save_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: str | os.PathLike) -> None:
    """Save the model's and the optimizer's state SHARDED with torch.distributed.checkpoint (a
    collective), as accelerate saves FSDP state: each rank writes its own shard files into
    `folder` (rank 0 also `.metadata`); no rank ever holds the full state. `folder` must be
    visible to every rank (one machine, or a shared filesystem).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=os.fspath(folder))


def load_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: str | os.PathLike) -> None:
    """Load what `save_sharded` wrote into the sharded `model` and its `optimizer` (a collective).

    Raises FileNotFoundError (from DCP) when `folder` holds no checkpoint.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)  # the layout DCP loads into
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=os.fspath(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


class FSDPStrategy:
    """The student sharded over the ranks with FSDP2 (`shard_model`): each rank holds a shard of every
    parameter, gradient and optimizer state. FSDP sums the gradient shards in backward; clipping
    reduces the norm over the ranks (`grad_norm_clip`). Checkpoints hold model and optimizer as
    DCP shards in sharded/ (`save_sharded`), one set per rank, no rank ever holding the whole.

    Over several processes every forward and backward is a collective (lockstep), and so is
    generation (synced). At world size 1 it shards over the one process (a test of the layout).
    """

    shards_student = True

    def __init__(self, dist: Distributed, *, max_grad_norm: float | None = None) -> None:
        self.dist = dist
        self.max_grad_norm = max_grad_norm
        self.lockstep = self.synced_generation = dist.enabled
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.params: list[torch.nn.Parameter] = []

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Raises OPDError without a process group or a decoder layer to shard (`shard_model`)."""
        return shard_model(model.to(self.dist.device))

    def prepare_optimizer(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self.params = [p for group in optimizer.param_groups for p in group["params"]]

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def step(self) -> float | None:
        norm = grad_norm_clip(self.params, self.max_grad_norm) if self.max_grad_norm is not None else None
        self.optimizer.step()
        self.model.reshard()  # the root's gathered copy (kept by generate) is stale now
        return norm

    def save(self, folder: Path) -> None:
        save_sharded(self.model, self.optimizer, Path(folder) / SHARDED_DIR)

    def load(self, folder: Path) -> None:
        load_sharded(self.model, self.optimizer, Path(folder) / SHARDED_DIR)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return full_state_dict(self.model)

"""The parallel strategies: how the loop's backward, optimizer step and checkpoint state run.

One object per layout, chosen by `make_strategy` from what the launch asked for
(`Distributed`: world_size, fsdp, zero_stage):

    SingleProcess   one process, the whole student                       (this module)
    DataParallel    every rank the whole student; gradients summed       (this module)
    FSDPStrategy    the student sharded over the ranks (FSDP2)            (opd_sdk.parallel.fsdp)
    ZeroStrategy    DeepSpeed ZeRO-1/2: optimizer state (and gradients)   (opd_sdk.parallel.zero)
                    partitioned, every rank the whole student

The loop calls, in order (`opd_sdk.train.trainer`):

    model = strategy.prepare_model(model)             # this rank's device; sharding; before the optimizer
    strategy.prepare_optimizer(model, optimizer)      # the strategy steps and saves them from here on
    every step:   strategy.backward(loss, last)       # per micro-batch
                  grad_norm = strategy.step()         # gradient sync, clipping, optimizer step
    checkpoints:  strategy.save(folder) / strategy.load(folder)

Every rank's loss is its share of a sum divided by the GLOBAL batch's unit count, and
gradients are SUMMED over the ranks, so every layout's step is the one-process step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from opd_sdk.parallel.distributed import Distributed
from opd_sdk.parallel.fsdp import FSDPStrategy
from opd_sdk.parallel.zero import ZeroStrategy

OPTIMIZER_FILE = "optimizer.pt"  # a checkpoint's optimizer state, for a student every rank holds whole


class ParallelStrategy(Protocol):
    """What the loop calls to train over this launch's processes.

    dist: this process's place in the job. shards_student: the student's parameters are
    sharded (FSDP): a checkpoint keeps them in the strategy's shards, not as a whole model.
    lockstep: every backward is a collective, so every rank runs the same number of
    micro-batch passes (`opd_sdk.tensors.forward.idle_loss` where it has none).
    synced_generation: generation is a collective too (`synced_gpus`).
    """

    dist: Distributed
    shards_student: bool
    lockstep: bool
    synced_generation: bool

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The student on this rank's device, sharded where the layout shards it; call before
        anything copies it or builds an optimizer over its parameters."""

    def prepare_optimizer(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Take over the prepared student and its optimizer (an AdamW over the trainable parameters)."""

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Backpropagate one micro-batch's loss (scalar); last: the step's final micro-batch."""

    def step(self) -> float | None:
        """Sum the gradients over the ranks, clip them to max_grad_norm, step the optimizer; returns
        the global gradient L2 norm before clipping (None when not clipped)."""

    def save(self, folder: Path) -> None:
        """Every rank: write the optimizer state (and the student, where sharded) into a checkpoint
        folder that rank 0 created."""

    def load(self, folder: Path) -> None:
        """Every rank: load what `save` wrote. Raises FileNotFoundError when it is missing."""

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole student's weights for `save_pretrained` where the ranks hold shards of it (a
        collective: every rank calls); None where the model's own state is whole."""


class SingleProcess:
    """One process: plain backward, clipping and optimizer step; the optimizer state in optimizer.pt.

    max_grad_norm: clip the gradients' global L2 norm to it (None: no clipping).
    """

    shards_student = False
    lockstep = False
    synced_generation = False

    def __init__(self, dist: Distributed | None = None, *, max_grad_norm: float | None = None) -> None:
        self.dist = dist or Distributed()
        self.max_grad_norm = max_grad_norm
        self.optimizer: torch.optim.Optimizer | None = None
        self.params: list[torch.nn.Parameter] = []

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model  # where the caller put it

    def prepare_optimizer(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.params = [p for group in optimizer.param_groups for p in group["params"]]

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def step(self) -> float | None:
        norm = None
        if self.max_grad_norm is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm))
        self.optimizer.step()
        return norm

    def save(self, folder: Path) -> None:
        if self.dist.is_main:
            torch.save(self.optimizer.state_dict(), Path(folder) / OPTIMIZER_FILE)

    def load(self, folder: Path) -> None:
        device = self.params[0].device
        self.optimizer.load_state_dict(torch.load(Path(folder) / OPTIMIZER_FILE, map_location=device,
                                                  weights_only=True))

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        return None


class DataParallel(SingleProcess):
    """Several processes, each the whole student on its device; after the micro-batches the gradients
    are summed over the ranks (`Distributed.sum_gradients`, one bucketed all-reduce), so every
    rank takes the same optimizer step. Rank 0 saves the optimizer state."""

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.dist.device)

    def step(self) -> float | None:
        self.dist.sum_gradients(self.params)
        return super().step()


def make_strategy(dist: Distributed, *, max_grad_norm: float | None) -> ParallelStrategy:
    """The strategy for the launch `dist` describes: FSDP when it asks for FSDP, DeepSpeed ZeRO
    for a zero_stage, data parallel over several processes, else one process."""
    if dist.fsdp:
        return FSDPStrategy(dist, max_grad_norm=max_grad_norm)
    if dist.zero_stage:
        return ZeroStrategy(dist, max_grad_norm=max_grad_norm)
    if dist.enabled:
        return DataParallel(dist, max_grad_norm=max_grad_norm)
    return SingleProcess(dist, max_grad_norm=max_grad_norm)

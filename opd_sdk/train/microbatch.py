"""The micro-batch engine: one batch's loss as gradient accumulation over micro-batches and ranks.

    planned = plan_batch(...)                       # targets once, over the whole batch
    for each micro-batch of whole prompt groups in this rank's share:
        loss = micro_loss(...)                      # one policy forward, every term's loss
        strategy.backward(loss, last)               # at once: gradient accumulation
    metrics and loss summed over the ranks

Each term's loss is a sum divided by its whole-batch unit count, so the
micro-batch (and rank) losses add up to the one-big-batch loss exactly, and
their gradients to its gradient.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from opd_sdk.objectives.base import LossSums, loss_metrics, micro_loss, plan_batch
from opd_sdk.parallel.strategy import ParallelStrategy, SingleProcess
from opd_sdk.rollout.batch import RolloutBatch
from opd_sdk.tensors.forward import idle_loss


@dataclass
class BatchLoss:
    """loss: the batch's loss (a tensor when not backward, else its float). signal: samples,
    pairs or tokens with a learning signal (0: nothing to learn, no step). metrics: the log."""

    loss: Any
    signal: int
    metrics: dict[str, float]


def batch_loss(
    objective: Any,
    policy: torch.nn.Module,
    batch: RolloutBatch,
    feedback: Sequence[Any] | None,
    *,
    micro_batch_prompts: int | None = None,
    flat_tolerance: float = 0.0,
    backward: bool = False,
    tis_cap: float | None = None,
    pad_id: int = 0,
    autocast: Any = None,
    parallel: ParallelStrategy | None = None,
) -> BatchLoss:
    """Targets once, then per micro-batch (whole prompt groups): one forward, every term's loss.

    With backward=True each micro-batch's loss is backpropagated at once (gradient
    accumulation, `parallel.backward`). Nothing runs when no term has a learning signal.
    Metrics: counters are whole-batch counts, means are means over the batch.

    parallel: the launch's `ParallelStrategy` (default one process). Over several processes
    this rank runs the forward and backward of its share of the prompt groups only (plans
    still cover the whole batch), and the loss and metrics are summed over the ranks'
    shares (gradients are the strategy's to sum). In lockstep (FSDP, ZeRO) a micro-batch
    with nothing to run here still runs `idle_loss`: its peers' passes are collectives.
    """
    parallel = parallel or SingleProcess()
    planned = plan_batch(objective, policy, batch, feedback, flat_tolerance)
    sums = LossSums()
    total: Any = 0.0
    lockstep = backward and parallel.lockstep
    if planned.signal > 0:
        lo, hi = parallel.dist.share(batch.num_prompts)
        step = micro_batch_prompts or batch.num_prompts
        for start in range(lo, hi, step):
            with autocast or contextlib.nullcontext():
                loss = micro_loss(planned, policy, batch, start, min(hi, start + step), sums,
                                  pad_id=pad_id, tis_cap=tis_cap)
            if loss is None and lockstep:
                loss = idle_loss(policy, batch)
            if loss is None:
                continue
            if backward:
                parallel.backward(loss, start + step >= hi)
                total += float(loss.detach())
            else:
                total = total + loss
    if parallel.dist.enabled:
        sums, total = _merge_ranks(parallel.dist.all_gather((sums, float(total))))
    if not backward and not torch.is_tensor(total):
        total = torch.zeros((), requires_grad=True)  # nothing to learn: backward() runs and moves nothing
    metrics = loss_metrics(planned, sums, float(total.detach()) if torch.is_tensor(total) else float(total))
    return BatchLoss(total, planned.signal, metrics)


def _merge_ranks(shares: list[tuple[LossSums, float]]) -> tuple[LossSums, float]:
    """Every rank's (metric sums and forward statistics, loss) -> the whole batch's."""
    merged = LossSums()
    for rank_sums, _ in shares:
        merged.add(rank_sums)
    return merged, sum(total for _, total in shares)

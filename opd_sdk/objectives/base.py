"""The `Objective` protocol, and `batch_loss`: targets -> forward -> loss for one batch.

An objective is the glue between the targets layer and a loss: once per
batch it turns the teacher's feedback into a `Plan` (which rows its loss
reads, the tensors it needs, the batch's unit count it divides by, how many
samples carry a learning signal); per micro-batch it computes its share of
the loss from a `View` of the one forward pass the trainer ran. The trainer
calls, in order:

    objective.setup(policy)                                  # once: frozen copies
    result = batch_loss(objective, policy, batch, feedback,  # every step
                        micro_batch_prompts=m, backward=True)
    optimizer.step()                                         # unless result.signal == 0
    objective.after_step(step, policy)                       # refresh opponents, etc.

`feedback` is aligned with `batch.prompts`: one Feedback per prompt group
(a tuple, one per source, for a `Composite` objective with several
teachers). A `FeedbackFailure` masks its group out and is counted; it is
never read as a reward. `objective.loss(policy, batch, feedback)` runs the
same pipeline on one batch and returns the loss tensor, for use outside the
trainer and in tests.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch

from opd_sdk.rollout.batch import RolloutBatch
from opd_sdk.tensors.forward import Part, Plan, View, forward_micro, idle_loss
from opd_sdk.types import Feedback


@dataclass
class LossOutput:
    """loss: scalar tensor to call backward() on. metrics: plain floats for logging."""

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class PlanContext:
    """What a plan may need besides the batch and its feedback.

    flat_tolerance: a group whose rewards span at most this is flat (no signal).
    vocab_size: the student's vocabulary size (top-k ids are checked against it).
    """

    flat_tolerance: float = 0.0
    vocab_size: int = 1 << 62


# Mean metrics from `compute`: name -> (sum, count); count None: the values add up (a share of a sum).
MeanMetrics = dict[str, tuple[Any, Any]]


@runtime_checkable
class Objective(Protocol):
    """feedback_kinds: the Feedback kinds its plan reads (empty: no teacher needed).
    chunk_rows: rows per LM-head chunk in the forward pass.
    min_group_size: samples per prompt below which it has no learning signal (checked before training).
    copies_student: setup() keeps a frozen copy of the policy (a KL reference, a SPIN opponent)."""

    feedback_kinds: tuple[str, ...]
    chunk_rows: int
    min_group_size: int
    copies_student: bool

    def setup(self, policy: torch.nn.Module) -> None:
        """Once before training: make the frozen copies this objective needs."""

    def after_step(self, step: int, policy: torch.nn.Module) -> None:
        """After optimizer step number `step` (1-based): refresh opponents, etc."""

    def temperature(self, batch: RolloutBatch) -> float:
        """The temperature its policy (and frozen-model) log-probs are taken at."""

    def frozen_models(self) -> dict[str, torch.nn.Module]:
        """Models run without gradients over the same sequences ({"reference": m})."""

    def plan(self, batch: RolloutBatch, feedback: Sequence[Feedback], ctx: PlanContext) -> Plan:
        """Feedback -> the whole batch's targets, once per step."""

    def compute(self, view: View, plan: Plan, part: Part, batch: RolloutBatch) -> tuple[torch.Tensor, MeanMetrics]:
        """This micro-batch's share of the loss (already divided by plan.normaliser) and mean metrics."""


@dataclass
class Term:
    """One weighted objective of a `Composite`, with the feedback it reads."""

    name: str | None
    objective: Any
    weight: float
    feedback: Sequence[Feedback]


@runtime_checkable
class Composite(Protocol):
    """An objective made of weighted terms (`Hybrid`); the trainer runs its terms over one forward."""

    def split(self, feedback: Sequence[Any]) -> list[Term]: ...


@dataclass
class BatchLoss:
    """loss: the batch's loss (a tensor when not backward, else its float). signal: samples,
    pairs or tokens with a learning signal (0: nothing to learn, no step). metrics: the log."""

    loss: Any
    signal: int
    metrics: dict[str, float]


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy in eval mode with no gradients (reference model, SPIN opponent)."""
    twin = copy.deepcopy(model)
    twin.eval()
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


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
    prompt_range: tuple[int, int] | None = None,
    dist: Any = None,
    backward_fn: Callable[[torch.Tensor, bool], None] | None = None,
) -> BatchLoss:
    """Targets once, then per micro-batch (whole prompt groups): one forward, every term's loss.

    Each term's loss is a sum divided by its whole-batch unit count, so the
    micro-batch losses add up to the one-big-batch loss exactly; with
    backward=True each is backpropagated at once (gradient accumulation).
    Nothing runs when no term has a learning signal. Metrics (README "Metrics"):
    `loss/total`, `optim/signal`, `forward/policy_passes` (and the sampler /
    trainer log-prob gap `forward/logprob_abs_diff`, `forward/max_importance_ratio`),
    and what each objective reports as `objective/<name>` (`objective/<term>/<name>`
    for a Hybrid term, with its unweighted loss as `objective/<term>/loss`):
    counters are whole-batch counts, means are means over the batch. Feedback
    statistics (rewards, failures) are the loop's (`opd_sdk.train.trainer`).

    prompt_range: run the forward and backward of these prompt groups only
    (this rank's share; plans still cover the whole batch). dist: an
    `opd_sdk.parallel.distributed.Distributed`; the loss and metrics are then summed
    over the ranks' shares (gradients are the caller's to sum). Under FSDP or
    ZeRO a micro-batch with nothing to run here still runs `idle_loss` (its
    peers' passes are collectives). backward_fn(loss, last): called instead of
    `loss.backward()` (DeepSpeed's engine; last: the final micro-batch).
    """
    feedback = list(feedback) if feedback is not None else []
    terms = objective.split(feedback) if isinstance(objective, Composite) else [Term(None, objective, 1.0, feedback)]
    vocab = getattr(getattr(policy, "config", None), "vocab_size", None) or PlanContext.vocab_size
    ctx = PlanContext(flat_tolerance=flat_tolerance, vocab_size=vocab)
    plans = [t.objective.plan(batch, t.feedback, ctx) for t in terms]
    signal = sum(p.signal for p in plans)

    def key(term: Term, name: str) -> str:  # what an objective reports: objective/<name>, objective/<term>/<name>
        return f"objective/{name}" if term.name is None else f"objective/{term.name}/{name}"

    metrics: dict[str, float] = {}
    for term, plan in zip(terms, plans):
        metrics.update({key(term, k): v for k, v in plan.metrics.items()})
    metrics["optim/signal"] = float(signal)
    sums: dict[str, list] = {}
    stats = {"logprob_abs_diff_sum": 0.0, "logprob_tokens": 0.0, "max_ratio": 0.0, "policy_passes": 0.0}
    total: Any = 0.0
    # every micro-batch runs a pass: a backward_fn counts them, FSDP's and ZeRO's are collectives
    lockstep = backward and (backward_fn is not None or (dist is not None and dist.enabled and dist.lockstep))
    if signal > 0:
        P = batch.num_prompts
        lo, hi = prompt_range or (0, P)
        step = micro_batch_prompts or P
        entries = [(t.objective, p) for t, p in zip(terms, plans)]
        chunk_rows = min(t.objective.chunk_rows for t in terms)
        recompute = any(getattr(t.objective, "recompute_head", False) for t in terms)
        for start in range(lo, hi, step):
            with autocast or contextlib.nullcontext():
                views, micro_stats = forward_micro(
                    policy, batch, start, min(hi, start + step), entries,
                    pad_id=pad_id, chunk_rows=chunk_rows, recompute_head=recompute, tis_cap=tis_cap,
                )
                micro_loss = None
                for term, plan, vp in zip(terms, plans, views):
                    if vp is None:
                        continue
                    loss_k, means = term.objective.compute(vp[0], plan, vp[1], batch)
                    if term.name is not None:  # a Hybrid term's own loss, before its weight
                        means = {**means, "loss": (loss_k.detach(), None)}
                    micro_loss = term.weight * loss_k if micro_loss is None else micro_loss + term.weight * loss_k
                    for name, (num, den) in means.items():
                        acc = sums.setdefault(key(term, name), [0.0, 0.0, den is None])
                        acc[0] += float(num)
                        acc[1] += 0.0 if den is None else float(den)
            for k, v in micro_stats.items():
                stats[k] = max(stats[k], v) if k == "max_ratio" else stats[k] + v
            if micro_loss is None and lockstep:
                micro_loss = idle_loss(policy, batch)
            if micro_loss is None:
                continue
            if backward:
                if backward_fn is None:
                    micro_loss.backward()
                else:
                    backward_fn(micro_loss, start + step >= hi)
                total += float(micro_loss.detach())
            else:
                total = total + micro_loss
    if dist is not None and dist.enabled:
        sums, stats, total = _merge_ranks(dist.all_gather((sums, stats, float(total))))
    for name, (num, den, additive) in sums.items():
        metrics[name] = num if additive else (num / den if den else 0.0)
    metrics["forward/policy_passes"] = stats["policy_passes"]
    if stats["logprob_tokens"]:
        metrics["forward/logprob_abs_diff"] = stats["logprob_abs_diff_sum"] / stats["logprob_tokens"]
        metrics["forward/max_importance_ratio"] = stats["max_ratio"]
    if not backward and not torch.is_tensor(total):
        total = torch.zeros((), requires_grad=True)  # nothing to learn: backward() runs and moves nothing
    metrics["loss/total"] = float(total.detach()) if torch.is_tensor(total) else float(total)
    return BatchLoss(total, signal, metrics)


def _merge_ranks(shares: list[tuple[dict, dict, float]]) -> tuple[dict, dict, float]:
    """Every rank's (metric sums, forward statistics, loss) -> the whole batch's."""
    sums: dict[str, list] = {}
    stats: dict[str, float] = {}
    for rank_sums, rank_stats, _ in shares:
        for name, (num, den, additive) in rank_sums.items():
            acc = sums.setdefault(name, [0.0, 0.0, additive])
            acc[0] += num
            acc[1] += den
        for k, v in rank_stats.items():
            stats[k] = max(stats.get(k, 0.0), v) if k == "max_ratio" else stats.get(k, 0.0) + v
    return sums, stats, sum(total for _, _, total in shares)


def run_loss(objective: Any, policy: torch.nn.Module, batch: RolloutBatch, feedback: Sequence[Any] | None) -> LossOutput:
    """`objective.loss(...)`: the whole pipeline on one batch, one micro-batch."""
    out = batch_loss(objective, policy, batch, feedback)
    return LossOutput(out.loss, out.metrics)

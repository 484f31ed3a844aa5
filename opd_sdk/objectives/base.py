"""The `Objective` protocol, and the pieces of one batch's loss: targets -> forward -> loss.

An objective is the glue between the targets layer and a loss: once per
batch it turns the teacher's feedback into a `Plan` (which rows its loss
reads, the tensors it needs, the batch's unit count it divides by, how many
samples carry a learning signal); per micro-batch it computes its share of
the loss from a `View` of the one forward pass the trainer ran:

    objective.setup(policy)                                   # once: frozen copies
    planned = plan_batch(objective, policy, batch, feedback)  # every step: targets once
    loss = micro_loss(planned, policy, batch, start, stop, sums)  # per micro-batch: one forward
    objective.after_step(step, policy)                        # refresh opponents, etc.

The trainer's micro-batch engine (`opd_sdk.train.microbatch.batch_loss`: gradient
accumulation, ranks) runs these. `feedback` is aligned with `batch.prompts`: one
Feedback per prompt group (a tuple, one per source, for a `Composite` objective
with several teachers). A `FeedbackFailure` masks its group out and is counted;
it is never read as a reward. `objective.loss(policy, batch, feedback)` runs the
same pipeline on one batch and returns the loss tensor, for use outside the
trainer and in tests (`run_loss`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

import torch

from opd_sdk.rollout.batch import RolloutBatch
from opd_sdk.tensors.forward import Part, Plan, View, forward_micro
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
    """What the trainer, the config checks, the checkpoint and the parallel strategies read off an
    objective, a `Composite` included (each one a `SingleObjective` or a `Composite`).

    feedback_kinds: the Feedback kinds its plan reads (empty: no teacher needed).
    chunk_rows: rows per LM-head chunk in the forward pass.
    recompute_head: the forward pass recomputes each chunk's logits in backward (less memory).
    min_group_size: samples per prompt below which it has no learning signal (checked before training).
    copies_student: setup() keeps a frozen copy of the policy (a KL reference, a SPIN opponent)."""

    feedback_kinds: tuple[str, ...]
    chunk_rows: int
    recompute_head: bool
    min_group_size: int
    copies_student: bool

    def setup(self, policy: torch.nn.Module) -> None:
        """Once before training: make the frozen copies this objective needs."""

    def after_step(self, step: int, policy: torch.nn.Module) -> None:
        """After optimizer step number `step` (1-based): refresh opponents, etc."""

    def loss(self, policy: torch.nn.Module, batch: RolloutBatch, feedback: Sequence[Any]) -> LossOutput:
        """The whole pipeline on one batch (`run_loss`): the loss tensor and its metrics."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of it (a SPIN opponent); {} when it keeps nothing between steps."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (after `setup`)."""


@runtime_checkable
class SingleObjective(Objective, Protocol):
    """An objective with its own targets and loss (every one but a `Composite`): what `plan_batch`,
    `micro_loss` and the forward layer read."""

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
    objective: SingleObjective
    weight: float
    feedback: Sequence[Feedback]


@runtime_checkable
class Composite(Objective, Protocol):
    """An objective made of weighted terms (`Hybrid`); the trainer runs its terms over one forward.

    terms: (objective, weight, source) per term; source indexes the teacher whose feedback it reads.
    feedback_sources: how many teachers it reads (one collector each)."""

    terms: list[tuple[SingleObjective, float, int]]
    feedback_sources: int

    def split(self, feedback: Sequence[Any]) -> list[Term]:
        """The terms, each with its source's feedback (`feedback`: one tuple per prompt, one entry per source)."""


def missing_members(objective: Any) -> list[str]:
    """What `objective` lacks to be a `SingleObjective` (or, when it has `split`, a `Composite`):
    the names the trainer would otherwise fail on mid-step. Empty when it is complete."""
    protocol = Composite if callable(getattr(objective, "split", None)) else SingleObjective
    names: set[str] = set()
    for klass in protocol.__mro__:
        if getattr(klass, "_is_protocol", False) and klass is not Protocol:
            names |= set(klass.__dict__.get("__annotations__", {}))
            names |= {n for n, v in vars(klass).items() if callable(v) and not n.startswith("_")}
    return sorted(n for n in names if not hasattr(objective, n))  # a user's object: inspected on purpose


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy in eval mode with no gradients (reference model, SPIN opponent)."""
    twin = copy.deepcopy(model)
    twin.eval()
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


@dataclass
class BatchPlan:
    """The whole batch's targets, built once per step: one `Plan` per term. signal: samples, pairs
    or tokens with a learning signal (0: nothing to learn). metrics: the plans' own
    (`objective/<name>`, `objective/<term>/<name>` for a Hybrid term) and `optim/signal`."""

    terms: list[Term]
    plans: list[Plan]
    signal: int
    metrics: dict[str, float]


@dataclass
class LossSums:
    """What a batch's micro-batches (and ranks) add up. means: metric name -> [sum, count, additive]
    (additive: the values are shares of a sum, not terms of a mean); stats: the forward pass's
    statistics (`forward_micro`: sums, and max_ratio a maximum)."""

    means: dict[str, list] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("logprob_abs_diff_sum", "logprob_tokens", "max_ratio", "policy_passes"), 0.0))

    def add_stats(self, stats: dict[str, float]) -> None:
        for k, v in stats.items():
            self.stats[k] = max(self.stats[k], v) if k == "max_ratio" else self.stats[k] + v

    def add(self, other: LossSums) -> None:
        """Add another share of the batch (another rank's)."""
        for name, (num, den, additive) in other.means.items():
            acc = self.means.setdefault(name, [0.0, 0.0, additive])
            acc[0] += num
            acc[1] += den
        self.add_stats(other.stats)


def _key(term: Term, name: str) -> str:
    """What an objective reports is logged as objective/<name>, or objective/<term>/<name> in a Hybrid."""
    return f"objective/{name}" if term.name is None else f"objective/{term.name}/{name}"


def plan_batch(objective: SingleObjective | Composite, policy: torch.nn.Module, batch: RolloutBatch,
               feedback: Sequence[Any] | None, flat_tolerance: float = 0.0) -> BatchPlan:
    """Targets once: every term's `plan` over the whole batch (a `Composite` splits the feedback
    over its terms). flat_tolerance: a group whose rewards span at most this has no signal."""
    feedback = list(feedback) if feedback is not None else []
    terms = objective.split(feedback) if isinstance(objective, Composite) else [Term(None, objective, 1.0, feedback)]
    vocab = getattr(getattr(policy, "config", None), "vocab_size", None) or PlanContext.vocab_size  # transformers
    ctx = PlanContext(flat_tolerance=flat_tolerance, vocab_size=vocab)
    plans = [t.objective.plan(batch, t.feedback, ctx) for t in terms]
    signal = sum(p.signal for p in plans)
    metrics: dict[str, float] = {}
    for term, plan in zip(terms, plans, strict=True):
        metrics.update({_key(term, k): v for k, v in plan.metrics.items()})
    metrics["optim/signal"] = float(signal)
    return BatchPlan(terms, plans, signal, metrics)


def micro_loss(planned: BatchPlan, policy: torch.nn.Module, batch: RolloutBatch, start: int, stop: int,
               sums: LossSums, *, pad_id: int = 0, tis_cap: float | None = None) -> torch.Tensor | None:
    """Prompt groups [start, stop): one policy forward (`forward_micro`), then every term's weighted
    share of the loss (a scalar, each term already divided by its whole-batch unit count); None
    when no term has rows there. Adds the terms' mean metrics and the forward statistics to `sums`."""
    terms, plans = planned.terms, planned.plans
    entries = [(t.objective, p) for t, p in zip(terms, plans, strict=True)]
    views, stats = forward_micro(
        policy, batch, start, stop, entries, pad_id=pad_id, chunk_rows=min(t.objective.chunk_rows for t in terms),
        recompute_head=any(t.objective.recompute_head for t in terms), tis_cap=tis_cap,
    )
    loss = None
    for term, plan, vp in zip(terms, plans, views, strict=True):
        if vp is None:
            continue
        loss_k, means = term.objective.compute(vp[0], plan, vp[1], batch)
        if term.name is not None:  # a Hybrid term's own loss, before its weight
            means = {**means, "loss": (loss_k.detach(), None)}
        loss = term.weight * loss_k if loss is None else loss + term.weight * loss_k
        for name, (num, den) in means.items():
            acc = sums.means.setdefault(_key(term, name), [0.0, 0.0, den is None])
            acc[0] += float(num)
            acc[1] += 0.0 if den is None else float(den)
    sums.add_stats(stats)
    return loss


def loss_metrics(planned: BatchPlan, sums: LossSums, loss: float) -> dict[str, float]:
    """The batch's log (README "Metrics"): the plans' metrics, every mean metric over the batch (a sum
    where additive), `forward/policy_passes`, `forward/logprob_abs_diff` and
    `forward/max_importance_ratio` (when sampler log-probs were compared), `loss/total`. Feedback
    statistics (rewards, failures) are the loop's (`opd_sdk.train.trainer`)."""
    metrics = dict(planned.metrics)
    for name, (num, den, additive) in sums.means.items():
        metrics[name] = num if additive else (num / den if den else 0.0)
    metrics["forward/policy_passes"] = sums.stats["policy_passes"]
    if sums.stats["logprob_tokens"]:
        metrics["forward/logprob_abs_diff"] = sums.stats["logprob_abs_diff_sum"] / sums.stats["logprob_tokens"]
        metrics["forward/max_importance_ratio"] = sums.stats["max_ratio"]
    metrics["loss/total"] = loss
    return metrics


def run_loss(objective: SingleObjective | Composite, policy: torch.nn.Module, batch: RolloutBatch,
             feedback: Sequence[Any] | None) -> LossOutput:
    """`objective.loss(...)`: the whole pipeline on one batch, one micro-batch, no backward (the
    trainer's micro-batches and ranks: `opd_sdk.train.microbatch.batch_loss`)."""
    planned = plan_batch(objective, policy, batch, feedback)
    sums = LossSums()
    loss = micro_loss(planned, policy, batch, 0, batch.num_prompts, sums) if planned.signal > 0 else None
    if loss is None:
        loss = torch.zeros((), requires_grad=True)  # nothing to learn: backward() runs and moves nothing
    return LossOutput(loss, loss_metrics(planned, sums, float(loss.detach())))

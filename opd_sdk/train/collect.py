"""A rollout batch's teacher feedback: the requests, one collection per feedback source.

    requests = build_requests(batch, tokenizer_id)    # one FeedbackRequest per prompt group
    feedback = collect(collectors, batch, tokenizer_id)  # one Feedback (or a tuple, one per source) per prompt

The trainer calls these on rank 0 for every rank (`opd_sdk.parallel.distributed`). A
collector is what `opd_sdk.feedback.factory.make_collector` returns (`Collector`).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import torch

from opd_sdk.errors import ConfigError
from opd_sdk.feedback.factory import Collector
from opd_sdk.feedback.local import LocalRunner
from opd_sdk.feedback.requests import build_requests
from opd_sdk.feedback.teacher import (
    ChecksPrompts,
    ReportsMetrics,
    follows_student,
    inner_collectors,
    leaves,
    reads_student,
)
from opd_sdk.objectives.base import Composite
from opd_sdk.rollout.batch import RolloutBatch
from opd_sdk.types import Feedback, FeedbackRequest, Score


def score_stats(feedback: Sequence[Feedback]) -> tuple[float | None, float | None]:
    """`reward/mean` and `reward/std`: mean and population standard deviation (divided by n, as
    numpy's std; 0.0 for one score) of every finite score in `feedback`, each sampled completion
    of the step counted once; (None, None) without any. The one place these are computed."""
    values = [s for fb in feedback if isinstance(fb, Score) for s in fb.scores if s is not None and math.isfinite(s)]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
    return mean, std


def collect(collectors: Sequence[Collector], batch: RolloutBatch, tokenizer_id: str | None) -> list[Any]:
    """One Feedback per prompt; with several collectors, one tuple (a Feedback per collector) per
    prompt; [] without collectors. Raises RuntimeError when a collector answers a different number.

    An in-process collector (`LocalRunner`) runs in the calling thread; with several collectors the
    others wait for their teachers meanwhile, each in a thread of its own (on its own event loop).
    """
    if not collectors:
        return []
    requests = build_requests(batch, tokenizer_id)
    if len(collectors) == 1:
        return _collect_one(collectors[0], requests)
    with ThreadPoolExecutor(len(collectors)) as pool:
        remote = {i: pool.submit(_collect_one, c, requests) for i, c in enumerate(collectors)
                  if not isinstance(c, LocalRunner)}
        here = {i: _collect_one(c, requests) for i, c in enumerate(collectors) if i not in remote}
        per_source = [here[i] if i in here else remote[i].result() for i in range(len(collectors))]
    return list(zip(*per_source, strict=True))


def _collect_one(collector: Collector, requests: list[FeedbackRequest]) -> list[Feedback]:
    feedback = list(collector.collect_sync(requests))
    if len(feedback) != len(requests):
        raise RuntimeError(f"collector returned {len(feedback)} feedback values for {len(requests)} requests")
    return feedback


def usage_total(collectors: Sequence[Collector], field: str) -> Any:
    """A usage field (requests_sent, cache_hits, cost_usd) summed over the collectors, and those their
    teachers ask through (`inner_collectors`: GAD's reference teacher); None without collectors."""
    every = [*collectors, *(inner for c in collectors for inner in inner_collectors(c.teacher))]
    return sum(c.usage.as_dict()[field] for c in every) if collectors else None


def teacher_metrics(collectors: Sequence[Collector]) -> dict[str, Any]:
    """The step's metrics from the teachers that report some (`ReportsMetrics`: gad/accuracy...)."""
    return {k: v for c in collectors for leaf in leaves(c.teacher) if isinstance(leaf, ReportsMetrics)
            for k, v in leaf.metrics().items()}


def check_prompts(collectors: Sequence[Collector], prompts: Sequence[Any]) -> None:
    """Before training: every teacher that checks prompts (`ChecksPrompts`) sees the training prompts;
    ConfigError from the first that cannot answer them."""
    for c in collectors:
        for leaf in leaves(c.teacher):
            if isinstance(leaf, ChecksPrompts):
                leaf.check_prompts(prompts)


def check_collectors(objective: Any, collectors: list[Collector], sharded_student: torch.nn.Module | None,
                     *, max_staleness: int) -> None:
    """Refuses, before training, what the collectors cannot do (ConfigError):

    - a number of collectors other than the objective's feedback sources;
    - under FSDP (sharded_student given), a teacher that runs the sharded student: only rank 0
      asks the teacher, so it would wait for the other ranks' shards forever;
    - with max_staleness >= 1, a teacher that follows the student's weights
      (`opd_sdk.feedback.teacher.follows_student`: self-distillation in live or EMA mode): the
      pipeline overlaps teacher calls with the step, so it could be asked, on another thread,
      while the step changes those weights. With max_staleness 0 it is asked between the
      sampling and the step of its batch (by `make_collector`'s LocalRunner, on this thread).
    """
    if not collectors and objective.feedback_kinds:
        raise ConfigError(f"{type(objective).__name__} reads teacher feedback; pass a collector: "
                          "opd_sdk.make_collector(teacher) (a FeedbackCollector for a remote teacher)")
    sources = objective.feedback_sources if isinstance(objective, Composite) else 1
    if collectors and len(collectors) != sources:
        raise ConfigError(
            f"{type(objective).__name__} reads {sources} feedback source(s) but {len(collectors)} collector(s) "
            "were given; pass one collector per source, in source order"
        )
    found = [t for c in collectors for t in reads_student(c.teacher, sharded_student)] if sharded_student else []
    if found:
        raise ConfigError(
            f"teacher {', '.join(found)} runs the student itself (self-distillation), which FSDP shards over "
            "the processes while only rank 0 asks the teacher; train it with data parallel (no FSDP)"
        )
    ahead = [t for c in collectors for t in follows_student(c.teacher)] if max_staleness >= 1 else []
    if ahead:
        raise ConfigError(
            f"teacher {', '.join(ahead)} follows the student's weights or learns during the run (self-distillation "
            "in live or ema mode, a gad discriminator) "
            f"and must not be asked while a step changes them, which max_staleness={max_staleness} (teacher calls "
            "overlapped with the step) allows; set max_staleness: 0 (rollout.max_staleness in a config), or give "
            "a self-distillation teacher mode 'frozen'"
        )

"""A rollout batch's teacher feedback: the requests, one collection per feedback source.

    requests = build_requests(batch, tokenizer_id)    # one FeedbackRequest per prompt group
    feedback = collect(collectors, batch, tokenizer_id)  # one Feedback (or a tuple, one per source) per prompt

The trainer calls these on rank 0 for every rank (`opd_sdk.parallel.distributed`).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import torch

from opd_sdk.errors import ConfigError
from opd_sdk.feedback.requests import build_requests
from opd_sdk.feedback.teacher import reads_student
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


def collect(collectors: Sequence[Any], batch: RolloutBatch, tokenizer_id: str | None) -> list[Any]:
    """One Feedback per prompt; with several collectors, one tuple (a Feedback per collector) per
    prompt; [] without collectors. Raises RuntimeError when a collector answers a different number."""
    if not collectors:
        return []
    requests = build_requests(batch, tokenizer_id)
    if len(collectors) == 1:
        return _collect_one(collectors[0], requests)
    with ThreadPoolExecutor(len(collectors)) as pool:  # each collector runs its own event loop
        per_source = list(pool.map(lambda c: _collect_one(c, requests), collectors))
    return list(zip(*per_source))


def _collect_one(collector: Any, requests: list[FeedbackRequest]) -> list[Feedback]:
    feedback = list(collector.collect_sync(requests))
    if len(feedback) != len(requests):
        raise RuntimeError(f"collector returned {len(feedback)} feedback values for {len(requests)} requests")
    return feedback


def usage_total(collectors: Sequence[Any], field: str) -> Any:
    """A usage field (requests_sent, cache_hits, cost_usd) summed over the collectors; None without them."""
    values = [getattr(getattr(c, "usage", None), field, None) for c in collectors]
    return sum(values) if values and None not in values else None


def check_collectors(objective: Any, collectors: list[Any], sharded_student: torch.nn.Module | None) -> None:
    """One collector per feedback source. Under FSDP (sharded_student given) only rank 0 asks the
    teacher, so a teacher that runs the sharded student would wait for the other ranks' shards
    forever: refused before training."""
    if not collectors and objective.feedback_kinds:
        raise ConfigError(f"{type(objective).__name__} reads teacher feedback; pass a FeedbackCollector")
    sources = objective.feedback_sources if isinstance(objective, Composite) else 1
    if collectors and len(collectors) != sources:
        raise ConfigError(
            f"{type(objective).__name__} reads {sources} feedback source(s) but {len(collectors)} collector(s) "
            "were given; pass one FeedbackCollector per source, in source order"
        )
    found = [t for c in collectors for t in reads_student(c.teacher, sharded_student)] if sharded_student else []
    if found:
        raise ConfigError(
            f"teacher {', '.join(found)} runs the student itself (self-distillation), which FSDP shards over "
            "the processes while only rank 0 asks the teacher; train it with data parallel (no FSDP)"
        )

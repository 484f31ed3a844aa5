"""The `Objective` protocol, `LossOutput`, and the small helpers objectives share.

An objective turns one `RolloutBatch` plus the teacher's feedback into a
scalar loss. The trainer calls, in order:

    objective.setup(policy)                      # once, before training
    out = objective.loss(policy, batch, feedback)  # every step
    out.loss.backward(); optimizer.step()
    objective.after_step(step, policy)           # step = optimizer steps done (1, 2, ...)

`feedback` is aligned with `batch.prompts`: one Feedback per prompt group,
whose per-completion values are aligned with that group's G completions
(rows p*G .. p*G+G-1). A `FeedbackFailure` masks its whole group out and is
counted in `metrics["feedback_failures"]`; it is never read as a reward.

Each objective also says which feedback kinds it reads in `feedback_kinds`
(an empty tuple: it needs no teacher, e.g. SFT on `PromptItem.answer`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

import torch

from opd_sdk.batch import RolloutBatch
from opd_sdk.errors import ConfigError
from opd_sdk.types import Feedback, FeedbackFailure, Score


@dataclass
class LossOutput:
    """loss: scalar tensor to call backward() on. metrics: plain floats for logging."""

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Objective(Protocol):
    feedback_kinds: tuple[str, ...]

    def setup(self, policy: torch.nn.Module) -> None:
        """Once before training: make the frozen copies this objective needs."""

    def loss(self, policy: torch.nn.Module, batch: RolloutBatch, feedback: Sequence[Feedback]) -> LossOutput:
        """The loss for one batch; `feedback` has one entry per prompt group."""

    def after_step(self, step: int, policy: torch.nn.Module) -> None:
        """After optimizer step number `step` (1-based): refresh opponents, etc."""


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy in eval mode with no gradients (reference model, SPIN opponent)."""
    twin = copy.deepcopy(model)
    twin.eval()
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


def check_feedback(batch: RolloutBatch, feedback: Sequence[Feedback], who: str) -> None:
    """Raise a clear error when feedback is not one entry per prompt group."""
    if len(feedback) != len(batch.prompts):
        raise ConfigError(
            f"{who}: got {len(feedback)} feedback entries for {len(batch.prompts)} prompts; "
            "pass one Feedback per prompt group, aligned with batch.prompts"
        )


def expect_kind(fb: Feedback, kinds: tuple[str, ...], who: str, group: int) -> None:
    """Raise ConfigError when a (non-failure) feedback has a kind this objective cannot read."""
    if isinstance(fb, FeedbackFailure) or fb.kind in kinds:
        return
    raise ConfigError(
        f"{who} reads {' or '.join(kinds)} feedback but group {group} got '{fb.kind}'; "
        f"use a teacher that returns {kinds[0]} feedback or pick a matching objective"
    )


def count_failures(feedback: Sequence[Feedback]) -> int:
    return sum(isinstance(fb, FeedbackFailure) for fb in feedback)


def sequence_sums(values_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """values_BT summed over the masked positions of each row -> [B]."""
    return (values_BT * mask_BT).sum(-1)


def zero_loss(logprobs_BT: torch.Tensor) -> torch.Tensor:
    """A 0.0 loss still attached to the graph (every group failed: backward() must not crash)."""
    return (logprobs_BT * 0.0).sum()


def first_param_zero(policy: torch.nn.Module) -> torch.Tensor:
    """A 0.0 loss attached to the policy's graph (nothing to learn from in this batch)."""
    for p in policy.parameters():
        if p.requires_grad:
            return p.sum() * 0.0
    return torch.zeros((), requires_grad=True)


def sample_std(values: list[float]) -> float:
    """Sample (n-1) standard deviation; 0.0 for fewer than two values."""
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def score_table(batch: RolloutBatch, feedback: Sequence[Feedback], who: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Score feedback -> rewards_PG (float64) and valid_PG (bool, [P, G]).

    A FeedbackFailure, or a Score with any non-finite value, leaves its whole
    group invalid (reward 0.0 there is a placeholder that nothing reads).
    """
    check_feedback(batch, feedback, who)
    P, G = len(batch.prompts), batch.group_size
    rewards_PG = torch.zeros(P, G, dtype=torch.float64)
    valid_PG = torch.zeros(P, G, dtype=torch.bool)
    for p, fb in enumerate(feedback):
        expect_kind(fb, ("score",), who, p)
        if isinstance(fb, FeedbackFailure):
            continue
        assert isinstance(fb, Score)
        if len(fb.scores) != G:
            raise ConfigError(
                f"{who}: group {p} has {G} completions but its Score has {len(fb.scores)} "
                "values; the teacher must score every completion, in order"
            )
        if all(math.isfinite(s) for s in fb.scores):
            rewards_PG[p] = torch.tensor(fb.scores, dtype=torch.float64)
            valid_PG[p] = True
    return rewards_PG, valid_PG

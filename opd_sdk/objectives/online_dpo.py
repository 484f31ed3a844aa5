"""`OnlineDPO`: preference optimisation on pairs of the student's own samples.

Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online
AI Feedback"): DPO's loss (Rafailov et al. 2023) on pairs sampled from the
current student and labelled by a teacher. With h = (log p(y_w) - log
p_ref(y_w)) - (log p(y_l) - log p_ref(y_l)) (sequence log-probs, sums over
completion tokens, EOS included) and the teacher's probability p that y_w
beats y_l:

    sigmoid: -[p log sigmoid(beta h) + (1 - p) log sigmoid(-beta h)]
             (p = 1: plain DPO; p < 1: the "conservative" label-smoothed form)
    ipo:     (h - (p - 1/2) / beta)^2  (Azar et al. 2024; p = 1 gives the
             paper's target 1 / (2 beta))

Pairs come from `Preference` feedback (every pair the teacher gave) or from
`Score` feedback (the best against the worst sample of each group, first
index on ties; a group whose scores are all equal gives no pair). The
reference model is a frozen copy of the student made in `setup`.
Departure: IPO here uses summed, not length-averaged, log-probs.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F

from opd_sdk.batch import RolloutBatch
from opd_sdk.errors import ConfigError
from opd_sdk.logprobs import selected_logprobs
from opd_sdk.objectives.base import (
    LossOutput,
    check_feedback,
    count_failures,
    expect_kind,
    first_param_zero,
    frozen_copy,
    sequence_sums,
)
from opd_sdk.types import Feedback, FeedbackFailure, Preference, Score


def dpo_loss(
    policy_w_N: torch.Tensor,
    policy_l_N: torch.Tensor,
    ref_w_N: torch.Tensor,
    ref_l_N: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    prob_N: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO / IPO over N pairs of sequence log-probs [N] -> (mean loss [], h_N)."""
    h_N = (policy_w_N - ref_w_N) - (policy_l_N - ref_l_N)
    p_N = torch.ones_like(h_N) if prob_N is None else prob_N.to(h_N.dtype)
    if loss_type == "sigmoid":
        per_pair_N = -(p_N * F.logsigmoid(beta * h_N) + (1.0 - p_N) * F.logsigmoid(-beta * h_N))
    elif loss_type == "ipo":
        per_pair_N = (h_N - (p_N - 0.5) / beta) ** 2
    else:
        raise ConfigError(f"OnlineDPO loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}")
    return per_pair_N.mean(), h_N.detach()


def feedback_pairs(batch: RolloutBatch, feedback: Sequence[Feedback], who: str) -> list[tuple[int, int, float]]:
    """(winner row, loser row, probability) for every usable pair in the batch."""
    check_feedback(batch, feedback, who)
    G = batch.group_size
    pairs: list[tuple[int, int, float]] = []
    for p, fb in enumerate(feedback):
        expect_kind(fb, ("preference", "score"), who, p)
        if isinstance(fb, FeedbackFailure):
            continue
        if isinstance(fb, Preference):
            for pair in fb.pairs:
                if not (0 <= pair.winner < G and 0 <= pair.loser < G) or pair.winner == pair.loser:
                    raise ConfigError(
                        f"{who}: group {p} has a preference pair ({pair.winner}, {pair.loser}) outside "
                        f"0..{G - 1} or comparing a completion with itself; fix the teacher's indices"
                    )
                pairs.append((p * G + pair.winner, p * G + pair.loser, pair.probability))
        elif isinstance(fb, Score):
            if len(fb.scores) != G:
                raise ConfigError(f"{who}: group {p} has {G} completions but {len(fb.scores)} scores")
            best = max(range(G), key=lambda g: (fb.scores[g], -g))
            worst = min(range(G), key=lambda g: (fb.scores[g], g))
            if fb.scores[best] > fb.scores[worst]:
                pairs.append((p * G + best, p * G + worst, 1.0))
    return pairs


class OnlineDPO:
    """DPO / IPO on teacher-labelled pairs of student samples; see the module docstring.

    beta: DPO temperature. loss_type: "sigmoid" | "ipo".
    reference: frozen reference model (default: a frozen copy made in setup()).
    """

    feedback_kinds = ("preference", "score")

    def __init__(
        self,
        *,
        beta: float = 0.1,
        loss_type: Literal["sigmoid", "ipo"] = "sigmoid",
        reference: torch.nn.Module | None = None,
        chunk_rows: int = 4,
    ) -> None:
        if beta <= 0:
            raise ConfigError(f"OnlineDPO beta must be > 0 (e.g. 0.1), got {beta}")
        if loss_type not in ("sigmoid", "ipo"):
            raise ConfigError(f"OnlineDPO loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}")
        self.beta = beta
        self.loss_type = loss_type
        self.reference = reference
        self.chunk_rows = chunk_rows

    def setup(self, policy: torch.nn.Module) -> None:
        if self.reference is None:
            self.reference = frozen_copy(policy)

    def after_step(self, step: int, policy: torch.nn.Module) -> None:
        pass

    def loss(self, policy: torch.nn.Module, batch: RolloutBatch, feedback: Sequence[Feedback]) -> LossOutput:
        if self.reference is None:
            raise ConfigError("OnlineDPO needs setup(policy) before the first loss (it copies the reference)")
        pairs = feedback_pairs(batch, feedback, "OnlineDPO")
        metrics = {"feedback_failures": float(count_failures(feedback)), "pairs": float(len(pairs))}
        if not pairs:
            return LossOutput(first_param_zero(policy), {**metrics, "loss": 0.0})
        used = sorted({r for w, l, _ in pairs for r in (w, l)})  # only rows in a pair are run
        slot = {r: i for i, r in enumerate(used)}
        rows = torch.tensor(used, device=batch.input_ids_BT.device)
        L = batch.prompt_len
        ids, attn, mask = batch.input_ids_BT[rows], batch.attention_mask_BT[rows], batch.completion_mask_BT[rows]
        policy_lp = selected_logprobs(policy, ids, attn, chunk_rows=self.chunk_rows, from_col=L)
        policy_U = sequence_sums(policy_lp, mask.float())
        with torch.no_grad():
            ref_lp = selected_logprobs(self.reference, ids, attn, chunk_rows=self.chunk_rows, from_col=L)
            ref_U = sequence_sums(ref_lp, mask.float())
        w = torch.tensor([slot[w] for w, _, _ in pairs], device=rows.device)
        l_ = torch.tensor([slot[l] for _, l, _ in pairs], device=rows.device)
        prob_N = torch.tensor([p for _, _, p in pairs], dtype=policy_U.dtype, device=rows.device)
        loss, h_N = dpo_loss(policy_U[w], policy_U[l_], ref_U[w], ref_U[l_], self.beta, self.loss_type, prob_N)
        metrics.update(
            margin_mean=float(h_N.mean()),
            margin_accuracy=float((h_N > 0).float().mean()),
            loss=float(loss.detach()),
        )
        return LossOutput(loss, metrics)

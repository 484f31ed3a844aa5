"""Lay `TokenLogprobs` feedback onto a RolloutBatch, and the student's log-probs on a teacher's support.

Completion i of prompt group p is row b = p*G + i; its token t sits at
column batch.prompt_len + t. `TokenLogprobs.logprobs[i][t]` is the teacher's
log p_T(y_t | x, y_<t) for that token; `top_k[i][t]` maps teacher token ids
(which must be the student's ids: same tokenizer) to log-probs.

A teacher may score fewer tokens than the student sampled (e.g. not the
final EOS): the positions without a teacher value are masked out and
counted. More values than tokens, or top-k ids outside the student's
vocabulary, mean the two tokenisations differ: `TokenizationMismatch`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from opd_sdk.batch import RolloutBatch
from opd_sdk.errors import ConfigError, TokenizationMismatch
from opd_sdk.logprobs import _trunk_and_head
from opd_sdk.objectives.base import check_feedback, expect_kind
from opd_sdk.types import Feedback, FeedbackFailure, TokenLogprobs


@dataclass
class TeacherTokens:
    teacher_BT: torch.Tensor  # float [B, T]: teacher log-prob of the sampled token, 0 off-mask
    mask_BT: torch.Tensor  # float [B, T]: 1 where the token was sampled and the teacher scored it
    missing: int  # sampled tokens (of valid groups) that the teacher did not score
    nonfinite: int  # teacher values that were NaN or -inf (masked out)


def teacher_token_logprobs(batch: RolloutBatch, feedback: Sequence[Feedback], who: str) -> TeacherTokens:
    """TokenLogprobs feedback -> per-token teacher log-probs aligned with batch columns."""
    check_feedback(batch, feedback, who)
    B, T = batch.input_ids_BT.shape
    G, L = batch.group_size, batch.prompt_len
    teacher_BT = torch.zeros(B, T, dtype=torch.float32)
    mask_BT = torch.zeros(B, T, dtype=torch.float32)
    n_B = batch.completion_mask_BT.sum(-1).long().tolist()
    missing = nonfinite = 0
    for p, fb in enumerate(feedback):
        expect_kind(fb, ("token_logprobs",), who, p)
        if isinstance(fb, FeedbackFailure):
            continue
        assert isinstance(fb, TokenLogprobs)
        if len(fb.logprobs) != G:
            raise ConfigError(f"{who}: group {p} has {G} completions but TokenLogprobs for {len(fb.logprobs)}")
        if fb.top_k is not None and [len(t) for t in fb.top_k] != [len(v) for v in fb.logprobs]:
            raise ConfigError(
                f"{who}: group {p}'s TokenLogprobs.top_k does not have one entry per scored token "
                "(lengths differ from logprobs); the teacher must send both for the same tokens"
            )
        for i, values in enumerate(fb.logprobs):
            b = p * G + i
            if len(values) > n_B[b]:
                raise TokenizationMismatch(
                    f"{who}: the teacher scored {len(values)} tokens of completion {i} of group {p}, but the "
                    f"student sampled {n_B[b]}; teacher and student must share a tokenizer (LogprobTeacher "
                    "with send='token_ids', or on_mismatch='error' to catch this at the teacher)"
                )
            missing += n_B[b] - len(values)
            for t, v in enumerate(values):
                if math.isfinite(v):
                    teacher_BT[b, L + t] = v
                    mask_BT[b, L + t] = 1.0
                else:
                    nonfinite += 1
    mask_BT = mask_BT * batch.completion_mask_BT.float().cpu()
    device = batch.input_ids_BT.device
    return TeacherTokens(teacher_BT.to(device), mask_BT.to(device), missing, nonfinite)


@dataclass
class TeacherSupport:
    rows_M: torch.Tensor  # long [M]: batch row of each scored position
    cols_M: torch.Tensor  # long [M]: column of the token the position predicts
    ids_MK: torch.Tensor  # long [M, K]: support token ids (teacher top-k, plus the sampled token)
    teacher_MK: torch.Tensor  # float [M, K]: teacher log-probs on the support (0 on padding)
    mask_MK: torch.Tensor  # bool [M, K]: real support entries


def teacher_support(
    batch: RolloutBatch, feedback: Sequence[Feedback], tokens: TeacherTokens, vocab_size: int, who: str
) -> TeacherSupport:
    """The teacher's top-k (plus the sampled token, whose teacher log-prob is known) at each scored position."""
    G, L = batch.group_size, batch.prompt_len
    positions = tokens.mask_BT.nonzero().tolist()
    entries: list[list[tuple[int, float]]] = []
    for b, c in positions:
        fb = feedback[b // G]
        if not isinstance(fb, TokenLogprobs) or fb.top_k is None:
            raise ConfigError(
                f"{who}: this divergence needs the teacher's top-k distribution (TokenLogprobs.top_k); "
                "use LogprobTeacher(top_k=K), or divergence='reverse_kl_pg' which needs only sampled-token log-probs"
            )
        top = dict(fb.top_k[b % G][c - L])
        sampled = int(batch.input_ids_BT[b, c])
        top.setdefault(sampled, float(tokens.teacher_BT[b, c]))
        bad = [k for k in top if not 0 <= k < vocab_size]
        if bad:
            raise TokenizationMismatch(
                f"{who}: teacher top-k token id {bad[0]} is outside the student's vocabulary ({vocab_size}); "
                "top-k divergences need a teacher that shares the student's tokenizer"
            )
        entries.append(sorted(top.items()))
    M, K = len(entries), max((len(e) for e in entries), default=1)
    ids_MK = torch.zeros(M, K, dtype=torch.long)
    teacher_MK = torch.zeros(M, K, dtype=torch.float32)
    mask_MK = torch.zeros(M, K, dtype=torch.bool)
    for m, entry in enumerate(entries):
        ids_MK[m, : len(entry)] = torch.tensor([k for k, _ in entry])
        teacher_MK[m, : len(entry)] = torch.tensor([v for _, v in entry])
        mask_MK[m, : len(entry)] = True
    pos = torch.tensor(positions, dtype=torch.long).reshape(-1, 2)
    device = batch.input_ids_BT.device
    return TeacherSupport(
        pos[:, 0].to(device), pos[:, 1].to(device), ids_MK.to(device), teacher_MK.to(device), mask_MK.to(device)
    )


def support_logprobs(
    model: torch.nn.Module,
    input_ids_BT: torch.Tensor,
    attention_mask_BT: torch.Tensor,
    support: TeacherSupport,
    chunk_positions: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student log-probs on the support, and of everything outside it -> (logprobs_MK, log_tail_M).

    Runs the trunk once, then the LM head only at the M scored positions, a
    chunk at a time: no [B, T, V] tensor. log_tail_M = log of the student's
    probability mass outside the (real) support, log(1 - exp(logsumexp of
    the support log-probs)) in float32 (about 1e-7 absolute error; a tail
    below 1e-30 is clamped). Padding entries of the support get the log-prob
    of token 0 (finite; callers mask them).
    """
    position_ids_BT = (attention_mask_BT.long().cumsum(-1) - 1).clamp(min=0)
    kwargs = dict(input_ids=input_ids_BT, attention_mask=attention_mask_BT, position_ids=position_ids_BT)
    trunk, head = _trunk_and_head(model)
    if trunk is None:
        source_BTX = model(**kwargs, use_cache=False).logits
    else:
        source_BTX = trunk(**kwargs, use_cache=False).last_hidden_state
    source_MX = source_BTX[support.rows_M, support.cols_M - 1]  # the state that predicts column c
    out_lp, out_tail = [], []
    for start in range(0, source_MX.shape[0], chunk_positions):
        sl = slice(start, start + chunk_positions)
        logits_CV = (head(source_MX[sl]) if trunk is not None else source_MX[sl]).float()
        lse_C1 = torch.logsumexp(logits_CV, dim=-1, keepdim=True)
        lp_CK = logits_CV.gather(-1, support.ids_MK[sl]) - lse_C1
        out_lp.append(lp_CK)
        # mass outside the support: log(1 - sum_k p_k), from the support's log-mass (ids are unique per
        # position); no V-sized masked copy of the logits. Clamped where the support holds everything.
        inside_C = torch.logsumexp(torch.where(support.mask_MK[sl], lp_CK, float("-inf")), dim=-1)
        out_tail.append(torch.log((-torch.expm1(inside_C)).clamp(min=1e-30)))
    return torch.cat(out_lp, 0), torch.cat(out_tail, 0)

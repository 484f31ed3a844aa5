"""Feedback -> tensors, once per batch: the targets layer of the student loop.

The collector hands back one `Feedback` per prompt group; the losses read
tensors. Every conversion lives here, so an objective never parses feedback
itself and a malformed value is caught in one place:

- `score_table`: `Score` -> rewards_PG, valid_PG, flat_P (a failure or a
  non-finite score masks its whole group; a group whose rewards span at most
  `flat_tolerance` is flat: no learning signal).
- `teacher_token_logprobs`: `TokenLogprobs` -> teacher_BT and mask_BT aligned
  with the batch's columns (values <= -9999, NaN or inf are missing: masked
  and counted); `teacher_support`: the top-k support at each scored position.
- `feedback_pairs`: `Preference` (or best-vs-worst `Score`) -> (winner row, loser row, p).
- `reference_texts`, `encode_text`, `text_rows`: reference answers tokenised
  with the student's tokenizer after the batch's own prompt tokens.

Rows are prompt-major: completion i of prompt group p is row b = p*G + i;
its token t sits at column batch.prompt_len + t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from opd_sdk.errors import ConfigError, TokenizationMismatch
from opd_sdk.rollout.batch import RolloutBatch
from opd_sdk.rollout.logprobs import Support
from opd_sdk.types import (
    Feedback,
    FeedbackFailure,
    Preference,
    Reference,
    Score,
    TokenLogprobs,
)

MISSING_LOGPROB = -9999.0  # servers send -9999 (or less) for minus infinity: a missing value, not a log-prob


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


def count_failures(feedback: Sequence[Any]) -> int:
    return sum(isinstance(fb, FeedbackFailure) for fb in feedback)


# ---------------------------------------------------------------- scores


@dataclass
class ScoreTable:
    rewards_PG: torch.Tensor  # float64 [P, G]; 0.0 where invalid (a placeholder nothing reads)
    valid_PG: torch.Tensor  # bool [P, G]
    flat_P: torch.Tensor  # bool [P]: valid groups whose rewards span <= the tolerance


def score_table(
    batch: RolloutBatch, feedback: Sequence[Feedback], who: str, flat_tolerance: float = 0.0
) -> ScoreTable:
    """Score feedback -> rewards, validity and flat groups.

    A FeedbackFailure masks its whole group; a missing score (NaN, inf or
    None: a pointwise call that failed) masks that completion only.
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
        for g, s in enumerate(fb.scores):
            if _finite(s):
                rewards_PG[p, g] = s
                valid_PG[p, g] = True
    inf = torch.full_like(rewards_PG, math.inf)
    spread_P = torch.where(valid_PG, rewards_PG, -inf).max(-1).values - torch.where(valid_PG, rewards_PG, inf).min(-1).values
    flat_P = valid_PG.any(-1) & (spread_P <= flat_tolerance)
    return ScoreTable(rewards_PG, valid_PG, flat_P)


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


# ---------------------------------------------------------------- token log-probs


@dataclass
class TeacherTokens:
    teacher_BT: torch.Tensor  # float [B, T]: teacher log-prob of the sampled token, 0 off-mask
    mask_BT: torch.Tensor  # float [B, T]: 1 where the token was sampled and the teacher scored it
    missing: int  # sampled tokens (of valid groups) that the teacher did not score
    nonfinite: int  # teacher values that were NaN, inf or <= -9999 (masked out)


def _usable(v: float | None) -> bool:
    return v is not None and math.isfinite(v) and v > MISSING_LOGPROB


def teacher_token_logprobs(batch: RolloutBatch, feedback: Sequence[Feedback], who: str) -> TeacherTokens:
    """TokenLogprobs feedback -> per-token teacher log-probs aligned with batch columns.

    Raises TokenizationMismatch when the teacher scored more tokens than the student sampled.
    """
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
                if _usable(v):
                    teacher_BT[b, L + t] = v
                    mask_BT[b, L + t] = 1.0
                else:
                    nonfinite += 1
    mask_BT = mask_BT * batch.completion_mask_BT.float().cpu()
    device = batch.input_ids_BT.device
    return TeacherTokens(teacher_BT.to(device), mask_BT.to(device), missing, nonfinite)


@dataclass
class TeacherSupport(Support):
    """`Support` (rows_M, cols_M, ids_MK, mask_MK) plus the teacher's log-probs on it.

    teacher_MK: float [M, K] (0 on padding). An entry with a missing value is left out.
    """

    teacher_MK: torch.Tensor = None  # type: ignore[assignment]


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
        top = {k: v for k, v in fb.top_k[b % G][c - L].items() if _usable(v)}
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
        pos[:, 0].to(device), pos[:, 1].to(device), ids_MK.to(device), mask_MK.to(device), teacher_MK.to(device)
    )


# ---------------------------------------------------------------- pairs


def feedback_pairs(batch: RolloutBatch, feedback: Sequence[Feedback], who: str) -> list[tuple[int, int, float]]:
    """(winner row, loser row, probability) for every usable pair in the batch.

    From `Preference`: every pair the teacher gave. From `Score`: the best
    against the worst scored sample of each group (first index on ties); a
    group whose scores are all equal gives no pair; a missing score is left out.
    """
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
                if math.isfinite(pair.probability):
                    pairs.append((p * G + pair.winner, p * G + pair.loser, pair.probability))
        elif isinstance(fb, Score):
            if len(fb.scores) != G:
                raise ConfigError(f"{who}: group {p} has {G} completions but {len(fb.scores)} scores")
            scored = [g for g in range(G) if _finite(fb.scores[g])]  # a missing score is never in a pair
            if len(scored) < 2:
                continue
            best = max(scored, key=lambda g: (fb.scores[g], -g))
            worst = min(scored, key=lambda g: (fb.scores[g], g))
            if fb.scores[best] > fb.scores[worst]:
                pairs.append((p * G + best, p * G + worst, 1.0))
    return pairs


# ---------------------------------------------------------------- reference text


def reference_texts(
    batch: RolloutBatch,
    feedback: Sequence[Feedback] | None,
    source: str,
    who: str,
    all_references: bool = False,
) -> tuple[list[tuple[int, str]], int]:
    """(prompt index, text) pairs to learn from, and how many prompts had none.

    source="answer": PromptItem.answer. source="reference": the first (or
    every, with all_references) completion of each Reference feedback;
    failures are skipped (the caller counts them).
    """
    out: list[tuple[int, str]] = []
    missing = 0
    if source == "answer":
        for p, item in enumerate(batch.prompts):
            if item.answer is None:
                missing += 1
            else:
                out.append((p, item.answer))
        return out, missing
    if source != "reference":
        raise ConfigError(f"{who}: source must be 'answer' or 'reference', got {source!r}")
    if feedback is None:
        raise ConfigError(f"{who}(source='reference') needs Reference feedback from a teacher")
    check_feedback(batch, feedback, who)
    for p, fb in enumerate(feedback):
        expect_kind(fb, ("reference",), who, p)
        if isinstance(fb, FeedbackFailure):
            continue
        assert isinstance(fb, Reference)
        texts = [c.text for c in fb.completions] if all_references else [fb.completions[0].text]
        out.extend((p, t) for t in texts)
    return out, missing


def encode_text(tokenizer: Any, text: str, append_eos: bool = True) -> list[int]:
    """Student token ids of `text` (no special tokens added), with EOS appended once.

    Token ids a teacher sends with a `Reference` are ignored on purpose: they
    are in the teacher's vocabulary, not the student's.
    """
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    eos = getattr(tokenizer, "eos_token_id", None)
    if append_eos:
        if eos is None:
            raise ConfigError("the tokenizer has no eos_token_id; set one or pass append_eos=False")
        if not ids or ids[-1] != eos:
            ids.append(eos)
    if not ids:
        raise ConfigError(f"text {text!r} tokenises to nothing; give a non-empty answer")
    return ids


def text_rows(
    batch: RolloutBatch, items: Sequence[tuple[int, list[int]]], pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Build rows [prompt of group p | ids] for items (p, ids) -> (input_ids_NT, attention_NT, target_mask_NT).

    The batch's own prompt tokens are reused (exactly what the student saw).
    N = len(items); T = batch.prompt_len + longest ids. target_mask_NT is 1.0
    on the appended ids (the positions whose log-probs the losses read).
    """
    G, L = batch.group_size, batch.prompt_len
    longest = max(len(ids) for _, ids in items)
    N, T = len(items), L + longest
    device = batch.input_ids_BT.device
    input_ids_NT = torch.full((N, T), pad_id, dtype=torch.long, device=device)
    attention_NT = torch.zeros(N, T, dtype=batch.attention_mask_BT.dtype, device=device)
    target_NT = torch.zeros(N, T, dtype=torch.float32, device=device)
    for n, (p, ids) in enumerate(items):
        row = p * G
        input_ids_NT[n, :L] = batch.input_ids_BT[row, :L]
        attention_NT[n, :L] = batch.attention_mask_BT[row, :L]
        input_ids_NT[n, L : L + len(ids)] = torch.tensor(ids, dtype=torch.long, device=device)
        attention_NT[n, L : L + len(ids)] = 1
        target_NT[n, L : L + len(ids)] = 1.0
    return input_ids_NT, attention_NT, target_NT

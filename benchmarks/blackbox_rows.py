"""The rows of benchmarks/blackbox.py: how each method of issue #19's table is wired.

A row is one or more phases; a phase builds an objective and its teacher (or
none) from a `RowContext` and trains for a share of the row's steps. Every
remote teacher is reached only through `RowContext.endpoint` (a URL and a
served model name), as a hosted model would be. The registry `ROWS` is the
one list the benchmark runs; a new method is one entry.

Rows (issue #19):
1. sft: off-policy SFT on the teacher's sampled answers (G per prompt: as many
   teacher sequences a step as the on-policy rows have student samples).
2. reverse_kl: on-policy token-level reverse KL, `LogprobTeacher` (teacher
   log-probs of the student's tokens, vLLM echo) + `TokenDistill(reverse_kl_pg)`.
3. gkd_jsd: GKD's generalised JSD (beta 0.5) over the teacher's top-k log-probs.
4. spin: SPIN against one teacher reference per prompt (sequence level, text only).
5. sft_then_reverse_kl: the first half of the steps row 1, the rest row 2
   (a fresh optimizer for the second phase).
6. control: teacher-free: `ConstantAdvantageTeacher` makes TokenDistill's
   reverse-KL advantage a constant -shift on every sampled token (the "fixed
   negative advantage" control), same loss, optimiser and steps.
7. verifier_rloo: the task's verifier (ground truth, no teacher) with RLOO.
8. gad: GAD (issue #20; Ye et al. 2025, arXiv 2511.10643): `DiscriminatorTeacher`, a copy of
   the student with a scalar head, learns (Bradley-Terry) to score the teacher's text above the
   student's samples, and its score of each sample is the reward, with RLOO as in the paper
   (`RewardWeighted(advantage="rloo")`). The teacher's text comes from one `ReferenceTeacher`
   answer per prompt over HTTP (the endpoint of rows 1 and 4), paid once per prompt for the
   whole row (D keeps it); those calls are counted through the trainer's `usage_total` (the
   reference teacher's own collector), D's CPU in the cell's. D's settings are GADParams'
   defaults (lr 1e-5, one update per step, full weights) except its warm-up: the first
   `max(1, steps // 10)` batches, 8 updates each before scoring. The student's SFT warm-up
   of the paper is not in this row (row 5 is that recipe for reverse KL).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from opd_sdk.objectives import SFT, SPIN, RewardWeighted, TokenDistill
from opd_sdk.types import Feedback, FeedbackFailure, FeedbackRequest, TokenLogprobs
from providers.gad import DiscriminatorTeacher
from providers.logprob import LogprobTeacher
from providers.reference import ReferenceTeacher
from providers.verifier import VerifierTeacher


@dataclass(frozen=True)
class Endpoint:
    """The black-box teacher as the loop sees it: an OpenAI-compatible base URL and a model name."""

    base_url: str
    model: str
    api_key: str = "EMPTY"  # a local vLLM server needs none; the openai client insists on one


@dataclass
class RowContext:
    """What a row's builders may use: the student (read by the teacher-free control, and copied as GAD's
    discriminator), its tokenizer, the teacher endpoint and the run's sampling settings."""

    student: Any
    tokenizer: Any
    endpoint: Endpoint
    steps: int
    group_size: int
    max_new_tokens: int
    temperature: float
    top_k: int = 5
    control_shift: float = 1.0


Build = Callable[[RowContext], tuple[Any, Any]]  # -> (objective, teacher or None)


@dataclass(frozen=True)
class Phase:
    share: float  # of the row's steps
    build: Build
    one_sample: bool = False  # the objective reads no student samples: draw 1 per prompt, not G


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    phases: tuple[Phase, ...]


class ConstantAdvantageTeacher:
    """A teacher-free control: the student's own log-prob of each sampled token, minus `shift`.

    With `TokenDistill(divergence="reverse_kl_pg")` the per-token reward is
    r_t = log p_T(y_t) - log p_S(y_t) = -shift for every token: a constant
    negative advantage on the student's samples. Its expected gradient is zero
    (the score function has mean zero), so what it moves is what the optimiser
    does with sampling noise: the control for "how much of OPD's gain needs no
    teacher". Local (runs the live student in process), never cached.
    """

    local = True
    cacheable = False

    def __init__(self, model: Any, *, shift: float = 1.0) -> None:
        self.model, self.shift = model, float(shift)
        self.id = f"constant-advantage:{self.shift}"

    def feedback_local(self, requests: Sequence[FeedbackRequest]) -> list[Feedback]:
        out: list[Feedback] = []
        device = next(self.model.parameters()).device
        with torch.no_grad():
            for request in requests:
                if request.prompt_token_ids is None or any(c.token_ids is None for c in request.completions):
                    out.append(FeedbackFailure(reason="the control needs prompt and completion token ids",
                                               error_type="bad_response"))
                    continue
                rows = []
                for c in request.completions:
                    ids = torch.tensor([list(request.prompt_token_ids) + list(c.token_ids)], device=device)
                    lp = torch.log_softmax(self.model(ids).logits[0, :-1].float(), -1)
                    start = len(request.prompt_token_ids) - 1
                    picked = lp[start:].gather(-1, ids[0, start + 1:, None])[:, 0]
                    rows.append([float(v) - self.shift for v in picked])
                out.append(TokenLogprobs(logprobs=rows))
        return out

    async def feedback(self, request: FeedbackRequest) -> Feedback:
        return self.feedback_local([request])[0]


def _reference(ctx: RowContext, n: int) -> ReferenceTeacher:
    e = ctx.endpoint
    return ReferenceTeacher(e.model, base_url=e.base_url, api_key=e.api_key, n=n, temperature=ctx.temperature,
                            max_tokens=ctx.max_new_tokens)


def _logprob(ctx: RowContext, top_k: int) -> LogprobTeacher:
    e = ctx.endpoint
    return LogprobTeacher(e.model, base_url=e.base_url, api_key=e.api_key, tokenizer=ctx.tokenizer,
                          send="token_ids", top_k=top_k)


def _sft(ctx: RowContext) -> tuple[Any, Any]:
    return SFT(ctx.tokenizer, source="reference", all_references=True), _reference(ctx, ctx.group_size)


def _reverse_kl(ctx: RowContext) -> tuple[Any, Any]:
    return TokenDistill(divergence="reverse_kl_pg"), _logprob(ctx, 0)


def _gkd(ctx: RowContext) -> tuple[Any, Any]:
    return TokenDistill(divergence="jsd", beta=0.5), _logprob(ctx, ctx.top_k)


def _spin(ctx: RowContext) -> tuple[Any, Any]:
    return SPIN(ctx.tokenizer, source="reference", beta=0.1, refresh_every=max(1, ctx.steps // 3)), _reference(ctx, 1)


def _control(ctx: RowContext) -> tuple[Any, Any]:
    return TokenDistill(divergence="reverse_kl_pg"), ConstantAdvantageTeacher(ctx.student, shift=ctx.control_shift)


def _verifier(ctx: RowContext) -> tuple[Any, Any]:
    return RewardWeighted(advantage="rloo"), VerifierTeacher(mode="numeric")


def _gad(ctx: RowContext) -> tuple[Any, Any]:
    teacher = DiscriminatorTeacher(ctx.student, ctx.tokenizer, _reference(ctx, 1),
                                   warmup_steps=max(1, ctx.steps // 10), warmup_updates=8)
    return RewardWeighted(advantage="rloo"), teacher


ROWS: dict[str, Row] = {
    "sft": Row("sft", "off-policy SFT on teacher samples", (Phase(1.0, _sft, one_sample=True),)),
    "reverse_kl": Row("reverse_kl", "on-policy reverse KL (teacher log-probs)", (Phase(1.0, _reverse_kl),)),
    "gkd_jsd": Row("gkd_jsd", "GKD: JSD(0.5) over teacher top-k", (Phase(1.0, _gkd),)),
    "spin": Row("spin", "SPIN vs teacher references", (Phase(1.0, _spin),)),
    "sft_then_reverse_kl": Row("sft_then_reverse_kl", "SFT, then on-policy reverse KL",
                               (Phase(0.5, _sft, one_sample=True), Phase(0.5, _reverse_kl))),
    "control": Row("control", "teacher-free control (constant negative advantage)", (Phase(1.0, _control),)),
    "verifier_rloo": Row("verifier_rloo", "verifier + RLOO (ground truth, no teacher)", (Phase(1.0, _verifier),)),
    "gad": Row("gad", "GAD: discriminator reward on teacher text (RLOO)", (Phase(1.0, _gad),)),
}


def phase_steps(row: Row, steps: int) -> list[int]:
    """Steps of each phase: shares rounded, the last phase taking what is left (sums to `steps`)."""
    out, used = [], 0
    for i, phase in enumerate(row.phases):
        n = steps - used if i == len(row.phases) - 1 else round(phase.share * steps)
        out.append(n)
        used += n
    return out

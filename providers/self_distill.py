"""SelfDistillTeacher: the student itself, shown privileged context, as the teacher.

Follows on-policy self-distillation with privileged information (OPSD,
Zhao et al. 2026; SDFT, Shenfeld et al. 2026; SDPO, Hubotter et al. 2026):
the same network conditioned on a reference solution (or a hidden rubric,
tool output, feedback on an earlier attempt) scores the student's own
samples token by token, and the student learns to match that distribution
without the context. Departures: we return only per-token log-probabilities
(and optional top-k), leaving the divergence to the objective
(`TokenDistill`), and the teacher weights are the user's choice:

- mode="frozen" (the default, from YAML and Python alike): a copy of the
  student taken at construction (or at `refresh()`). The default because it
  is the one that learns (README, "Teacher-free distillation": greedy
  accuracy 33.3% -> 61.9% with a frozen teacher, -> 0.0% with a live one,
  which moves with the student and collapses with it), and its answers are
  cacheable.
- mode="live": the policy being trained, read as it is at call time. The
  teacher pass runs under `torch.no_grad()`, so no gradient flows through it.
- mode="ema": a copy updated as ema = d*ema + (1-d)*policy once per
  optimizer step: the trainer calls `on_optimizer_step(step)` (the
  `opd_sdk.feedback.teacher.FollowsStudent` hook) after each step, and the EMA folds
  there, once per step number. Scoring never folds.

Views. The student view is the prompt rendered with the tokenizer's chat
template (generation prompt added); the teacher view is the same prompt with
the privileged text placed by `PrivilegedTemplate`. The teacher scores
teacher-prompt ids + the student's own completion ids, so the completion
tokens are identical by construction. Before scoring, each completion is
checked: both full conversations (prompt + assistant turn) are rendered with
the template and tokenised; each must extend its prompt's tokens, and the
tokens after the prompt must be identical in the two views. Otherwise
`TokenizationMismatch` is raised and nothing is scored.

Caching and overlap: the answers of a live or EMA teacher change every
optimizer step, and a cache keyed by `id` would serve answers computed with
older weights: `cacheable` is False, so the collector keeps no cache for it
and the trainer refuses `max_staleness >= 1` with it (it would be asked
ahead of the step that changes its weights). A frozen teacher is cacheable;
its id changes at `refresh()`.

Token ids: when a request's `tokenizer` fingerprint equals this teacher's
tokenizer's (computed once, at construction), each completion's `token_ids`
are scored as they are, without re-rendering or re-tokenising the student
view (only the teacher view's prompt is rendered, once per prompt and
privileged text). A request from another tokenizer, or completions without
ids, are rendered from text and checked as described above.

Local: `feedback_local(requests)` (= `score_batch`) runs in process;
`opd_sdk.make_collector` runs it in the calling thread, with no loop or retries.

Assumes the rollout engine tokenises prompts the same way (chat template
rendered as text, then tokenised without added special tokens).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from opd_sdk.errors import ConfigError, TokenizationMismatch
from opd_sdk.feedback.teacher import fingerprint, tokenizer_fingerprint
from opd_sdk.types import (
    CallUsage,
    ChatMessage,
    Feedback,
    FeedbackFailure,
    FeedbackRequest,
    TokenLogprobs,
)
from providers.privileged import PrivilegedTemplate

Mode = Literal["live", "frozen", "ema"]
def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    twin = copy.deepcopy(model).eval()
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


class SelfDistillParams(BaseModel):
    """SelfDistillTeacher's parameters as a config gives them (the `self_distill` teacher
    section), with their defaults: the constructor's defaults are these. (The model and
    tokenizer are the student's; the template is `PrivilegedTemplate`'s fields.)"""

    model_config = ConfigDict(extra="forbid")

    mode: Mode = "frozen"
    ema_decay: float = Field(0.99, ge=0.0, lt=1.0)
    top_k: int = Field(0, ge=0)
    temperature: float = Field(1.0, gt=0.0)
    chunk_rows: int = Field(8, ge=1)
    name: str | None = None


_DEFAULTS = SelfDistillParams()


class SelfDistillTeacher:
    """Teacher = the student model with privileged context; returns TokenLogprobs.

    model: the policy (a Hugging Face causal LM module).
    tokenizer: its tokenizer (with a chat template, or plain-text prompts).
    mode: "frozen" (default), "live" or "ema" (see the module docstring).
    ema_decay: d in ema = d*ema + (1-d)*policy (mode="ema" only).
    template: where the privileged text goes (PrivilegedTemplate).
    top_k: also return the teacher's top-k log-probs at each position (0: off).
    temperature: teacher logits are divided by it before the softmax.
    chunk_rows: rows per forward pass chunk (bounds the [rows, T, V] logits).
    name: the model's name in `id` (default: config._name_or_path).
    autocast_dtype: run the teacher pass under autocast (e.g. torch.bfloat16,
        to match a trainer running with precision="bf16"); None: full precision.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        mode: Mode = _DEFAULTS.mode,
        ema_decay: float = _DEFAULTS.ema_decay,
        template: PrivilegedTemplate | None = None,
        top_k: int = _DEFAULTS.top_k,
        temperature: float = _DEFAULTS.temperature,
        chunk_rows: int = _DEFAULTS.chunk_rows,
        name: str | None = _DEFAULTS.name,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        if mode not in ("live", "frozen", "ema"):
            raise ConfigError(f"mode must be 'live', 'frozen' or 'ema', got {mode!r}")
        if not 0.0 <= ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if top_k < 0 or temperature <= 0 or chunk_rows < 1:
            raise ConfigError("need top_k >= 0, temperature > 0 and chunk_rows >= 1")
        if not isinstance(model, torch.nn.Module):
            raise ConfigError("model must be a loaded torch model (the policy), not a path; load it first")
        self.policy = model
        self.tokenizer = tokenizer
        self.mode = mode
        self.ema_decay = ema_decay
        self.template = template or PrivilegedTemplate()
        self.template.resolved_text()  # validate early
        self.top_k = top_k
        self.temperature = temperature
        self.chunk_rows = chunk_rows
        self.name = name or str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)
        self.autocast_dtype = autocast_dtype
        self._refreshes = 0
        self._copy = None if mode == "live" else _frozen(model)
        self._folded_step = 0
        self.tokenizer_id = tokenizer_fingerprint(tokenizer)
        self._prompt_cache: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
        probe = FeedbackRequest(prompt="What is 2 plus 2?", completions=[{"text": "4"}], privileged="2 + 2 = 4")
        self.check_views(probe)  # a template that cannot work fails here, not mid-training

    # --- identity and weights -------------------------------------------------
    @property
    def id(self) -> str:
        params: dict[str, Any] = dict(
            model=self.name,
            mode=self.mode,
            placement=self.template.placement,
            text=self.template.resolved_text(),
            top_k=self.top_k,
            temperature=self.temperature,
            chat_template=getattr(self.tokenizer, "chat_template", None),
            autocast=str(self.autocast_dtype),
        )
        if self.mode == "ema":
            params["ema_decay"] = self.ema_decay
        if self.mode == "frozen":
            params["refreshes"] = self._refreshes
        return fingerprint("self_distill", **params)

    local = True  # runs in process over the batch (opd_sdk.feedback.teacher.LocalTeacher)

    @property
    def cacheable(self) -> bool:
        """Only a frozen teacher answers the same request the same way every step."""
        return self.mode == "frozen"

    @property
    def teacher_model(self) -> torch.nn.Module:
        return self.policy if self._copy is None else self._copy

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the policy's current weights into the frozen / EMA copy."""
        if self._copy is not None:
            self._copy.load_state_dict(self.policy.state_dict())
            self._refreshes += 1

    @torch.no_grad()
    def on_optimizer_step(self, step: int) -> None:
        """The trainer's hook after optimizer step `step` (1, 2, ...; `FollowsStudent`).

        EMA mode folds ema = d*ema + (1-d)*policy, once per step number (a repeated or
        older step number is ignored). Live and frozen modes do nothing.
        """
        if self.mode != "ema" or step <= self._folded_step:
            return
        src = dict(self.policy.named_parameters())
        for name, p_ema in self._copy.named_parameters():
            p_ema.mul_(self.ema_decay).add_(src[name].detach().to(p_ema.dtype), alpha=1.0 - self.ema_decay)
        self._folded_step = step

    # --- views ------------------------------------------------------------------
    def _render(self, messages: list[ChatMessage], completion: str | None) -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            conv = [m.model_dump() for m in messages]
            if completion is not None:
                conv.append({"role": "assistant", "content": completion})
            text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=completion is None)
        else:
            text = "\n\n".join(m.content for m in messages) + (completion or "")
        return list(tok(text, add_special_tokens=False)["input_ids"])

    def _teacher_messages(self, request: FeedbackRequest) -> list[ChatMessage]:
        messages = request.prompt_messages()
        if getattr(self.tokenizer, "chat_template", None) or self.template.placement == "user_suffix":
            return self.template.apply(messages, request.privileged or "")
        filled = self.template.resolved_text().replace("{privileged}", request.privileged or "")
        return [ChatMessage(role="system", content=filled)] + messages  # plain text: prepend

    def prompt_ids(self, request: FeedbackRequest) -> tuple[list[int], list[int]]:
        """(student-view prompt ids, teacher-view prompt ids) for a request."""
        key = (request.model_dump_json(include={"prompt"}), request.privileged or "")
        if key not in self._prompt_cache:
            student = self._render(request.prompt_messages(), None)
            teacher = self._render(self._teacher_messages(request), None)
            self._prompt_cache[key] = (student, teacher)
        return self._prompt_cache[key]

    def check_views(self, request: FeedbackRequest) -> None:
        """Raise TokenizationMismatch unless both views tokenise every completion alike."""
        student_prompt, teacher_prompt = self.prompt_ids(request)
        views = {"student": (request.prompt_messages(), student_prompt),
                 "teacher": (self._teacher_messages(request), teacher_prompt)}
        for i, comp in enumerate(request.completions):
            tails = {}
            for view, (messages, prompt) in views.items():
                full = self._render(messages, comp.text)
                if full[: len(prompt)] != prompt:
                    raise TokenizationMismatch(
                        f"{view} view, completion {i}: the chat template renders the conversation with the "
                        f"assistant turn so that it no longer starts with the generation prompt's tokens "
                        f"(first difference at token {_first_diff(full, prompt)}). Scoring prompt ids + "
                        "completion ids would not match what the template produces; use a chat template "
                        "whose assistant turn extends the generation prompt."
                    )
                tails[view] = full[len(prompt):]
            if tails["student"] != tails["teacher"]:
                at = _first_diff(tails["student"], tails["teacher"])
                dec = self.tokenizer.decode
                raise TokenizationMismatch(
                    f"completion {i} tokenises differently in the student and teacher views (placement="
                    f"{self.template.placement!r}): from completion token {at} the student view has "
                    f"{dec(tails['student'][at:at + 8])!r} and the teacher view "
                    f"{dec(tails['teacher'][at:at + 8])!r}. The chat template renders the assistant turn "
                    "differently when the privileged context is present; try placement='user_suffix', or a "
                    "chat template whose assistant turn does not depend on earlier messages."
                )

    # --- scoring ------------------------------------------------------------------
    def same_tokenizer(self, request: FeedbackRequest) -> bool:
        """Whether the request's fingerprint says its token ids come from this teacher's tokenizer."""
        return request.tokenizer is not None and request.tokenizer == self.tokenizer_id

    def _completion_ids(self, request: FeedbackRequest) -> list[list[int]]:
        """Completion ids to score: as sent unless the request names another tokenizer (then the
        text is re-tokenised); a request without a fingerprint keeps its ids (checked by views)."""
        out = []
        foreign = request.tokenizer is not None and request.tokenizer != self.tokenizer_id
        for comp in request.completions:
            ids = None if foreign else comp.token_ids
            if ids is None:
                ids = list(self.tokenizer(comp.text, add_special_tokens=False)["input_ids"])
            if not ids:
                raise ConfigError("a completion has no tokens; drop empty completions before asking for feedback")
            out.append(list(ids))
        return out

    def score_batch(self, requests: Sequence[FeedbackRequest]) -> list[Feedback]:
        """Synchronous core: one batched teacher pass over every completion of every request.

        Returns one TokenLogprobs per request (logprobs[i][t] for completion i, token t), or a
        FeedbackFailure for a request without privileged context. Raises TokenizationMismatch
        when a request re-rendered from text tokenises differently in the two views.
        """
        results: list[Feedback | None] = [None] * len(requests)
        rows: list[tuple[int, list[int], list[int]]] = []  # (request index, teacher prompt, completion)
        for r, req in enumerate(requests):
            if not req.privileged:
                results[r] = FeedbackFailure(
                    reason="request has no privileged context for the self-distillation teacher",
                    error_type="missing_privileged",
                    attempts=1,
                )
                continue
            if not (self.same_tokenizer(req) and all(c.token_ids is not None for c in req.completions)):
                self.check_views(req)  # ids from text (or another tokenizer): check both views agree
            _, teacher_prompt = self.prompt_ids(req)
            rows.extend((r, teacher_prompt, ids) for ids in self._completion_ids(req))
        scored = self._forward(rows) if rows else []
        per_request: dict[int, list[tuple[list[float], list[dict[int, float]] | None, int]]] = {}
        for (r, prompt, _), (lp, topk) in zip(rows, scored, strict=True):
            per_request.setdefault(r, []).append((lp, topk, len(prompt)))
        for r, items in per_request.items():
            results[r] = TokenLogprobs(
                logprobs=[lp for lp, _, _ in items],
                top_k=[tk for _, tk, _ in items] if self.top_k else None,
                details={"mode": self.mode, "teacher_prompt_tokens": items[0][2]},
                usage=CallUsage(prompt_tokens=sum(n + len(lp) for lp, _, n in items)),
            )
        assert all(res is not None for res in results)
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def _forward(self, rows: list[tuple[int, list[int], list[int]]]):
        model = self.teacher_model
        was_training = model.training
        model.eval()
        try:
            device = next(model.parameters()).device
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            out = []
            for start in range(0, len(rows), self.chunk_rows):
                chunk = rows[start:start + self.chunk_rows]
                lp_max = max(len(p) for _, p, _ in chunk)
                lc_max = max(len(c) for _, _, c in chunk)
                ids, mask = [], []
                for _, p, c in chunk:  # [left pad | prompt | completion | right pad]
                    ids.append([pad] * (lp_max - len(p)) + p + c + [pad] * (lc_max - len(c)))
                    mask.append([0] * (lp_max - len(p)) + [1] * (len(p) + len(c)) + [0] * (lc_max - len(c)))
                input_ids_BT = torch.tensor(ids, device=device)
                mask_BT = torch.tensor(mask, device=device)
                autocast = (torch.autocast(device.type, dtype=self.autocast_dtype)
                            if self.autocast_dtype is not None else contextlib.nullcontext())
                with autocast:
                    logits_BCV = _completion_logits(model, input_ids_BT, mask_BT, lc_max)
                logp_BCV = torch.log_softmax(logits_BCV.float() / self.temperature, dim=-1)
                targets_BC = input_ids_BT[:, lp_max:]
                picked_BC = logp_BCV.gather(-1, targets_BC.unsqueeze(-1)).squeeze(-1)
                if self.top_k:
                    top_vals, top_ids = logp_BCV.topk(self.top_k, dim=-1)
                for b, (_, _, c) in enumerate(chunk):
                    n = len(c)
                    topk = None
                    if self.top_k:
                        topk = [dict(zip(top_ids[b, t].tolist(), top_vals[b, t].tolist(), strict=True))
                                for t in range(n)]
                    out.append((picked_BC[b, :n].tolist(), topk))
            return out
        finally:
            model.train(was_training)

    def feedback_local(self, requests: Sequence[FeedbackRequest]) -> list[Feedback]:
        return self.score_batch(requests)

    async def feedback_batch(self, requests: Sequence[FeedbackRequest]) -> list[Feedback]:
        return self.score_batch(requests)

    async def feedback(self, request: FeedbackRequest) -> Feedback:
        return self.score_batch([request])[0]


def _completion_logits(model, input_ids_BT, mask_BT, lc_max: int) -> torch.Tensor:
    """[B, C, V] logits predicting the last C = lc_max columns (position T-C-1+j predicts token T-C+j)."""
    position_ids_BT = (mask_BT.cumsum(-1) - 1).clamp(min=0)
    kwargs = dict(input_ids=input_ids_BT, attention_mask=mask_BT, position_ids=position_ids_BT, use_cache=False)
    try:  # only the completion's logits: the head never sees the (long) teacher prompt
        return model(**kwargs, logits_to_keep=lc_max + 1).logits[:, :lc_max]
    except TypeError:  # a model without logits_to_keep
        return model(**kwargs).logits[:, -lc_max - 1 : -1]


def _first_diff(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))

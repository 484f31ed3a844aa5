"""DiscriminatorTeacher: on-policy distillation from a teacher that returns only text (GAD).

Generative Adversarial Distillation (Ye et al. 2025, "Black-Box On-Policy
Distillation of Large Language Models", arXiv 2511.10643). The student is the
generator; a local discriminator D learns to tell the teacher's answers from
the student's, with the Bradley-Terry loss

    L_D = -log sigmoid( D(x, y_teacher) - D(x, y_student) )

(`providers.discriminator`), and D(x, y_student) is the student's reward,
returned as `Score` feedback (one per completion): any reward objective
learns from it (GRPO / RLOO with `reward_weighted`, as in the paper). The
reward moves with D, toward the teacher's distribution, so the student is
never optimising a fixed scorer it could exploit: the paper reports that a
frozen D is hacked (answers grew past a thousand tokens).

Per batch (`feedback_local`, on the training thread): the teacher's text for
each prompt (from a `ReferenceTeacher` through its own collector: limits,
retries, budget, persistent cache; also kept in this teacher's state, so each
prompt's text is paid once for the whole run, across epochs and resumes), D
scores every student answer, then D takes `updates_per_step` optimizer steps
on the batch's (teacher, student) pairs. The scores and `metrics()` (gad/loss,
gad/accuracy, gad/margin: D before it learns from this batch, i.e. on answers
it has not seen) are from before those steps, as in the paper, where the
reward of a step comes from the discriminator of that step.

Departures from the paper:
- Warm-up. The paper warms up for an epoch before GAD: the student by SFT on
  the teacher text and D by the Bradley-Terry loss. Here D's warm-up is its
  first `warmup_steps` batches: on each it takes `warmup_updates` steps
  *before* scoring, so the student's first rewards come from a D that has
  seen teacher and student text. The student's warm-up is a run of its own
  (objective `sft` with `source: reference` on the same reference teacher and
  cache, whose teacher text is then served from the cache) whose final/ the
  GAD run starts from; see README, "GAD".
- D reads the answer as text re-tokenised with the student's tokenizer after
  the chat-templated prompt, EOS appended, for teacher and student alike (not
  the student's sampled ids, which would give D a tokenisation tell), cut to
  `max_tokens` answer tokens.
- Several teacher answers per prompt (`n` of the reference teacher): every
  (teacher, student) pair of the prompt is a term of the loss.
- Multi-process launch: the trainer asks teachers on rank 0 only and sends
  the feedback to every rank, so D lives, learns and is checkpointed on rank
  0 alone; the other ranks never build it (no all-reduce of D's gradients).

Checkpoints: `state_dict()` holds D's trainable weights, its AdamW state, its
counters and the teacher texts; the trainer saves it in every checkpoint
(`teachers.pt`) and a resume restores it exactly. D learns while its batch is
collected, so a checkpoint written on Ctrl-C in the middle of a step (which
rewinds the sampler to redraw that step's batch) holds a D that has already
learnt from that batch once; scheduled checkpoints have no such overlap.
It does not use the trainer's step hook (`on_optimizer_step`): D does not
follow the student's weights, and it must learn on steps the student skips.

Requires `rollout.max_staleness: 0` (its answers change at every batch, so it
is not cacheable; the trainer refuses overlap with such a teacher).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from opd_sdk.errors import ConfigError
from opd_sdk.feedback.factory import Collector, make_collector
from opd_sdk.feedback.teacher import fingerprint
from opd_sdk.types import Feedback, FeedbackFailure, FeedbackRequest, Reference, Score
from providers.discriminator import Discriminator, bt_update, check_fits, score_rows


class GADParams(BaseModel):
    """DiscriminatorTeacher's parameters as a config gives them (the `gad` teacher section), with
    their defaults: the constructor's defaults are these."""

    model_config = ConfigDict(extra="forbid")

    discriminator: str | None = None
    lora: dict[str, Any] | None = None
    source: Literal["teacher", "answer"] = "teacher"
    lr: float = Field(1e-5, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    updates_per_step: int = Field(1, ge=1)
    warmup_steps: int = Field(0, ge=0)
    warmup_updates: int = Field(8, ge=1)
    max_tokens: int = Field(512, ge=1)
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    chunk_rows: int = Field(8, ge=1)


_DEFAULTS = GADParams()


class DiscriminatorTeacher:
    """GAD's discriminator as a local teacher; see the module docstring.

        teacher = DiscriminatorTeacher(student, tokenizer, ReferenceTeacher(model, base_url=url), **params)

    where `params` is a `gad` config section's dict (its `GADParams` fields; the YAML's nested
    `teacher:` is the reference). Give it to `opd_sdk.make_collector` like any teacher. The
    reference teacher's calls are counted in the trainer's `usage_total` (and `teacher.reference.usage`),
    not in the LocalRunner's own `usage`.

    student: the student model (the discriminator's default backbone is a copy of it, taken here,
        before training; the student itself is never held).
    tokenizer: the student's tokenizer (renders prompts and tokenises answers for D).
    reference: where the teacher's text comes from when source="teacher": a collector
        (`opd_sdk.make_collector(ReferenceTeacher(...), cache=...)`, whose limits, budget and
        cache apply) or a teacher (given a collector with defaults and no persistent cache).
    discriminator: None (a copy of the student), a model name or folder (loaded with
        AutoModelForCausalLM and AutoTokenizer), or a loaded module (then give its tokenizer as
        discriminator_tokenizer). Its vocabulary must equal the student's.
    source: "teacher" (the reference teacher's answers) or "answer" (PromptItem.answer holds
        teacher text collected beforehand, e.g. with `opd collect`).
    lr, weight_decay: D's AdamW. updates_per_step: D's optimizer steps per batch.
    warmup_steps, warmup_updates: D's warm-up (module docstring).
    max_tokens: answer tokens D reads. max_grad_norm: D's gradient clip (None: off).
    chunk_rows: rows per D forward pass.
    free_bytes: the memory free for D (None: measured; for tests).

    Raises ConfigError for a discriminator whose vocabulary differs from the student's, one that
    cannot fit in memory, or source="teacher" without a reference.
    """

    local = True  # runs in process over the batch (opd_sdk.feedback.teacher.LocalTeacher)
    cacheable = False  # D changes at every batch

    def __init__(
        self,
        student: torch.nn.Module,
        tokenizer: Any,
        reference: Any = None,
        *,
        discriminator: str | torch.nn.Module | None = _DEFAULTS.discriminator,
        discriminator_tokenizer: Any = None,
        lora: dict[str, Any] | None = _DEFAULTS.lora,
        source: Literal["teacher", "answer"] = _DEFAULTS.source,
        lr: float = _DEFAULTS.lr,
        weight_decay: float = _DEFAULTS.weight_decay,
        updates_per_step: int = _DEFAULTS.updates_per_step,
        warmup_steps: int = _DEFAULTS.warmup_steps,
        warmup_updates: int = _DEFAULTS.warmup_updates,
        max_tokens: int = _DEFAULTS.max_tokens,
        max_grad_norm: float | None = _DEFAULTS.max_grad_norm,
        chunk_rows: int = _DEFAULTS.chunk_rows,
        free_bytes: int | None = None,
    ) -> None:
        try:  # bounds, as a config checks them
            GADParams(discriminator=discriminator if isinstance(discriminator, str) else None, lora=lora,
                      source=source, lr=lr, weight_decay=weight_decay, updates_per_step=updates_per_step,
                      warmup_steps=warmup_steps, warmup_updates=warmup_updates, max_tokens=max_tokens,
                      max_grad_norm=max_grad_norm, chunk_rows=chunk_rows)
        except ValidationError as exc:
            raise ConfigError(f"DiscriminatorTeacher: {exc}") from None
        if source == "teacher" and reference is None:
            raise ConfigError("GAD with source='teacher' needs a reference teacher (a ReferenceTeacher, config "
                              "`teacher: {type: reference, ...}` inside the gad section) whose text D learns to prefer")
        if source == "teacher":
            self.reference = reference if isinstance(reference, Collector) else make_collector(reference, progress=False)
        else:
            self.reference = None
        self.collectors = [self.reference] if self.reference is not None else []
        self.tokenizer = tokenizer
        self.source, self.updates_per_step = source, updates_per_step
        self.warmup_steps, self.warmup_updates = warmup_steps, warmup_updates
        self.max_tokens, self.max_grad_norm, self.chunk_rows = max_tokens, max_grad_norm, chunk_rows
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        device = next(student.parameters()).device
        backbone, self.name = self._backbone(student, tokenizer, discriminator, discriminator_tokenizer, device,
                                             lora=bool(lora), free_bytes=free_bytes)
        self.model = Discriminator(backbone.to(device), lora=lora)
        self.optimizer = torch.optim.AdamW(list(self.model.trainable().values()), lr=lr, weight_decay=weight_decay)
        self.batches = 0  # batches D has answered (warm-up counts them)
        self.updates = 0  # D's optimizer steps
        self.references: dict[str, list[str]] = {}  # prompt key -> the teacher's texts (saved in checkpoints)
        self._metrics: dict[str, float] = {}
        self.id = fingerprint(
            "gad", discriminator=self.name, lora=lora, source=source, lr=lr, weight_decay=weight_decay,
            updates_per_step=updates_per_step, warmup_steps=warmup_steps, warmup_updates=warmup_updates,
            max_tokens=max_tokens, reference=getattr(getattr(self.reference, "teacher", None), "id", None),
        )

    @staticmethod
    def _backbone(student, tokenizer, discriminator, discriminator_tokenizer, device, *, lora, free_bytes):
        """(D's backbone, its name): a copy of the student, or the named / given model after the
        vocabulary and memory checks."""
        if discriminator is None:
            check_fits(student, device, lora=lora, free_bytes=free_bytes)
            name = str(getattr(getattr(student, "config", None), "_name_or_path", "") or type(student).__name__)
            return copy.deepcopy(student), f"copy of {name}"
        if isinstance(discriminator, str):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from opd_sdk.models import resolve_model_path

            path = resolve_model_path(discriminator)
            _same_vocabulary(AutoTokenizer.from_pretrained(path), tokenizer, discriminator)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=next(student.parameters()).dtype)
            check_fits(model, device, lora=lora, free_bytes=free_bytes)
            return model, discriminator
        if discriminator_tokenizer is None:
            raise ConfigError("a discriminator given as a loaded model needs its tokenizer: pass discriminator_tokenizer")
        _same_vocabulary(discriminator_tokenizer, tokenizer, type(discriminator).__name__)
        check_fits(discriminator, device, lora=lora, free_bytes=free_bytes)
        name = str(getattr(getattr(discriminator, "config", None), "_name_or_path", "") or type(discriminator).__name__)
        return copy.deepcopy(discriminator), name

    def __repr__(self) -> str:
        return f"DiscriminatorTeacher(discriminator={self.name!r}, source={self.source!r})"

    # --- teacher text -----------------------------------------------------------------
    @staticmethod
    def key(request: FeedbackRequest) -> str:
        """A prompt's identity for its teacher text: the prompt and the privileged context."""
        return json.dumps({"prompt": request.model_dump(mode="json")["prompt"], "privileged": request.privileged},
                          sort_keys=True, ensure_ascii=False)

    def teacher_texts(self, requests: Sequence[FeedbackRequest]) -> list[list[str] | FeedbackFailure]:
        """Each request's teacher answers (or the failure that left it without any). Asks the
        reference teacher only for prompts it has never answered; its answers are kept."""
        if self.source == "answer":
            return [[r.metadata["answer"]] if r.metadata.get("answer") else FeedbackFailure(
                reason="the prompt has no reference answer (PromptItem.answer), which GAD with source 'answer' "
                       "reads as the teacher's text", error_type="missing_reference", attempts=0)
                    for r in requests]
        keys = [self.key(r) for r in requests]
        ask = {k: r for k, r in zip(keys, requests, strict=True) if k not in self.references}  # one per prompt
        failed: dict[str, FeedbackFailure] = {}
        if ask:
            for k, fb in zip(ask, self.reference.collect_sync(list(ask.values())), strict=True):
                if isinstance(fb, FeedbackFailure):
                    failed[k] = fb
                elif not isinstance(fb, Reference):
                    raise ConfigError(f"GAD's reference teacher returned {fb.kind} feedback; it needs a teacher that "
                                      "returns the teacher's text: a ReferenceTeacher (config type: reference)")
                elif texts := [c.text for c in fb.completions if c.text.strip()]:
                    self.references[k] = texts
                else:
                    failed[k] = FeedbackFailure(reason="the reference teacher returned no text for this prompt",
                                                error_type="empty_reference", attempts=1)
        return [self.references[k] if k in self.references else failed[k] for k in keys]

    def check_prompts(self, prompts: Sequence[Any]) -> None:
        """Before training (the trainer calls it with its PromptItems): ConfigError when a prompt has
        no reference answer (source 'answer'), or when the reference teacher returns no text for
        the first prompt (source 'teacher'; that answer is kept, so it is paid once)."""
        if self.source == "answer":
            missing = [i for i, p in enumerate(prompts) if not getattr(p, "answer", None)]
            if missing:
                raise ConfigError(
                    f"GAD reads the teacher's text from each prompt's answer (source: answer), and {len(missing)} of "
                    f"{len(prompts)} prompts have none (first: prompt {missing[0]}); fill the data's answer field with "
                    "teacher text, or use source: teacher with a reference teacher"
                )
            return
        if not prompts:
            return
        first = prompts[0]
        probe = FeedbackRequest(prompt=first.prompt, privileged=first.privileged, completions=[{"text": ""}])
        (texts,) = self.teacher_texts([probe])
        if isinstance(texts, FeedbackFailure):
            raise ConfigError(
                f"GAD's reference teacher returned no text for the first training prompt ({texts.error_type}: "
                f"{texts.reason}); check the teacher's model, base_url and max_tokens before training"
            )

    # --- discriminator input ----------------------------------------------------------
    def _prompt_ids(self, request: FeedbackRequest) -> list[int]:
        tok = self.tokenizer
        messages = [m.model_dump() for m in request.prompt_messages()]
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = "\n\n".join(m["content"] for m in messages)
        return list(tok(text, add_special_tokens=False)["input_ids"])

    def _row(self, prompt_ids: list[int], answer: str) -> list[int]:
        answer_ids = list(self.tokenizer(answer, add_special_tokens=False)["input_ids"])[: self.max_tokens]
        return prompt_ids + answer_ids + self.eos

    # --- the batch ----------------------------------------------------------------------
    def feedback_local(self, requests: Sequence[FeedbackRequest]) -> list[Feedback]:
        """One Score per request (D's score of each student answer; reward = D(x, y_student)), or
        the FeedbackFailure that left the request without teacher text; D then learns from the
        batch. Runs on the training thread (rank 0 in a launched job)."""
        self._metrics = {}
        texts = self.teacher_texts(requests)
        rows: list[list[int]] = []
        teacher_K, student_K, spans = [], [], {}
        for r, (req, ref) in enumerate(zip(requests, texts, strict=True)):
            if isinstance(ref, FeedbackFailure):
                continue
            prompt = self._prompt_ids(req)
            t0 = len(rows)
            rows.extend(self._row(prompt, t) for t in ref)
            s0 = len(rows)
            rows.extend(self._row(prompt, c.text) for c in req.completions)
            spans[r] = (t0, s0, len(rows))
            for t in range(t0, s0):
                teacher_K.extend([t] * (len(rows) - s0))
                student_K.extend(range(s0, len(rows)))
        if not spans:
            return list(texts)  # type: ignore[arg-type]
        scores_R = self._learn(rows, torch.tensor(teacher_K), torch.tensor(student_K))
        self.batches += 1
        out: list[Feedback] = []
        for r, ref in enumerate(texts):
            if r not in spans:
                out.append(ref)  # type: ignore[arg-type]
                continue
            t0, s0, end = spans[r]
            out.append(Score(scores=scores_R[s0:end].tolist(),
                             details={"teacher_score_mean": float(scores_R[t0:s0].mean())}))
        return out

    def _learn(self, rows: list[list[int]], teacher_K: torch.Tensor, student_K: torch.Tensor) -> torch.Tensor:
        """D's optimizer steps on the batch; returns the scores_R the student is rewarded with."""
        warming = self.batches < self.warmup_steps
        kw = {"pad_id": self.pad_id, "chunk_rows": self.chunk_rows, "max_grad_norm": self.max_grad_norm}
        first, stats = bt_update(self.model, self.optimizer, rows, teacher_K, student_K, **kw)
        for _ in range((self.warmup_updates if warming else self.updates_per_step) - 1):
            bt_update(self.model, self.optimizer, rows, teacher_K, student_K, **kw)
        self.updates += self.warmup_updates if warming else self.updates_per_step
        scores_R = score_rows(self.model, rows, pad_id=self.pad_id, chunk_rows=self.chunk_rows) if warming else first
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.float32)
        self._metrics = {
            "gad/loss": stats["loss"], "gad/accuracy": stats["accuracy"], "gad/margin": stats["margin"],
            "gad/teacher_score": float(first[teacher_K.unique()].mean()),
            "gad/student_score": float(first[student_K.unique()].mean()),
            "gad/teacher_len_mean": float(lengths[teacher_K.unique()].mean()),
            "gad/student_len_mean": float(lengths[student_K.unique()].mean()),
            "gad/warmup": int(warming), "gad/updates": self.updates,
        }
        return scores_R

    def metrics(self) -> dict[str, float]:
        """The last batch's gad/ metrics (D before it learnt from the batch): loss, accuracy (pairs
        where the teacher's answer scores higher), margin (mean score difference), mean scores,
        answer lengths in D's tokens (prompt included), warm-up flag, D's optimizer steps so far.
        Empty when the last batch had no teacher text."""
        return dict(self._metrics)

    async def feedback_batch(self, requests: Sequence[FeedbackRequest]) -> list[Feedback]:
        return self.feedback_local(requests)

    async def feedback(self, request: FeedbackRequest) -> Feedback:
        return self.feedback_local([request])[0]

    # --- checkpoints -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """D's trainable weights, its optimizer, its counters and the teacher texts so far (plain
        tensors, numbers and strings: loadable with torch.load(weights_only=True))."""
        return {
            "trainable": {n: p.detach().cpu().clone() for n, p in self.model.trainable().items()},
            "optimizer": self.optimizer.state_dict(),
            "batches": self.batches,
            "updates": self.updates,
            "references": dict(self.references),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` saved; ConfigError when the weights are another discriminator's."""
        params = self.model.trainable()
        if set(state["trainable"]) != set(params):
            extra = sorted(set(state["trainable"]) ^ set(params))[:3]
            raise ConfigError(f"the checkpoint's GAD discriminator has other weights than this one ({extra}); "
                              "resume with the discriminator and lora settings the run was started with")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state["trainable"][n])
        self.optimizer.load_state_dict(state["optimizer"])
        self.batches, self.updates = int(state["batches"]), int(state["updates"])
        self.references = {k: list(v) for k, v in state["references"].items()}

    def close(self) -> None:
        """Close the reference teacher's collector (idempotent)."""
        for c in self.collectors:
            c.close()


def _same_vocabulary(d_tok: Any, student_tok: Any, what: str) -> None:
    d_vocab, s_vocab = d_tok.get_vocab(), student_tok.get_vocab()
    if d_vocab != s_vocab:
        differ = sorted(set(d_vocab.items()) ^ set(s_vocab.items()), key=str)[:3]
        raise ConfigError(
            f"the discriminator {what} has another tokenizer than the student (vocabularies of {len(d_vocab)} and "
            f"{len(s_vocab)} tokens; e.g. {differ}); GAD scores the student's text with the student's tokenizer, so "
            "name a discriminator of the student's family (or leave discriminator out: a copy of the student)"
        )


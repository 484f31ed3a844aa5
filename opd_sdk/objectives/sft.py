"""`SFT`: negative log-likelihood of a reference answer (the off-policy baseline).

Supervised fine-tuning / sequence-level KD (Kim & Rush 2016 when the text
comes from a teacher): minimise -log p_S(y* | x) for reference text y*. The
expectation is over the reference text, not the student's own samples,
which is exactly what on-policy distillation moves away from (exposure
bias); it is here as the baseline to beat.

The text comes from `PromptItem.answer` (`source="answer"`: no teacher) or
from a teacher's `Reference` feedback (`source="reference"`). It is
tokenised with the student's tokenizer after the batch's own prompt tokens
(see `targets.py`), EOS appended. The student's samples in the batch are not
used.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch

from opd_sdk.batch import RolloutBatch
from opd_sdk.errors import ConfigError
from opd_sdk.logprobs import selected_logprobs
from opd_sdk.objectives.base import LossOutput, check_feedback, count_failures, expect_kind, first_param_zero
from opd_sdk.objectives.targets import encode_text, text_rows
from opd_sdk.types import Feedback, FeedbackFailure, Reference


def nll_loss(logprobs_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Token-mean negative log-likelihood: -sum(logp * m) / sum(m) ([B, T] -> [])."""
    return -(logprobs_BT * mask_BT).sum() / mask_BT.sum().clamp(min=1.0)


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


class SFT:
    """NLL of reference text; see the module docstring.

    tokenizer: the student's tokenizer (encodes the reference text).
    source: "answer" (PromptItem.answer) or "reference" (Reference feedback).
    all_references: learn every Reference completion, not only the first.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        source: Literal["answer", "reference"] = "answer",
        all_references: bool = False,
        chunk_rows: int = 4,
    ) -> None:
        if source not in ("answer", "reference"):
            raise ConfigError(f"SFT: source must be 'answer' or 'reference', got {source!r}")
        self.tokenizer = tokenizer
        self.source = source
        self.all_references = all_references
        self.chunk_rows = chunk_rows
        self.feedback_kinds: tuple[str, ...] = ("reference",) if source == "reference" else ()

    def setup(self, policy: torch.nn.Module) -> None:
        pass

    def after_step(self, step: int, policy: torch.nn.Module) -> None:
        pass

    def loss(self, policy: torch.nn.Module, batch: RolloutBatch, feedback: Sequence[Feedback] | None) -> LossOutput:
        texts, missing = reference_texts(batch, feedback, self.source, "SFT", self.all_references)
        failures = count_failures(feedback) if self.source == "reference" and feedback else 0
        metrics = {"feedback_failures": float(failures), "missing_answers": float(missing)}
        if self.source == "answer" and not texts:
            raise ConfigError(
                "SFT(source='answer'): no prompt in this batch has an answer; give PromptItem.answer "
                "(answer_field= when loading prompts) or use source='reference' with a ReferenceTeacher"
            )
        if not texts:
            return LossOutput(first_param_zero(policy), {**metrics, "examples": 0.0, "loss": 0.0})
        items = [(p, encode_text(self.tokenizer, t)) for p, t in texts]
        pad = getattr(self.tokenizer, "pad_token_id", None) or 0
        input_ids_NT, attention_NT, target_NT = text_rows(batch, items, pad)
        logprobs_NT = selected_logprobs(
            policy, input_ids_NT, attention_NT, chunk_rows=self.chunk_rows, from_col=batch.prompt_len
        )
        loss = nll_loss(logprobs_NT, target_NT)
        metrics.update(examples=float(len(items)), tokens=float(target_NT.sum()), nll=float(loss.detach()))
        metrics["loss"] = metrics["nll"]
        return LossOutput(loss, metrics)

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
from pydantic import Field

from opd_sdk.constants import DEFAULT_CHUNK_ROWS
from opd_sdk.errors import ConfigError
from opd_sdk.losses.nll import nll_sum
from opd_sdk.objectives.base import MeanMetrics, PlanContext, run_loss
from opd_sdk.objectives.params import ObjectiveContext, ObjectiveParams
from opd_sdk.rollout.batch import RolloutBatch
from opd_sdk.tensors.forward import Part, Plan, View
from opd_sdk.tensors.targets import encode_text, reference_texts
from opd_sdk.types import Feedback

__all__ = ["SFT", "SFTParams"]


class SFTParams(ObjectiveParams):
    """SFT's parameters (YAML `objective.params`); see the class docstring."""

    source: Literal["answer", "reference"] = "answer"
    all_references: bool = False
    chunk_rows: int = Field(DEFAULT_CHUNK_ROWS, gt=0)


class SFT:
    """NLL of reference text; see the module docstring.

    tokenizer: the student's tokenizer (encodes the reference text).
    Keyword arguments are the fields of `SFTParams` (defaults and bounds
    there; a bad value raises ConfigError):
    source: "answer" (PromptItem.answer) or "reference" (Reference feedback).
    all_references: learn every Reference completion, not only the first.
    chunk_rows: rows per LM-head chunk.
    """

    min_group_size = 1
    recompute_head = False
    params_model = SFTParams

    def __init__(self, tokenizer: Any, **params: Any) -> None:
        p = SFTParams.parse(params, "SFT")
        self.tokenizer = tokenizer
        self.source = p.source
        self.all_references = p.all_references
        self.chunk_rows = p.chunk_rows
        self.feedback_kinds: tuple[str, ...] = ("reference",) if p.source == "reference" else ()
        self.copies_student = False

    @classmethod
    def from_params(cls, params: SFTParams, ctx: ObjectiveContext) -> "SFT":
        return cls(ctx.tokenizer, **dict(params))

    def setup(self, policy: torch.nn.Module) -> None:
        pass

    def frozen_models(self) -> dict[str, torch.nn.Module]:
        return {}

    def after_step(self, step: int, policy: torch.nn.Module) -> None:
        pass

    def temperature(self, batch: RolloutBatch) -> float:
        return 1.0

    def loss(self, policy: torch.nn.Module, batch: RolloutBatch, feedback: Sequence[Feedback] | None):
        return run_loss(self, policy, batch, feedback)

    def state_dict(self) -> dict[str, Any]:
        return {}  # nothing kept between steps

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def plan(self, batch: RolloutBatch, feedback: Sequence[Feedback] | None, ctx: PlanContext) -> Plan:
        texts, missing = reference_texts(batch, feedback, self.source, "SFT", self.all_references)
        if self.source == "answer" and not texts:
            raise ConfigError(
                "SFT(source='answer'): no prompt in this batch has an answer; give PromptItem.answer "
                "(answer_field= when loading prompts) or use source='reference' with a ReferenceTeacher"
            )
        items = [(p, encode_text(self.tokenizer, t)) for p, t in texts]
        tokens = sum(len(ids) for _, ids in items)
        metrics = {"missing_answers": float(missing), "examples": float(len(items)), "tokens": float(tokens)}
        return Plan(torch.zeros(batch.size, dtype=torch.bool), float(tokens), len(items), metrics, texts=items)

    def compute(self, view: View, plan: Plan, part: Part, batch: RolloutBatch) -> tuple[torch.Tensor, MeanMetrics]:
        nll = nll_sum(view.texts(), view.text_mask)
        return nll / plan.normaliser, {"nll": (nll.detach(), view.text_mask.sum())}

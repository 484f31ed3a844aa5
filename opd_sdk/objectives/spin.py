"""`SPIN`: self-play fine-tuning, the student's samples against real text.

Follows Chen et al. 2024 ("Self-Play Fine-Tuning Converts Weak Language
Models to Strong Language Models"). For a prompt x with real answer y and a
student sample y', with the opponent p_opp a frozen copy of the student
from the start of the current iteration:

    margin = (log p(y|x) - log p(y'|x)) - (log p_opp(y|x) - log p_opp(y'|x))
    sigmoid loss: -log sigmoid(beta * margin)     (the paper's logistic loss)
    hinge loss:   max(0, 1 - beta * margin)

Log-probabilities are sums over the answer tokens (EOS included).

Where the real side comes from: `source="reference"` reads a teacher's
`Reference` feedback (a black-box API teacher writes the answer);
`source="answer"` reads `PromptItem.answer` (teacher-free self-play on a
dataset, the paper's setting). The text is tokenised with the student's
tokenizer after the batch's own prompt tokens (`opd_sdk.tensors.targets`).

Departures from the paper: the generated side is the on-policy sample of
the current batch (every one of the G samples is paired with the prompt's
real answer; a sample identical to it, token for token, is skipped), not a
dataset regenerated once per iteration; an "iteration" is `refresh_every`
optimizer steps (the opponent is reloaded from the student in
`after_step`), or call `refresh_opponent` yourself, e.g. once an epoch.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from pydantic import Field

from opd_sdk.constants import DEFAULT_CHUNK_ROWS
from opd_sdk.errors import ConfigError
from opd_sdk.losses.preference import spin_per_pair
from opd_sdk.objectives.base import MeanMetrics, PlanContext, frozen_copy, run_loss
from opd_sdk.objectives.params import ObjectiveContext, ObjectiveParams
from opd_sdk.rollout.batch import RolloutBatch
from opd_sdk.tensors.forward import Part, Plan, View
from opd_sdk.tensors.targets import encode_text, reference_texts
from opd_sdk.types import Feedback

__all__ = ["SPIN", "SPINParams"]


class SPINParams(ObjectiveParams):
    """SPIN's parameters (YAML `objective.params`); see the class docstring."""

    source: Literal["reference", "answer"] = "reference"
    beta: float = Field(0.1, gt=0.0)  # the paper's lambda
    loss_type: Literal["sigmoid", "hinge"] = "sigmoid"
    refresh_every: int | None = Field(None, ge=1)
    chunk_rows: int = Field(DEFAULT_CHUNK_ROWS, gt=0)


class SPIN:
    """Self-play: real text beats the student's own samples; see the module docstring.

    tokenizer: the student's tokenizer (encodes the real text).
    Keyword arguments are the fields of `SPINParams` (defaults and bounds
    there; a bad value raises ConfigError):
    source: "reference" (teacher Reference feedback) or "answer" (PromptItem.answer).
    beta: the paper's lambda. loss_type: "sigmoid" | "hinge".
    refresh_every: reload the opponent from the student every k optimizer
        steps (None: only when refresh_opponent() is called).
    chunk_rows: rows per LM-head chunk.
    """

    min_group_size = 1
    recompute_head = False
    params_model = SPINParams

    def __init__(self, tokenizer: Any, **params: Any) -> None:
        p = SPINParams.parse(params, "SPIN")
        self.tokenizer = tokenizer
        self.source = p.source
        self.beta = p.beta
        self.loss_type = p.loss_type
        self.refresh_every = p.refresh_every
        self.chunk_rows = p.chunk_rows
        self.opponent: torch.nn.Module | None = None
        self.refreshes = 0
        self.feedback_kinds: tuple[str, ...] = ("reference",) if p.source == "reference" else ()
        self.copies_student = True  # the opponent

    @classmethod
    def from_params(cls, params: SPINParams, ctx: ObjectiveContext) -> "SPIN":
        return cls(ctx.tokenizer, **dict(params))

    def setup(self, policy: torch.nn.Module) -> None:
        self.opponent = frozen_copy(policy)

    def refresh_opponent(self, policy: torch.nn.Module) -> None:
        """Start a new iteration: the opponent becomes the current student."""
        if self.opponent is None:
            self.setup(policy)
        else:
            self.opponent.load_state_dict(policy.state_dict())
        self.refreshes += 1

    def after_step(self, step: int, policy: torch.nn.Module) -> None:
        if self.refresh_every is not None and step % self.refresh_every == 0:
            self.refresh_opponent(policy)

    def state_dict(self) -> dict[str, Any]:
        """The opponent's weights and the refresh count (saved in training checkpoints)."""
        if self.opponent is None:
            return {"refreshes": self.refreshes}
        return {"opponent": self.opponent.state_dict(), "refreshes": self.refreshes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "opponent" in state:
            if self.opponent is None:
                raise ConfigError("SPIN.load_state_dict needs setup(policy) first (it makes the opponent to load into)")
            self.opponent.load_state_dict(state["opponent"])
        self.refreshes = int(state.get("refreshes", 0))

    def temperature(self, batch: RolloutBatch) -> float:
        return 1.0

    def frozen_models(self) -> dict[str, torch.nn.Module]:
        if self.opponent is None:
            raise ConfigError("SPIN needs setup(policy) before the first loss (it copies the opponent)")
        return {"opponent": self.opponent}

    def loss(self, policy: torch.nn.Module, batch: RolloutBatch, feedback: Sequence[Feedback] | None):
        return run_loss(self, policy, batch, feedback)

    def plan(self, batch: RolloutBatch, feedback: Sequence[Feedback] | None, ctx: PlanContext) -> Plan:
        texts, missing = reference_texts(batch, feedback, self.source, "SPIN")
        if self.source == "answer" and not texts:
            raise ConfigError("SPIN(source='answer'): no prompt in this batch has PromptItem.answer; "
                              "give answers or use source='reference' with a ReferenceTeacher")
        G, L = batch.group_size, batch.prompt_len
        real = [(p, encode_text(self.tokenizer, t)) for p, t in texts]
        rows_B = torch.zeros(batch.size, dtype=torch.bool)
        pairs, identical = [], 0  # (generated row, index of its real text)
        for k, (p, ids) in enumerate(real):
            for b in range(p * G, p * G + G):
                sampled = batch.input_ids_BT[b, L:][batch.completion_mask_BT[b, L:] > 0].tolist()
                if sampled == ids:  # the student wrote the real answer: margin is 0 by construction
                    identical += 1
                elif sampled:
                    pairs.append((b, k))
                    rows_B[b] = True
        metrics = {"missing_answers": float(missing), "identical_skipped": float(identical),
                   "pairs": float(len(pairs)), "opponent_refreshes": float(self.refreshes)}
        used = sorted({k for _, k in pairs})  # only real texts in a pair are scored
        renumber = {k: i for i, k in enumerate(used)}
        pairs = [(b, renumber[k]) for b, k in pairs]
        return Plan(rows_B, float(len(pairs)), len(pairs), metrics, texts=[real[k] for k in used],
                    data={"pairs": pairs})

    def compute(self, view: View, plan: Plan, part: Part, batch: RolloutBatch) -> tuple[torch.Tensor, MeanMetrics]:
        rows, T = part.rows.tolist(), view.T
        slot = {b: i for i, b in enumerate(rows)}
        text_slot = {k: i for i, k in enumerate(part.texts)}
        pairs = [(slot[b], text_slot[k]) for b, k in plan.data["pairs"] if b in slot]
        gen_mask_RT = batch.completion_mask_BT[rows, :T].float()
        policy_gen_R = (view.policy() * gen_mask_RT).sum(-1)
        opp_gen_R = (view.policy(model="opponent") * gen_mask_RT).sum(-1)
        policy_real_K = (view.texts() * view.text_mask).sum(-1)
        opp_real_K = (view.texts(model="opponent") * view.text_mask).sum(-1)
        g = torch.tensor([i for i, _ in pairs], device=policy_gen_R.device)
        r = torch.tensor([k for _, k in pairs], device=policy_gen_R.device)
        per_pair_N, margin_N = spin_per_pair(
            policy_real_K[r], policy_gen_R[g], opp_real_K[r], opp_gen_R[g], self.beta, self.loss_type
        )
        n = len(pairs)
        means: MeanMetrics = {
            "margin_mean": (margin_N.sum(), n),
            "margin_accuracy": ((margin_N > 0).sum(), n),
            "real_logp_mean": (policy_real_K.detach().sum(), len(part.texts)),
            "gen_logp_mean": (policy_gen_R.detach().sum(), len(rows)),
        }
        return per_pair_N.sum() / plan.normaliser, means

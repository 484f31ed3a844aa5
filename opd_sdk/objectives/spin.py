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
tokenizer after the batch's own prompt tokens (`targets.py`).

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
import torch.nn.functional as F

from opd_sdk.batch import RolloutBatch
from opd_sdk.errors import ConfigError
from opd_sdk.logprobs import selected_logprobs
from opd_sdk.objectives.base import LossOutput, count_failures, first_param_zero, frozen_copy, sequence_sums
from opd_sdk.objectives.sft import reference_texts
from opd_sdk.objectives.targets import encode_text, text_rows
from opd_sdk.types import Feedback


def spin_loss(
    policy_real_N: torch.Tensor,
    policy_gen_N: torch.Tensor,
    opp_real_N: torch.Tensor,
    opp_gen_N: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor]:
    """SPIN loss over N (real, generated) pairs -> (mean loss [], margin_N).

    Inputs are sequence log-probs [N] under the policy and the opponent.
    """
    margin_N = (policy_real_N - policy_gen_N) - (opp_real_N - opp_gen_N)
    logits_N = beta * margin_N
    if loss_type == "sigmoid":
        per_pair_N = -F.logsigmoid(logits_N)
    elif loss_type == "hinge":
        per_pair_N = torch.relu(1.0 - logits_N)
    else:
        raise ConfigError(f"SPIN loss_type must be 'sigmoid' or 'hinge', got {loss_type!r}")
    return per_pair_N.mean(), margin_N.detach()


class SPIN:
    """Self-play: real text beats the student's own samples; see the module docstring.

    tokenizer: the student's tokenizer (encodes the real text).
    source: "reference" (teacher Reference feedback) or "answer" (PromptItem.answer).
    beta: the paper's lambda. loss_type: "sigmoid" | "hinge".
    refresh_every: reload the opponent from the student every k optimizer
        steps (None: only when refresh_opponent() is called).
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        source: Literal["reference", "answer"] = "reference",
        beta: float = 0.1,
        loss_type: Literal["sigmoid", "hinge"] = "sigmoid",
        refresh_every: int | None = None,
        chunk_rows: int = 4,
    ) -> None:
        if source not in ("reference", "answer"):
            raise ConfigError(f"SPIN: source must be 'reference' or 'answer', got {source!r}")
        if loss_type not in ("sigmoid", "hinge"):
            raise ConfigError(f"SPIN loss_type must be 'sigmoid' or 'hinge', got {loss_type!r}")
        if beta <= 0:
            raise ConfigError(f"SPIN beta must be > 0 (the paper uses 0.1), got {beta}")
        if refresh_every is not None and refresh_every < 1:
            raise ConfigError(f"refresh_every must be >= 1 or None, got {refresh_every}")
        self.tokenizer = tokenizer
        self.source = source
        self.beta = beta
        self.loss_type = loss_type
        self.refresh_every = refresh_every
        self.chunk_rows = chunk_rows
        self.opponent: torch.nn.Module | None = None
        self.refreshes = 0
        self.feedback_kinds: tuple[str, ...] = ("reference",) if source == "reference" else ()

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

    def _seq_logprobs(self, model, ids_NT, attn_NT, mask_NT, from_col: int) -> torch.Tensor:
        lp_NT = selected_logprobs(model, ids_NT, attn_NT, chunk_rows=self.chunk_rows, from_col=from_col)
        return sequence_sums(lp_NT, mask_NT)

    def loss(self, policy: torch.nn.Module, batch: RolloutBatch, feedback: Sequence[Feedback] | None) -> LossOutput:
        if self.opponent is None:
            raise ConfigError("SPIN needs setup(policy) before the first loss (it copies the opponent)")
        texts, missing = reference_texts(batch, feedback, self.source, "SPIN")
        failures = count_failures(feedback) if self.source == "reference" and feedback else 0
        metrics = {"feedback_failures": float(failures), "missing_answers": float(missing)}
        if self.source == "answer" and not texts:
            raise ConfigError("SPIN(source='answer'): no prompt in this batch has PromptItem.answer; "
                              "give answers or use source='reference' with a ReferenceTeacher")
        G, L = batch.group_size, batch.prompt_len
        real_items = [(p, encode_text(self.tokenizer, t)) for p, t in texts]
        gen_rows, identical = [], 0
        for p, real in real_items:
            for b in range(p * G, p * G + G):
                sampled = batch.input_ids_BT[b, L:][batch.completion_mask_BT[b, L:] > 0].tolist()
                if sampled == real:  # the student wrote the real answer: margin is 0 by construction
                    identical += 1
                elif sampled:
                    gen_rows.append(b)
        metrics["identical_skipped"] = float(identical)
        if not gen_rows:
            return LossOutput(first_param_zero(policy), {**metrics, "pairs": 0.0, "loss": 0.0})
        pad = getattr(self.tokenizer, "pad_token_id", None) or 0
        real_ids, real_attn, real_mask = text_rows(batch, real_items, pad)
        rows = torch.tensor(gen_rows, device=batch.input_ids_BT.device)
        gen_ids, gen_attn = batch.input_ids_BT[rows], batch.attention_mask_BT[rows]
        gen_mask = batch.completion_mask_BT[rows].float()
        real_index = {p: n for n, (p, _) in enumerate(texts)}
        pair_real = torch.tensor([real_index[b // G] for b in gen_rows], device=rows.device)

        policy_real = self._seq_logprobs(policy, real_ids, real_attn, real_mask, L)
        policy_gen = self._seq_logprobs(policy, gen_ids, gen_attn, gen_mask, L)
        with torch.no_grad():
            opp_real = self._seq_logprobs(self.opponent, real_ids, real_attn, real_mask, L)
            opp_gen = self._seq_logprobs(self.opponent, gen_ids, gen_attn, gen_mask, L)
        loss, margin_N = spin_loss(
            policy_real[pair_real], policy_gen, opp_real[pair_real], opp_gen, self.beta, self.loss_type
        )
        metrics.update(
            pairs=float(len(gen_rows)),
            margin_mean=float(margin_N.mean()),
            margin_accuracy=float((margin_N > 0).float().mean()),
            real_logp_mean=float(policy_real.detach().mean()),
            gen_logp_mean=float(policy_gen.detach().mean()),
            opponent_refreshes=float(self.refreshes),
            loss=float(loss.detach()),
        )
        return LossOutput(loss, metrics)

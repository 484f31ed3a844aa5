"""Every objective through the real student loop (Trainer + TransformersRollout + FeedbackCollector).

A tiny random Llama on a char-level tokenizer; two optimizer steps each, one prompt per micro-batch
(so feedback is sliced by prompt). Checks the objective's metrics reach the logged rows and the
weights move; SFT's NLL of the reference answer must fall.
"""

from __future__ import annotations

import math

import pytest
import torch

from opd_sdk.data import PromptItem
from opd_sdk.feedback.collector import FeedbackCollector
from opd_sdk.objectives import (
    SFT,
    SPIN,
    Hybrid,
    OnlineDPO,
    RejectionSampling,
    RewardWeighted,
    TokenDistill,
)
from opd_sdk.rollout.engine import render_prompts
from opd_sdk.train.trainer import Trainer
from opd_sdk.types import FeedbackRequest, TokenLogprobs
from providers.verifier import VerifierTeacher
from tests.loop_fixtures import tiny_model, tiny_tokenizer

PROMPTS = [PromptItem(prompt=f"Say seven {d}", answer="7") for d in range(4)]


class LocalLogprobTeacher:
    """TokenLogprobs from a second tiny model that shares the student's tokenizer."""

    id = "test-local-logprob"

    def __init__(self, model, tokenizer, k: int = 4) -> None:
        self.model, self.tok, self.k = model, tokenizer, k

    async def feedback(self, request: FeedbackRequest) -> TokenLogprobs:
        prompt = render_prompts(self.tok, [PromptItem(prompt=request.prompt)])[0]
        p_ids = self.tok(prompt, add_special_tokens=False)["input_ids"]
        lps, tops = [], []
        for c in request.completions:
            ids = p_ids + list(c.token_ids)
            with torch.no_grad():
                lp = torch.log_softmax(self.model(torch.tensor([ids])).logits[0].float(), -1)
            rows = range(len(p_ids) - 1, len(ids) - 1)
            lps.append([float(lp[r, ids[r + 1]]) for r in rows])
            tops.append([{int(j): float(v) for v, j in zip(*lp[r].topk(self.k))} for r in rows])
        return TokenLogprobs(logprobs=lps, top_k=tops)


def run(objective, teacher, steps=2, seed=0):
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=seed)
    before = [p.detach().clone() for p in model.parameters()]
    coll = FeedbackCollector(teacher, progress=False) if teacher is not None else None
    trainer = Trainer(model, tok, objective, coll, PROMPTS, group_size=2, prompts_per_step=2, micro_batch_prompts=1,
                      max_steps=steps, lr=1e-2, max_new_tokens=4, seed=seed, precision="fp32")
    history = trainer.train()
    moved = any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    return history, moved


def cases():
    tok = tiny_tokenizer()
    verifier = VerifierTeacher("callable", check=lambda text, want: len(text) / 4)  # every group has a spread
    logprob = LocalLogprobTeacher(tiny_model(tok, seed=1), tok)
    return {
        "reward_weighted": (lambda: RewardWeighted(advantage="grpo", beta=0.1, clip_eps=0.2), verifier, "reward/mean"),
        "rejection_sampling": (lambda: RejectionSampling(top_k=1), verifier, "objective/selected"),
        "online_dpo": (lambda: OnlineDPO(), verifier, "objective/pairs"),
        "sft": (lambda: SFT(tok), None, "objective/nll"),
        "spin": (lambda: SPIN(tok, source="answer", refresh_every=1), None, "objective/margin_mean"),
        "token_distill_pg": (lambda: TokenDistill(), logprob, "objective/reverse_kl"),
        "token_distill_jsd": (lambda: TokenDistill(divergence="jsd"), logprob, "objective/jsd"),
        "hybrid": (lambda: Hybrid([(TokenDistill(), 1.0), (SFT(tok), 0.1)]), logprob, "objective/sft/nll"),
    }


@pytest.mark.parametrize("name", list(cases()))
def test_objective_runs_in_the_trainer(name):
    make, teacher, key = cases()[name]
    history, moved = run(make(), teacher)
    assert len(history) == 2 and all(math.isfinite(row["loss/total"]) for row in history)
    assert key in history[-1] and math.isfinite(history[-1][key])
    assert history[-1]["teacher/failures"] == 0
    assert any(row["loss/total"] != 0.0 and row["optim/skipped"] == 0 for row in history)
    assert moved  # an objective that returned 0, or a loop that skipped its update, fails here


def test_sft_lowers_the_nll_of_the_answer():
    tok = tiny_tokenizer()
    history, _ = run(SFT(tok), None, steps=6)
    nll = [row["objective/nll"] for row in history]
    assert nll[-1] < nll[0] - 0.5, nll

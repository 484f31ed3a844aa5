"""SelfDistillTeacher inside the real loop: Trainer -> collector -> teacher -> TokenDistill."""

from __future__ import annotations

import threading

import pytest
import torch

from opd_sdk.data import PromptItem
from opd_sdk.errors import ConfigError
from opd_sdk.feedback.collector import FeedbackCollector
from opd_sdk.feedback.factory import make_collector
from opd_sdk.objectives import TokenDistill
from opd_sdk.train.trainer import Trainer
from providers.self_distill import SelfDistillTeacher
from tests.providers.test_self_distill import make_model, make_tokenizer

PROMPTS = [PromptItem(prompt=f"Say {d}.", privileged=f"The answer is {d}.", answer=str(d)) for d in range(4)]


def first_token_kl(model, teacher: SelfDistillTeacher) -> float:
    """Exact KL(student view || teacher view) of the first completion token, summed over PROMPTS."""
    from opd_sdk.types import FeedbackRequest

    total = 0.0
    with torch.no_grad():
        for item in PROMPTS:
            req = FeedbackRequest(prompt=item.prompt, completions=[{"text": "1"}], privileged=item.privileged)
            student_ids, teacher_ids = teacher.prompt_ids(req)
            s = torch.log_softmax(model(input_ids=torch.tensor([student_ids])).logits[0, -1], -1)
            t = torch.log_softmax(teacher.teacher_model(input_ids=torch.tensor([teacher_ids])).logits[0, -1], -1)
            total += float((s.exp() * (s - t)).sum())
    return total


def test_frozen_self_teacher_pulls_the_student_towards_the_privileged_view():
    tok = make_tokenizer()
    model = make_model(tok, seed=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)  # sharper distributions: the two views differ measurably
    teacher = SelfDistillTeacher(model, tok, mode="frozen")
    kl_before = first_token_kl(model, teacher)
    trainer = Trainer(
        model, tok, TokenDistill(divergence="reverse_kl_pg"), FeedbackCollector(teacher, progress=False),
        PROMPTS, group_size=8, prompts_per_step=4, max_steps=8, lr=3e-4, max_new_tokens=2, seed=0,
        precision="fp32", progress=False, tensorboard=False, max_grad_norm=None,
    )
    history = trainer.train()
    assert all(row["teacher/failures"] == 0 for row in history)
    assert kl_before > 0.05
    assert first_token_kl(model, teacher) < 0.6 * kl_before  # measured: 0.116 -> 0.043


@pytest.mark.parametrize("mode", ["live", "ema"])
def test_live_and_ema_teachers_in_the_loop(mode):
    tok = make_tokenizer()
    model = make_model(tok, seed=2)
    teacher = SelfDistillTeacher(model, tok, mode=mode, ema_decay=0.5)
    head_before = teacher.teacher_model.lm_head.weight.detach().clone()
    trainer = Trainer(
        model, tok, TokenDistill(), make_collector(teacher), PROMPTS,
        group_size=2, prompts_per_step=2, max_steps=2, lr=1e-3, max_new_tokens=3, seed=0,
        precision="fp32", progress=False, tensorboard=False,
    )
    history = trainer.train()
    assert [row["teacher/failures"] for row in history] == [0, 0]
    assert all(row["objective/tokens"] > 0 for row in history)
    head = teacher.teacher_model.lm_head.weight
    if mode == "ema":  # folded once, before the second step's teacher pass: (before + policy after step 1) / 2
        assert not torch.equal(head, head_before) and not torch.equal(head, model.lm_head.weight)


@pytest.mark.parametrize("mode", ["live", "ema"])
def test_a_teacher_that_follows_the_student_is_never_asked_ahead_of_the_step(mode):
    """max_staleness >= 1 would ask it on a worker thread while the step changes the weights it reads:
    refused, whichever collector asks it. A frozen teacher is asked on the training thread."""
    tok = make_tokenizer()
    model = make_model(tok, seed=3)
    settings = dict(group_size=2, prompts_per_step=2, max_steps=2, lr=1e-3, max_new_tokens=3, seed=0,
                    precision="fp32", progress=False, tensorboard=False, max_staleness=1)
    teacher = SelfDistillTeacher(model, tok, mode=mode)
    for collector in (make_collector(teacher), FeedbackCollector(teacher, progress=False)):
        with collector, pytest.raises(ConfigError, match="follows the student's weights.*set max_staleness: 0"):
            Trainer(model, tok, TokenDistill(), collector, PROMPTS, **settings)
    frozen = SelfDistillTeacher(model, tok, mode="frozen")
    threads, score = [], frozen.score_batch
    frozen.feedback_local = lambda requests: threads.append(threading.current_thread().name) or score(requests)
    with make_collector(frozen) as collector:
        history = Trainer(model, tok, TokenDistill(), collector, PROMPTS, **settings).train()
    assert [row["rollout/staleness"] for row in history] == [0, 1] and [row["teacher/failures"] for row in history] == [0, 0]
    assert threads == [threading.current_thread().name] * 2

"""DiscriminatorTeacher (GAD): the Bradley-Terry loss by hand, its checkpoint state, and every bad input
refused before training."""

from __future__ import annotations

import math

import pytest
import torch

from opd_sdk.data import PromptItem
from opd_sdk.errors import ConfigError
from opd_sdk.feedback.factory import make_collector
from opd_sdk.objectives import RewardWeighted
from opd_sdk.train.trainer import Trainer
from opd_sdk.types import Completion, FeedbackFailure, FeedbackRequest, Score
from providers.discriminator import bt_loss, needed_bytes
from providers.gad import DiscriminatorTeacher
from providers.reference import ReferenceTeacher
from tests.loop_fixtures import tiny_model, tiny_tokenizer
from tests.scripted_server import ScriptedServer

LOOP = dict(group_size=2, prompts_per_step=2, max_new_tokens=3, seed=0, precision="fp32", progress=False,
            tensorboard=False)


def test_bradley_terry_loss_accuracy_and_margin_match_numbers_worked_by_hand():
    scores = torch.tensor([2.0, 0.0, 1.0, 3.0])  # rows: teacher, student, student, student
    loss, stats = bt_loss(scores, torch.tensor([0, 0, 0]), torch.tensor([1, 2, 3]))
    # diffs 2, 1, -1: mean(log(1+e^-2), log(1+e^-1), log(1+e^1)) = mean(0.126928, 0.313262, 1.313262)
    assert float(loss) == pytest.approx((0.126928 + 0.313262 + 1.313262) / 3, abs=1e-6)
    assert stats["accuracy"] == pytest.approx(2 / 3) and stats["margin"] == pytest.approx(2 / 3)
    assert math.isclose(stats["loss"], float(loss))


def requests(texts=("xyz", "aaaa")) -> list[FeedbackRequest]:
    return [FeedbackRequest(prompt=f"Say {d}.", completions=[Completion(text=t) for t in texts],
                            metadata={"answer": "aaaa"}) for d in range(2)]


def test_scores_one_per_completion_from_the_discriminator_before_it_learns_and_state_round_trips(tmp_path):
    tok = tiny_tokenizer()
    student = tiny_model(tok)
    teacher = DiscriminatorTeacher(student, tok, source="answer", lr=1e-2)
    assert not any(p is s for p in teacher.model.parameters() for s in student.parameters())  # a copy
    reqs = requests()
    rows = [teacher._row(teacher._prompt_ids(reqs[0]), t) for t in ("aaaa", "xyz", "aaaa")]
    from providers.discriminator import score_rows

    expected = score_rows(teacher.model, rows, pad_id=teacher.pad_id, chunk_rows=8)
    out = teacher.feedback_local(reqs)
    assert all(isinstance(fb, Score) and len(fb.scores) == 2 for fb in out)
    assert out[0].scores == pytest.approx(expected[1:].tolist(), abs=1e-6)  # D's scores before its update
    assert out[0].scores[1] == pytest.approx(out[0].details["teacher_score_mean"], abs=1e-6)  # same text, same score
    assert teacher.metrics()["gad/updates"] == 1 and teacher.updates == 1
    assert score_rows(teacher.model, rows, pad_id=teacher.pad_id, chunk_rows=8).tolist() != expected.tolist()

    torch.save(teacher.state_dict(), tmp_path / "t.pt")
    other = DiscriminatorTeacher(tiny_model(tok, seed=5), tok, source="answer", lr=1e-2)
    other.load_state_dict(torch.load(tmp_path / "t.pt", weights_only=True))
    assert all(torch.equal(a, b) for a, b in zip(teacher.model.trainable().values(),
                                                 other.model.trainable().values(), strict=True))
    assert other.feedback_local(reqs)[0].scores == teacher.feedback_local(reqs)[0].scores


def test_a_prompt_without_teacher_text_is_a_failure_value_never_a_score():
    tok = tiny_tokenizer()
    teacher = DiscriminatorTeacher(tiny_model(tok), tok, source="answer")
    reqs = [requests()[0], FeedbackRequest(prompt="No answer.", completions=[Completion(text="x")])]
    out = teacher.feedback_local(reqs)
    assert isinstance(out[0], Score)
    assert isinstance(out[1], FeedbackFailure) and out[1].error_type == "missing_reference"


def test_a_discriminator_with_another_tokenizer_is_refused():
    tok = tiny_tokenizer()
    other_tok = tiny_tokenizer()
    other_tok.add_tokens(["<extra>"])
    with pytest.raises(ConfigError, match="another tokenizer than the student.*leave discriminator out"):
        DiscriminatorTeacher(tiny_model(tok), tok, source="answer", discriminator=tiny_model(other_tok),
                             discriminator_tokenizer=other_tok)


def test_a_discriminator_that_cannot_fit_is_refused_before_anything_is_copied():
    tok = tiny_tokenizer()
    model = tiny_model(tok)
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert needed_bytes(model, lora=False) == 4 * weights  # copy + gradient + AdamW's two moments
    with pytest.raises(ConfigError, match=r"needs about .* GiB .* train it with LoRA"):
        DiscriminatorTeacher(model, tok, source="answer", free_bytes=weights)
    lora = DiscriminatorTeacher(model, tok, source="answer", lora={"r": 2, "target_modules": ["q_proj"]},
                                free_bytes=2 * weights)  # fits with LoRA
    assert set(lora.model.trainable()) >= {"head.weight", "head.bias"}
    assert all("lora_" in n or n.startswith("head.") for n in lora.model.trainable())


def test_gad_reading_the_teachers_text_needs_a_reference_teacher():
    tok = tiny_tokenizer()
    with pytest.raises(ConfigError, match="needs a reference teacher"):
        DiscriminatorTeacher(tiny_model(tok), tok)


def test_prompts_without_a_reference_answer_stop_the_run_before_its_first_step(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_model(tok)
    teacher = DiscriminatorTeacher(model, tok, source="answer")
    prompts = [PromptItem(prompt="Say 1.", answer="aaaa"), PromptItem(prompt="Say 2.")]
    trainer = Trainer(model, tok, RewardWeighted(), make_collector(teacher), prompts, max_steps=2, **LOOP)
    with pytest.raises(ConfigError, match="1 of 2 prompts have none.*prompt 1"):
        trainer.train()
    assert trainer.step == 0 and teacher.batches == 0


def test_a_teacher_that_returns_no_text_stops_the_run_before_its_first_step():
    tok = tiny_tokenizer()
    model = tiny_model(tok)
    with ScriptedServer(lambda body: "") as server:
        reference = ReferenceTeacher("teacher", base_url=server.base_url, api_key="sk-test")
        collector = make_collector(reference, progress=False, max_retries=0)
        teacher = DiscriminatorTeacher(model, tok, collector)
        prompts = [PromptItem(prompt=f"Say {d}.") for d in range(2)]
        trainer = Trainer(model, tok, RewardWeighted(), make_collector(teacher), prompts, max_steps=2, **LOOP)
        with pytest.raises(ConfigError, match="returned no text for the first training prompt"):
            trainer.train()
        assert server.count_path("/v1/chat/completions") == 1  # one probe, no training step
        collector.close()
    assert trainer.step == 0 and teacher.batches == 0


def test_config_gad_section_builds_the_teacher_and_refuses_a_teacher_that_gives_no_text():
    from opd_sdk.config.teachers import BuildContext, GADTeacherConfig, build_teacher

    with pytest.raises(ValueError, match="from a `reference` teacher, not 'judge'"):
        GADTeacherConfig.model_validate({"type": "gad", "teacher": {"type": "judge", "model": "m", "base_url": "u"}})
    with pytest.raises(ValueError, match="source: teacher needs `teacher:"):
        GADTeacherConfig.model_validate({"type": "gad"})
    tok = tiny_tokenizer()
    cfg = GADTeacherConfig.model_validate({"type": "gad", "teacher": {"type": "reference", "model": "m",
                                           "base_url": "http://127.0.0.1:9/v1"}, "lr": 1e-4, "updates_per_step": 3})
    made = []
    teacher = build_teacher(cfg, BuildContext(model=tiny_model(tok), tokenizer=tok,
                                              collector=lambda t: made.append(t) or make_collector(t)))
    assert isinstance(teacher, DiscriminatorTeacher) and teacher.updates_per_step == 3
    assert isinstance(made[0], ReferenceTeacher) and teacher.reference.teacher is made[0]
    teacher.close()

"""GAD in the real loop: Trainer -> LocalRunner -> DiscriminatorTeacher (-> ReferenceTeacher over HTTP)
-> RewardWeighted (GRPO)."""

from __future__ import annotations

import torch

from opd_sdk.data import PromptItem
from opd_sdk.feedback.factory import make_collector
from opd_sdk.objectives import RewardWeighted
from opd_sdk.train.trainer import Trainer
from providers.gad import DiscriminatorTeacher
from providers.reference import ReferenceTeacher
from tests.loop_fixtures import one_thread, tiny_model, tiny_tokenizer  # noqa: F401
from tests.scripted_server import ScriptedServer

TEACHER_TEXT = "aaaa"  # the teacher always answers this; a random student almost never does
PROMPTS = [PromptItem(prompt=f"Say {d}.", answer=TEACHER_TEXT) for d in range(4)]
LOOP = dict(group_size=8, prompts_per_step=2, max_new_tokens=4, seed=0, precision="fp32", progress=False,
            tensorboard=False, temperature=1.0)


def share_of_a(model, tok, n: int = 64) -> float:
    """Share of the letter 'a' in n sampled 4-token answers: how close the student writes to the teacher."""
    torch.manual_seed(123)
    ids = tok.apply_chat_template([{"role": "user", "content": "Say 1."}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids.repeat(n, 1), do_sample=True, max_new_tokens=4, pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    return sum(t.count("a") for t in texts) / (4 * n)


def test_discriminator_learns_to_tell_the_teacher_and_the_student_learns_to_write_like_it(one_thread):  # noqa: F811
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=0)
    before = share_of_a(model, tok)
    teacher = DiscriminatorTeacher(model, tok, source="answer", lr=3e-3, warmup_steps=1, warmup_updates=4)
    trainer = Trainer(model, tok, RewardWeighted(advantage="grpo"), make_collector(teacher), PROMPTS,
                      max_steps=20, lr=1e-2, **LOOP)
    history = trainer.train()
    accuracy = [row["gad/accuracy"] for row in history]
    reward = [row["reward/mean"] for row in history]
    assert all(row["teacher/failures"] == 0 for row in history)
    assert history[0]["gad/warmup"] == 1 and history[1]["gad/warmup"] == 0
    assert all(row["rollout/completion_len_mean"] > 0 and "gad/loss" in row and "gad/margin" in row for row in history)
    # measured: accuracy 0.94 then 1.0 over steps 2-10 (D tells them apart), falling to ~0 once the student
    # writes "aaaa" itself (identical text, identical score); the reward rises from -0.1..1.5 to ~9.8
    assert min(accuracy[1:8]) > 0.9
    assert sum(reward[-5:]) / 5 > sum(reward[:5]) / 5 + 3.0
    assert before < 0.05 and share_of_a(model, tok) > 0.5  # measured: 0.016 -> 0.99


def gad_trainer(server: ScriptedServer, output_dir, *, max_steps: int, model_seed: int = 0):
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=model_seed)
    reference = ReferenceTeacher("teacher", base_url=server.base_url, api_key="sk-test", max_tokens=8)
    teacher = DiscriminatorTeacher(model, tok, make_collector(reference, progress=False), lr=3e-3, warmup_steps=1,
                                   warmup_updates=2, updates_per_step=2)
    trainer = Trainer(model, tok, RewardWeighted(advantage="grpo"), make_collector(teacher), PROMPTS,
                      max_steps=max_steps, lr=1e-2, output_dir=output_dir, save_every=2, **LOOP)
    return trainer, teacher


def test_resume_restores_the_discriminator_exactly_and_the_teacher_is_asked_once_per_prompt(tmp_path, one_thread):  # noqa: F811
    """4 prompts, 2 per step, 6 steps: 3 epochs. The teacher is asked once per prompt (4 calls, counted
    at the server) whether the run goes straight through or stops at step 2 and resumes in a new
    process-like setup (fresh objects, no feedback cache): the teacher texts travel in the checkpoint."""
    with ScriptedServer(lambda body: TEACHER_TEXT) as server:
        straight, d_straight = gad_trainer(server, tmp_path / "a", max_steps=6)
        straight.train()
        assert server.count_path("/v1/chat/completions") == 4
        assert len(d_straight.references) == 4

        server.reset_stats()
        first, _ = gad_trainer(server, tmp_path / "b", max_steps=2)
        first.train()
        asked_before_resume = server.count_path("/v1/chat/completions")
        second, d_resumed = gad_trainer(server, tmp_path / "b", max_steps=6, model_seed=7)  # other initial weights
        second.train(resume_from="latest")
        assert asked_before_resume == 4  # steps 1-2 drew every prompt once
        assert server.count_path("/v1/chat/completions") == 4  # steps 3-6 (2 more epochs), resumed: no call
        assert (tmp_path / "b" / "step-2" / "teachers.pt").exists()

    for name, p in straight.model.state_dict().items():
        assert torch.equal(p, second.model.state_dict()[name]), name
    for name, p in d_straight.model.state_dict().items():
        assert torch.equal(p, d_resumed.model.state_dict()[name]), name
    a, b = d_straight.optimizer.state_dict(), d_resumed.optimizer.state_dict()
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert all(torch.equal(a["state"][k][s], b["state"][k][s]) for s in a["state"][k])
    assert (d_straight.batches, d_straight.updates) == (d_resumed.batches, d_resumed.updates) == (6, 12)
    rows_a = [r["gad/accuracy"] for r in straight.metrics.history]
    rows_b = [r["gad/accuracy"] for r in second.metrics.history]
    assert rows_a[2:] == rows_b  # steps 3-6, identical

"""The student loop: evidence that reward rises, requests, failures, accumulation, LoRA, saving."""

from __future__ import annotations

import json

import pytest
import torch

from opd_sdk.data import PromptItem
from opd_sdk.errors import ConfigError, TeacherError
from opd_sdk.feedback.collector import FeedbackCollector
from opd_sdk.feedback.requests import build_requests
from opd_sdk.objectives import RewardWeighted
from opd_sdk.train.evaluate import greedy_accuracy
from opd_sdk.train.metrics import read_metrics
from opd_sdk.train.trainer import Trainer
from opd_sdk.types import Score
from providers.verifier import VerifierTeacher
from tests.loop_fixtures import one_thread, tiny_model, tiny_tokenizer  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

# Toy task: whatever the prompt, the right answer is 7 (VerifierTeacher, numeric mode,
# reads the last number of the completion). A random char-level model rarely ends on 7.
SEVEN = [PromptItem(prompt=f"Say seven {d}", answer="7", metadata={"id": d}) for d in range(10)]


def collector(teacher=None, **kw):
    return FeedbackCollector(teacher or VerifierTeacher("numeric"), progress=False, **kw)


def test_reward_rises_on_toy_task(tmp_path):
    """Evidence: RewardWeighted (RLOO) + VerifierTeacher raises a tiny model's reward within a minute."""
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=0)
    def starts_with_seven(text, item):
        return text.startswith(item.answer)

    before = greedy_accuracy(model, tok, SEVEN, starts_with_seven, max_new_tokens=4)
    with collector() as coll:
        trainer = Trainer(
            model, tok, RewardWeighted(advantage="rloo"), coll, SEVEN,
            group_size=8, prompts_per_step=8, max_steps=20, lr=3e-3, max_new_tokens=4,
            seed=0, output_dir=tmp_path, precision="fp32",
        )
        history = trainer.train()
    rewards = [row["reward/mean"] for row in history]
    early, late = sum(rewards[:3]) / 3, sum(rewards[-5:]) / 5
    assert early < 0.2, rewards
    assert late - early > 0.25, rewards
    # Greedy decoding moved too: the trained model now opens with the digit the verifier rewards.
    after = greedy_accuracy(trainer.model, tok, SEVEN, starts_with_seven, max_new_tokens=4)
    assert before.accuracy <= 0.1 and after.accuracy >= 0.5, (before, after)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 21))
    for key in ("reward/std", "loss/total", "teacher/failures", "time/tokens_per_s", "teacher/cost_usd",
                "time/sample_s", "time/feedback_s", "time/forward_backward_s", "time/optimizer_s"):
        assert key in rows[0]
    assert rows[0]["teacher/requests"] == 8 and rows[0]["teacher/failures"] == 0
    assert (tmp_path / "final" / "config.json").exists() and (tmp_path / "final" / "tokenizer_config.json").exists()


def test_build_requests_follow_the_contract():
    tok = tiny_tokenizer()
    model = tiny_model(tok)
    items = [PromptItem(prompt="a", answer="1", privileged="sol", metadata={"k": "v"}), PromptItem(prompt="b")]
    trainer = Trainer(model, tok, RewardWeighted(), collector(), items, group_size=3, prompts_per_step=2,
                      max_new_tokens=3)
    batch = trainer.rollout.sample(items, 3)
    reqs = build_requests(batch)
    assert len(reqs) == 2
    assert reqs[0].prompt == "a" and reqs[0].privileged == "sol"
    assert reqs[0].metadata == {"k": "v", "answer": "1"} and reqs[1].metadata == {}
    assert list(reqs[1].completions) == batch.completions[3:6]
    assert all(c.token_ids for c in reqs[0].completions)


class HalfBroken:
    """Scores answers, but fails (non-retriable) on prompts whose metadata id is odd."""

    id = "half-broken"

    async def feedback(self, request):
        if request.metadata["id"] % 2:
            raise TeacherError("scripted failure", retriable=False)
        return Score(scores=[1.0 if c.text.endswith("7") else 0.5 for c in request.completions])


def test_failed_feedback_is_masked_not_a_reward():
    tok = tiny_tokenizer()
    model = tiny_model(tok)
    items = [PromptItem(prompt=f"p{d}", metadata={"id": d}) for d in range(4)]
    trainer = Trainer(model, tok, RewardWeighted(), collector(HalfBroken(), max_retries=0), items,
                      group_size=2, prompts_per_step=4, max_new_tokens=3, shuffle=False, max_steps=1)
    row = trainer.train_step()
    assert row["teacher/failures"] == 2
    assert row["reward/mean"] >= 0.5  # only the answered groups count; failures are not zeros
    assert torch.isfinite(torch.tensor(row["loss/total"]))


def _grads_of_one_step(micro_batch_prompts):
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=1)
    items = [PromptItem(prompt=f"Say seven {d}", answer="7") for d in range(4)]
    trainer = Trainer(model, tok, RewardWeighted(normalisation="sequence"),
                      collector(VerifierTeacher("callable", check=lambda text, want: float(len(text)) / 4)), items,
                      group_size=4, prompts_per_step=4, micro_batch_prompts=micro_batch_prompts, max_new_tokens=4,
                      seed=5, max_grad_norm=None, shuffle=False)
    grads = {}
    original_step = trainer.optimizer.step

    def record_then_step(*a, **k):
        grads.update({i: p.grad.clone() for i, p in enumerate(trainer.params) if p.grad is not None})
        return original_step(*a, **k)

    trainer.optimizer.step = record_then_step
    trainer.train_step()
    return grads


def test_gradient_accumulation_equals_one_big_batch():
    whole, split = _grads_of_one_step(None), _grads_of_one_step(1)
    assert whole.keys() == split.keys() and whole
    assert sum(g.abs().sum() for g in whole.values()) > 0
    for i in whole:
        assert torch.allclose(whole[i], split[i], atol=1e-6, rtol=1e-4)


def test_lora_bf16_checkpointing_and_save(tmp_path):
    peft = pytest.importorskip("peft")
    tok = tiny_tokenizer()
    model = tiny_model(tok)
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, tok, RewardWeighted(), collector(), SEVEN, group_size=2, prompts_per_step=4,
                      micro_batch_prompts=2, max_steps=2, lr=1e-2, max_new_tokens=3, precision="bf16",
                      lora={"r": 4, "target_modules": ["q_proj", "v_proj"]}, gradient_checkpointing=True,
                      output_dir=tmp_path)
    history = trainer.train()
    assert len(history) == 2 and all(r["loss/total"] == r["loss/total"] for r in history)
    base = trainer.model.get_base_model()
    for name, value in base.state_dict().items():
        if "lora_" not in name and "base_layer" not in name:
            assert torch.equal(value, base_before[name]), name
    assert (tmp_path / "final" / "adapter_model.safetensors").exists()
    reloaded = peft.PeftModel.from_pretrained(tiny_model(tok), tmp_path / "final")
    lora_now = {k: v for k, v in trainer.model.state_dict().items() if "lora_B" in k}
    assert any(v.abs().sum() > 0 for v in lora_now.values())  # the adapters trained
    for k, v in reloaded.state_dict().items():
        if k in lora_now:
            assert torch.equal(v, lora_now[k])
    merged = trainer.save_pretrained(tmp_path / "merged", merge_lora=True)
    assert json.loads((merged / "config.json").read_text())["model_type"] == "llama"


def test_bad_trainer_settings():
    tok = tiny_tokenizer()
    model = tiny_model(tok)
    with pytest.raises(ConfigError, match="FeedbackCollector"):
        Trainer(model, tok, RewardWeighted(), None, SEVEN)
    with pytest.raises(ConfigError, match="precision"):
        Trainer(model, tok, RewardWeighted(), collector(), SEVEN, precision="fp8")
    with pytest.raises(ConfigError, match="lr_schedule"):
        Trainer(model, tok, RewardWeighted(), collector(), SEVEN, lr_schedule="step")


def test_eval_every_logs_the_eval_fn_in_its_step_row():
    tok = tiny_tokenizer()
    model = tiny_model(tok)
    seen = []

    def eval_fn(m):
        seen.append(m)
        return {"acc": 0.5 * len(seen)}

    with pytest.raises(ConfigError, match="eval_fn"):
        Trainer(model, tok, RewardWeighted(), collector(), SEVEN, eval_every=2)
    with collector() as coll:
        trainer = Trainer(model, tok, RewardWeighted(), coll, SEVEN, group_size=2, prompts_per_step=2, max_steps=4,
                          max_new_tokens=2, precision="fp32", eval_fn=eval_fn, eval_every=2)
        history = trainer.train()
    assert [r.get("eval/acc") for r in history] == [None, 0.5, None, 1.0]
    assert seen == [trainer.model, trainer.model]


def test_hybrid_reads_one_collector_per_source():
    """Two teachers at once: a verifier's Score feeds RewardWeighted, a self-distill teacher's
    TokenLogprobs feed TokenDistill; each prompt's feedback reaches its term by source."""
    from opd_sdk.objectives import Hybrid, TokenDistill
    from providers.self_distill import SelfDistillTeacher
    from tests.providers.test_self_distill import (  # a template the teacher's view check accepts
        make_model,
        make_tokenizer,
    )

    tok = make_tokenizer()
    model = make_model(tok, seed=0)
    hybrid = Hybrid([(RewardWeighted(), 1.0, 0), (TokenDistill(), 0.5, 1)], names=["pg", "distill"])
    teacher = SelfDistillTeacher(model, tok, mode="frozen")
    items = [PromptItem(prompt=p.prompt, answer="7", privileged="The answer is 7.") for p in SEVEN]
    with collector() as scores, collector(teacher) as logprobs:
        with pytest.raises(ConfigError, match="2 feedback source"):
            Trainer(model, tok, hybrid, scores, SEVEN)
        trainer = Trainer(model, tok, hybrid, [scores, logprobs], items, group_size=2, prompts_per_step=3,
                          max_steps=2, lr=1e-3, max_new_tokens=4, precision="fp32")
        history = trainer.train()
        sent = [scores.usage.requests_sent, logprobs.usage.requests_sent]
    assert len(history) == 2 and sent[0] == 2 * 3  # 3 prompts a step, 2 steps
    for row in history:
        assert row["objective/pg/valid_samples"] == 6 and row["objective/distill/tokens"] > 0
        assert row["objective/distill/teacher_tokens_missing"] == 0 and row["teacher/failures"] == 0
        assert row["teacher/requests"] is not None
    assert history[-1]["teacher/requests"] == sum(sent) > sent[0]  # both teachers counted


class Constant:
    """Gives every completion the same score: every group is flat, nothing to learn."""

    id = "constant-0.7"

    async def feedback(self, request):
        return Score(scores=[0.7] * len(request.completions))


class AlwaysDown:
    id = "always-down"

    async def feedback(self, request):
        raise TeacherError("connection refused", retriable=False)


def _tiny_trainer(teacher, **kw):
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=3)
    settings = dict(group_size=2, prompts_per_step=2, max_new_tokens=3, lr=1e-2, precision="fp32", max_steps=3)
    return Trainer(model, tok, RewardWeighted(advantage="grpo"), collector(teacher, max_retries=0), SEVEN,
                   **(settings | kw))


def test_flat_groups_move_no_weight():
    """A verifier giving every completion 0.7: 3 GRPO steps at lr 1e-2 change no tensor (AdamW not stepped)."""
    trainer = _tiny_trainer(Constant())
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    history = trainer.train()
    assert [r["optim/skipped"] for r in history] == [1, 1, 1]
    assert all(r["objective/flat_groups"] == 2 and r["optim/signal"] == 0 for r in history)
    assert all(r["optim/grad_norm"] is None for r in history)
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
    assert trainer.scheduler.last_epoch == 0  # the schedule did not advance either
    # Nor AdamW's state: the round-1 loop stepped the optimizer on a zero gradient, which moved the
    # tied embedding through its momentum and advanced its bias correction (a smaller next update).
    assert not trainer.optimizer.state


def test_a_teacher_that_always_fails_stops_the_run_with_a_clear_error():
    from opd_sdk.errors import TrainingStopped

    trainer = _tiny_trainer(AlwaysDown(), max_steps=10, max_no_signal_steps=3)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(TrainingStopped, match=r"3 steps in a row.*always-down.*x2.*--resume") as err:
        trainer.train()
    assert trainer.step == 3 and trainer.metrics.history[-1]["teacher/failures"] == 2
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
    assert "--set steps" not in str(err.value)
    last = _tiny_trainer(AlwaysDown(), max_steps=3, max_no_signal_steps=3)  # stopped at its last step
    with pytest.raises(TrainingStopped, match=r"--resume --set steps=N \(N > 3: this was the last step\)"):
        last.train()


def test_a_spent_budget_stops_the_run():
    from opd_sdk.errors import TrainingStopped
    from opd_sdk.types import CallUsage

    class Paid:
        id = "paid"

        async def feedback(self, request):
            return Score(scores=[float(c.text.endswith("7")) for c in request.completions],
                         usage=CallUsage(calls=1, prompt_tokens=1000, completion_tokens=0))

    trainer = _tiny_trainer(Paid(), max_steps=10)
    trainer.collectors = [collector(Paid(), budget_usd=0.002, price_per_1k_prompt_tokens=0.001, max_concurrency=1)]
    with pytest.raises(TrainingStopped, match="budget is spent"):
        trainer.train()
    assert trainer.step < 10


def test_requests_carry_the_prompt_token_ids_and_the_tokenizer():
    tok = tiny_tokenizer()
    model = tiny_model(tok)
    trainer = Trainer(model, tok, RewardWeighted(), collector(), SEVEN, group_size=2, prompts_per_step=2,
                      max_new_tokens=2)
    batch = trainer.rollout.sample(SEVEN[:2], 2)
    reqs = build_requests(batch, trainer.tokenizer_id)
    rendered = tok.apply_chat_template([{"role": "user", "content": SEVEN[0].prompt}], add_generation_prompt=True,
                                       tokenize=False)
    assert reqs[0].prompt_token_ids == tok(rendered, add_special_tokens=False)["input_ids"]
    assert reqs[0].tokenizer == trainer.tokenizer_id and trainer.tokenizer_id.startswith("tok:")


def test_unknown_setting_says_did_you_mean():
    tok = tiny_tokenizer()
    with pytest.raises(ConfigError, match="did you mean 'group_size'"):
        Trainer(tiny_model(tok), tok, RewardWeighted(), collector(), SEVEN, group_sise=4)


def test_a_second_run_into_the_same_output_dir_is_refused(tmp_path):
    """train() without resume_from never mixes two runs' steps in one folder (metrics, step-N/, final/)."""
    tok = tiny_tokenizer()
    make = lambda: Trainer(tiny_model(tok), tok, RewardWeighted(), collector(), SEVEN, group_size=2,  # noqa: E731
                           prompts_per_step=2, max_steps=1, max_new_tokens=2, output_dir=tmp_path)
    make().train()
    with pytest.raises(ConfigError, match="already holds a run.*resume_from='latest'"):
        make().train()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1]


def test_an_incomplete_objective_is_refused_before_training_naming_what_it_lacks():
    """A user's objective missing protocol members fails at construction, not mid-step."""

    class Partial:  # RewardWeighted's members, minus the two a user most easily forgets
        def __init__(self):
            self.inner = RewardWeighted(advantage="rloo")
            self.feedback_kinds, self.chunk_rows = self.inner.feedback_kinds, self.inner.chunk_rows
            self.min_group_size, self.copies_student = self.inner.min_group_size, self.inner.copies_student
            self.setup, self.after_step, self.loss = self.inner.setup, self.inner.after_step, self.inner.loss
            self.temperature, self.frozen_models = self.inner.temperature, self.inner.frozen_models
            self.plan, self.compute = self.inner.plan, self.inner.compute

    tok = tiny_tokenizer()
    with pytest.raises(ConfigError, match=r"Partial is not a complete objective: it lacks "
                                          r"load_state_dict, recompute_head, state_dict; implement"):
        Trainer(tiny_model(tok, seed=0), tok, Partial(), collector(), SEVEN, group_size=2, prompts_per_step=2)

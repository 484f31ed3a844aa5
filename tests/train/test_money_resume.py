"""The run's spend across resumes (#22 items 1-2): the budget is for the run, not the process, and the
calls paid in a step that was killed reach the cost. Calls are counted at the scripted server; each reply
carries 20 + 5 tokens, $0.025 at $1 per 1k tokens."""

from __future__ import annotations

import pytest

from opd_sdk.data import PromptItem
from opd_sdk.errors import TrainingStopped
from opd_sdk.feedback.collector import FeedbackCollector
from opd_sdk.objectives import RewardWeighted
from opd_sdk.train.trainer import Trainer
from providers.judge import JudgeTeacher
from tests.feedback.test_money_path import CALL_USD, PRICE, reply
from tests.loop_fixtures import one_thread, tiny_model, tiny_tokenizer  # noqa: F401 (fixture)
from tests.scripted_server import ScriptedServer

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = [PromptItem(prompt=f"Say seven {d}", answer="7") for d in range(10)]


def _run(srv, tmp_path, steps: int, **collector):
    tok = tiny_tokenizer()
    judge = JudgeTeacher("judge", base_url=srv.base_url, api_key="k", structured="none")
    coll = FeedbackCollector(judge, progress=False, max_retries=0, cache=tmp_path / "c.sqlite", **PRICE, **collector)
    trainer = Trainer(tiny_model(tok, seed=0), tok, RewardWeighted(), coll, PROMPTS, group_size=2,
                      prompts_per_step=2, max_steps=steps, lr=3e-3, max_new_tokens=4, seed=0, precision="fp32",
                      output_dir=tmp_path / "run", save_every=1, max_no_signal_steps=5)
    return trainer, coll


def test_the_budget_holds_across_a_resume(tmp_path):
    with ScriptedServer(lambda body: reply('{"score": 7}')) as srv:
        trainer, coll = _run(srv, tmp_path, steps=6, budget_usd=0.20)
        with coll, pytest.raises(TrainingStopped, match="budget is spent"):
            trainer.train()
        paid = srv.count
        assert 0 < paid * CALL_USD <= 0.20 + 1e-9 and coll.usage.cost_usd == pytest.approx(paid * CALL_USD)
        again, coll = _run(srv, tmp_path, steps=6, budget_usd=0.20)  # resumed with the same budget
        with coll, pytest.raises(TrainingStopped, match="budget is spent"):
            again.train(resume_from="latest")
        assert srv.count == paid and again.teacher_cost_usd() == pytest.approx(paid * CALL_USD)


def test_calls_paid_in_a_killed_step_reach_the_cost_and_the_counters_of_the_resumed_run(tmp_path):
    with ScriptedServer(lambda body: reply('{"score": 7}')) as srv:
        trainer, coll = _run(srv, tmp_path, steps=4)
        real = trainer.objective.plan

        def plan(batch, feedback, ctx):  # dies after step 3's calls were paid, before its checkpoint
            if trainer.step == 2:
                raise RuntimeError("killed")
            return real(batch, feedback, ctx)

        trainer.objective.plan = plan
        with coll, pytest.raises(RuntimeError, match="killed"):
            trainer.train()
        paid = srv.count
        again, coll = _run(srv, tmp_path, steps=4)
        again.resume("latest")  # step-2's counters + the journal's calls after it
        assert again.step == 2 and coll.usage.http_calls == paid and coll.usage.calls_paid == paid
        assert again.teacher_cost_usd() == pytest.approx(paid * CALL_USD)
        with coll:
            again.train()
        assert coll.usage.calls_paid == srv.count and coll.usage.requests_sent == srv.count
        assert again.teacher_cost_usd() == pytest.approx(srv.count * CALL_USD)

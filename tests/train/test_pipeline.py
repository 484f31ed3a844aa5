"""Overlap of teacher latency with training (rollout.max_staleness = k)."""

from __future__ import annotations

import asyncio
import collections
import time

import pytest

from opd_sdk.data import PromptItem
from opd_sdk.errors import ConfigError, ServerError, TrainingStopped
from opd_sdk.feedback.collector import FeedbackCollector
from opd_sdk.objectives import RewardWeighted
from opd_sdk.train.trainer import Trainer
from opd_sdk.types import CallUsage, Score
from providers.judge import JudgeTeacher
from tests.loop_fixtures import one_thread, tiny_model, tiny_tokenizer  # noqa: F401 (fixture)
from tests.scripted_server import ScriptedServer

pytestmark = pytest.mark.usefixtures("one_thread")
SEVEN = [PromptItem(prompt=f"Say seven {d}", answer="7", metadata={"id": d}) for d in range(10)]


class SlowSeven:
    """An in-process remote-style teacher: 1.0 when the answer starts with 7, after `latency` seconds."""

    def __init__(self, latency: float = 0.0, dense: bool = False) -> None:
        self.id, self.latency, self.calls, self.dense = f"slow-seven-{latency}-{dense}", latency, 0, dense

    async def feedback(self, request):
        self.calls += 1
        await asyncio.sleep(self.latency)
        if self.dense:  # a reward every group can learn from: the answer's length
            return Score(scores=[len(c.text) / 4 for c in request.completions])
        return Score(scores=[float(c.text.startswith("7")) for c in request.completions])


def trainer_for(teacher, k, **kw):
    tok = tiny_tokenizer()
    settings = dict(group_size=8, prompts_per_step=8, max_steps=20, lr=3e-3, max_new_tokens=4, seed=0,
                    precision="fp32", max_staleness=k)
    coll = FeedbackCollector(teacher, progress=False, **kw.pop("collector", {}))
    return Trainer(tiny_model(tok, seed=0), tok, RewardWeighted(), coll, SEVEN, **(settings | kw)), coll


def test_requests_arrive_at_the_server_while_the_trainer_is_in_backward(monkeypatch):
    import opd_sdk.train.trainer as trainer_module

    windows = []
    real = trainer_module.batch_loss

    def timed(*a, **k):  # an update that takes 0.3 s, as a real model's does
        start = time.monotonic()
        try:
            time.sleep(0.3)
            return real(*a, **k)
        finally:
            windows.append((start, time.monotonic()))

    monkeypatch.setattr(trainer_module, "batch_loss", timed)
    with ScriptedServer(lambda body: "Score: 7", latency=0.4) as srv:
        judge = JudgeTeacher("judge", base_url=srv.base_url, api_key="test-key", structured="none")
        trainer, coll = trainer_for(judge, 1, max_steps=4, group_size=2, prompts_per_step=2)
        with coll:
            history = trainer.train()
        served = [(r.arrived, r.finished) for r in srv.requests]
    assert [r["rollout/staleness"] for r in history] == [0, 1, 1, 1]
    assert len(served) == 4 * 2 * 2  # pointwise judge: 4 steps x 2 prompts x 2 completions, each asked once
    # at the server, the next batch's requests are open during the updates of steps 2 and 3 (step 1 waited
    # for batches 1 and 2 sent together; step 4 has no next batch)
    assert len(windows) == 4
    for start, end in windows[1:-1]:
        assert any(a < end and f > start + 0.1 for a, f in served), (served, windows)


@pytest.mark.parametrize("k", [1, 2])
def test_pipelined_training_learns_like_sync_and_never_exceeds_k(k):
    sync, coll = trainer_for(SlowSeven(0.02), 0)
    with coll:
        sync_rewards = [r["reward/mean"] for r in sync.train()]
    piped, coll = trainer_for(SlowSeven(0.02), k)
    with coll:
        history = piped.train()
    assert max(r["rollout/staleness"] for r in history) == k and history[0]["rollout/staleness"] == 0
    assert all(r["rollout/staleness"] <= k for r in history)
    rewards = [r["reward/mean"] for r in history]
    early, late = sum(rewards[:3]) / 3, sum(rewards[-5:]) / 5
    assert late - early > 0.25, rewards
    assert abs(late - sum(sync_rewards[-5:]) / 5) < 0.3, (rewards, sync_rewards)
    assert history[-1]["forward/max_importance_ratio"] > 0  # the truncated importance weights were computed


def test_resume_with_feedback_in_flight_pays_nothing_twice(tmp_path):
    """Stop mid-run (an exception in the update) with a batch in flight; resume; each request paid once."""
    class Crash(RewardWeighted):
        calls = 0

        def plan(self, batch, feedback, ctx):
            Crash.calls += 1
            if Crash.calls == 4:
                raise KeyboardInterrupt
            return super().plan(batch, feedback, ctx)

    full_teacher = SlowSeven(0.05, dense=True)
    full, coll = trainer_for(full_teacher, 1, max_steps=6, prompts_per_step=4, group_size=2,
                             collector={"cache": tmp_path / "full.sqlite"}, output_dir=tmp_path / "full")
    with coll:
        full_rows = full.train()

    teacher = SlowSeven(0.05, dense=True)
    tok = tiny_tokenizer()
    settings = dict(group_size=2, prompts_per_step=4, max_steps=6, lr=3e-3, max_new_tokens=4, seed=0,
                    precision="fp32", max_staleness=1, save_every=1, output_dir=tmp_path / "run")
    coll = FeedbackCollector(teacher, progress=False, cache=tmp_path / "run.sqlite")
    first = Trainer(tiny_model(tok, seed=0), tok, Crash(), coll, SEVEN, **settings)
    with pytest.raises(KeyboardInterrupt):
        first.train()
    coll.close()
    assert first.step == 3 and teacher.calls == 5 * 4  # steps 1-3 trained, 4 and 5 were in flight
    coll = FeedbackCollector(teacher, progress=False, cache=tmp_path / "run.sqlite")
    again = Trainer(tiny_model(tok, seed=0), tok, RewardWeighted(), coll, SEVEN, **settings)
    with coll:
        rows = again.train(resume_from="latest")
    assert teacher.calls == full_teacher.calls == 6 * 4  # nothing paid twice
    # answered by the cache: the batch in flight at the checkpoint (step 4's) and the one sampled before the
    # crash (step 5's: the restored RNG samples it again, token for token)
    assert coll.usage.cache_hits == 2 * 4
    assert [r["step"] for r in rows] == [4, 5, 6] and any(r["optim/skipped"] == 0 for r in rows)
    for key in ("reward/mean", "loss/total"):  # the resumed run is the uninterrupted one
        assert [r[key] for r in rows] == pytest.approx([r[key] for r in full_rows[3:]], abs=1e-6)


class Flaky(SlowSeven):
    """Answers (counting each answered request), but is down while `down` is set."""

    def __init__(self) -> None:
        super().__init__(0.02, dense=True)
        self.down, self.answered = False, collections.Counter()

    async def feedback(self, request):
        if self.down:
            raise ServerError("503 service unavailable", status=503)
        out = await super().feedback(request)
        self.answered[request.canonical_json()] += 1
        return out


def _piped(teacher, tmp_path, **collector):
    tok = tiny_tokenizer()
    coll = FeedbackCollector(teacher, progress=False, max_retries=0, cache=tmp_path / "c.sqlite", **collector)
    trainer = Trainer(tiny_model(tok, seed=0), tok, RewardWeighted(), coll, SEVEN, group_size=2, prompts_per_step=2,
                      max_steps=8, lr=3e-3, max_new_tokens=4, seed=0, precision="fp32", max_staleness=1,
                      max_no_signal_steps=2, output_dir=tmp_path / "run", save_every=100)
    return trainer, coll


def test_teacher_down_mid_pipeline_stops_cleanly_and_resume_pays_nothing_twice(tmp_path):
    teacher = Flaky()
    trainer, coll = _piped(teacher, tmp_path)
    real_step = trainer.train_step

    def step_then_fail():
        row = real_step()
        teacher.down = trainer.step >= 3  # down from the batches sampled after step 3
        return row

    trainer.train_step = step_then_fail
    with coll, pytest.raises(TrainingStopped, match="no usable teacher feedback"):
        trainer.train()
    stopped_at = trainer.step
    assert 3 < stopped_at < 8 and (tmp_path / "run" / f"step-{stopped_at}").is_dir()
    teacher.down = False
    again, coll = _piped(teacher, tmp_path)
    with coll:
        rows = again.train(resume_from="latest")
    assert again.step == 8 and rows[-1]["step"] == 8
    assert max(teacher.answered.values()) == 1  # no answered request was asked twice


def test_budget_spent_mid_pipeline_stops_cleanly_and_resume_pays_nothing_twice(tmp_path):
    teacher = Flaky()

    priced = {"budget_usd": 0.0095, "price_per_1k_prompt_tokens": 1.0}
    trainer, coll = _piped(teacher, tmp_path, **priced)
    real = teacher.feedback

    async def with_usage(request):  # 1 prompt token a call: $0.001; the budget covers 9 calls
        out = await real(request)
        return out.model_copy(update={"usage": CallUsage(calls=1, prompt_tokens=1)})

    teacher.feedback = with_usage
    with coll, pytest.raises(TrainingStopped, match="budget is spent"):
        trainer.train()
    assert sum(teacher.answered.values()) <= 9 + 4  # calls already in flight at the limit finish (2 batches x 2)
    again, coll = _piped(teacher, tmp_path, budget_usd=1.0, price_per_1k_prompt_tokens=1.0)
    with coll:
        again.train(resume_from="latest")
    assert again.step == 8 and max(teacher.answered.values()) == 1


def test_ctrl_c_mid_step_with_a_batch_in_flight_resumes_that_step(tmp_path):
    """KeyboardInterrupt inside step 3's update: the checkpoint holds the batches in flight at that step's
    start, so the resumed run trains the same batches and asks nothing twice."""
    teacher = Flaky()
    trainer, coll = _piped(teacher, tmp_path)
    real = trainer.objective.plan

    def plan(batch, feedback, ctx):
        if trainer.step == 2:
            raise KeyboardInterrupt
        return real(batch, feedback, ctx)

    trainer.objective.plan = plan
    with coll, pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert (tmp_path / "run" / "step-2").is_dir()
    again, coll = _piped(teacher, tmp_path)
    with coll:
        rows = again.train(resume_from="latest")
    assert [r["step"] for r in rows] == [3, 4, 5, 6, 7, 8]
    assert max(teacher.answered.values()) == 1 and coll.usage.cache_hits >= 2 * 2
    (tmp_path / "full").mkdir()
    full, coll = _piped(Flaky(), tmp_path / "full")
    with coll:
        full_rows = full.train()
    for key in ("reward/mean", "loss/total"):  # the same batches were trained, in the same order
        assert [r[key] for r in rows] == pytest.approx([r[key] for r in full_rows[2:]], abs=1e-6)


def test_with_max_staleness_0_the_step_samples_then_asks_on_its_own_thread():
    """k = 0: top_up samples the step's one batch; its feedback is asked only when the step calls for it,
    on the calling thread; staleness 0; nothing in flight to checkpoint or wait for."""
    import threading

    from opd_sdk.train.pipeline import Pipeline

    events = []
    sample = lambda: events.append("sample") or f"batch{len(events)}"  # noqa: E731
    collect = lambda batch: events.append(("collect", batch, threading.current_thread().name)) or [batch]  # noqa: E731
    pipe = Pipeline(0, sample, collect, overlap=False)
    for step in range(2):
        pipe.top_up(step, steps_left=5 - step)
        batch, staleness, answer = pipe.pop(step)
        assert events[-1] == "sample" and staleness == 0 and pipe.state() == []
        assert answer() == [batch]
    pipe.top_up(5, steps_left=0)  # a step called past the last one still gets its batch
    assert events == ["sample", ("collect", "batch1", threading.current_thread().name),
                      "sample", ("collect", "batch3", threading.current_thread().name), "sample"]
    pipe.drain()
    pipe.close()
    with pytest.raises(ConfigError, match="max_staleness >= 1"):
        Pipeline(0, sample, collect, overlap=True)

"""Overlap of teacher latency with training (rollout.max_staleness = k)."""

from __future__ import annotations

import asyncio
import time

import pytest

from opd_sdk.collector import FeedbackCollector
from opd_sdk.data import PromptItem
from opd_sdk.objectives import RewardWeighted
from opd_sdk.trainer import Trainer
from opd_sdk.types import Score
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
    import opd_sdk.trainer as trainer_module

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
    assert [r["staleness"] for r in history] == [0, 1, 1, 1]
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
        sync_rewards = [r["reward_mean"] for r in sync.train()]
    piped, coll = trainer_for(SlowSeven(0.02), k)
    with coll:
        history = piped.train()
    assert max(r["staleness"] for r in history) == k and history[0]["staleness"] == 0
    assert all(r["staleness"] <= k for r in history)
    rewards = [r["reward_mean"] for r in history]
    early, late = sum(rewards[:3]) / 3, sum(rewards[-5:]) / 5
    assert late - early > 0.25, rewards
    assert abs(late - sum(sync_rewards[-5:]) / 5) < 0.3, (rewards, sync_rewards)
    assert history[-1]["max_importance_ratio"] > 0  # the truncated importance weights were computed


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
    assert [r["step"] for r in rows] == [4, 5, 6] and any(r["skipped_step"] == 0 for r in rows)
    for key in ("reward_mean", "loss"):  # the resumed run is the uninterrupted one
        assert [r[key] for r in rows] == pytest.approx([r[key] for r in full_rows[3:]], abs=1e-6)

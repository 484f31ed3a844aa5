"""Checkpoints resume exactly, and the feedback cache makes a resume free of repeated teacher calls."""

from __future__ import annotations

import json

import pytest
import torch

from opd_sdk.data import PromptItem
from opd_sdk.errors import ConfigError, CorruptedFile
from opd_sdk.feedback.collector import FeedbackCollector
from opd_sdk.objectives import RewardWeighted
from opd_sdk.train.checkpoint import STATE_FILE, latest_checkpoint
from opd_sdk.train.metrics import read_metrics
from opd_sdk.train.trainer import Trainer
from providers.verifier import VerifierTeacher
from tests.loop_fixtures import one_thread, tiny_model, tiny_tokenizer  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [PromptItem(prompt=f"Say seven {d}", answer="7") for d in range(6)]  # 6 prompts, 4 a step: epochs wrap


def early_letter(text: str, answer: str) -> bool:
    """A reward a random tiny model earns about half the time, so every step has a gradient."""
    return any(c in "abcdefghijklm" for c in text)


class CountingVerifier(VerifierTeacher):
    """The real VerifierTeacher, counting the requests that reach it (cache hits never do)."""

    def __init__(self):
        super().__init__(check=early_letter)
        self.calls = 0

    async def feedback(self, request):
        self.calls += 1
        return await super().feedback(request)


class Interrupted(Exception):
    pass


class CrashOnLoss(RewardWeighted):
    """Dies in the targets step of step `crash_step`: after that step's feedback was collected (and cached)."""

    def __init__(self, crash_step, **kw):
        super().__init__(**kw)
        self.calls, self.crash_step = 0, crash_step

    def plan(self, batch, feedback, ctx):
        self.calls += 1
        if self.calls == self.crash_step:
            raise Interrupted
        return super().plan(batch, feedback, ctx)


def make_trainer(out, cache, objective, save_every=0):
    tok = tiny_tokenizer()
    teacher = CountingVerifier()
    coll = FeedbackCollector(teacher, cache=cache, progress=False)
    trainer = Trainer(
        tiny_model(tok, seed=0), tok, objective, coll, PROMPTS,
        group_size=3, prompts_per_step=4, max_steps=4, lr=5e-3, warmup_steps=1, lr_schedule="linear",
        max_new_tokens=4, seed=11, output_dir=out, save_every=save_every, precision="fp32",
    )
    return trainer, teacher, coll


def objective(**kw):
    return dict(beta=0.05, kl_estimator="k3", **kw)  # a reference model: setup() order matters on resume


def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path):
    full, full_teacher, full_coll = make_trainer(tmp_path / "full", tmp_path / "full.sqlite", RewardWeighted(**objective()))
    full.train()
    full_coll.close()
    assert full_teacher.calls == 4 * 4  # 4 steps x 4 prompt groups

    out, cache = tmp_path / "run", tmp_path / "run.sqlite"
    first, first_teacher, first_coll = make_trainer(out, cache, CrashOnLoss(3, **objective()), save_every=2)
    with pytest.raises(Interrupted):
        first.train()
    first_coll.close()
    assert first_teacher.calls == 3 * 4  # step 3's feedback was collected (and cached) before the crash
    assert latest_checkpoint(out).name == "step-2"

    second, second_teacher, second_coll = make_trainer(out, cache, RewardWeighted(**objective()))
    second.train(resume_from="latest")
    second_coll.close()
    assert second.step == 4
    assert second_teacher.calls == 4  # step 3 came from the cache; only step 4 was new
    assert second_coll.usage.cache_hits == 4
    assert first_teacher.calls + second_teacher.calls == full_teacher.calls

    want, got = full.model.state_dict(), second.model.state_dict()
    for name in want:
        assert torch.allclose(want[name], got[name], atol=1e-6, rtol=0), name
    moved = sum((want[n] - tiny_model(tiny_tokenizer(), seed=0).state_dict()[n]).abs().sum() for n in want)
    assert moved > 0  # the runs trained at all
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # the crashed step logged nothing; nothing repeated
    full_rows = read_metrics(tmp_path / "full" / "metrics.jsonl")
    assert [r["reward/mean"] for r in rows] == [r["reward/mean"] for r in full_rows]
    assert [r["optim/lr"] for r in rows] == [r["optim/lr"] for r in full_rows]


def test_resume_errors_are_clear(tmp_path):
    trainer, _, coll = make_trainer(tmp_path, None, RewardWeighted())
    trainer.max_steps = 1
    trainer.train()
    path = trainer.save_checkpoint()
    assert path.name == "step-1" and latest_checkpoint(tmp_path) == path
    (tmp_path / "step-9.tmp").mkdir()  # a half-written save is never picked up
    assert latest_checkpoint(tmp_path) == path
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        trainer.resume(tmp_path / "step-9.tmp")
    lora_trainer, _, _ = make_trainer(tmp_path / "lora", None, RewardWeighted())
    peft = pytest.importorskip("peft")
    lora_trainer.model = peft.get_peft_model(lora_trainer.model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="full model"):
        lora_trainer.resume(path)
    coll.close()


class StopInLoss(RewardWeighted):
    """Raises `error` in the targets step of step `at`: after that step's batch was drawn and its feedback cached."""

    def __init__(self, at, error, **kw):
        super().__init__(**kw)
        self.calls, self.at, self.error = 0, at, error

    def plan(self, batch, feedback, ctx):
        self.calls += 1
        if self.calls == self.at:
            raise self.error
        return super().plan(batch, feedback, ctx)


def test_ctrl_c_mid_step_checkpoints_the_step_start_and_resumes_exactly(tmp_path):
    """No save_every: the only checkpoint is the one Ctrl-C writes. It holds step 2's weights with the
    sampler and RNG as they were when step 3 began, so the resumed run redraws step 3 (from the cache)
    and ends with the uninterrupted run's weights."""
    full, _, full_coll = make_trainer(tmp_path / "full", tmp_path / "full.sqlite", RewardWeighted(**objective()))
    full.train()
    full_coll.close()

    out, cache = tmp_path / "run", tmp_path / "run.sqlite"
    first, first_teacher, first_coll = make_trainer(out, cache, StopInLoss(3, KeyboardInterrupt(), **objective()))
    with pytest.raises(KeyboardInterrupt):
        first.train()
    first_coll.close()
    assert sorted(p.name for p in out.glob("step-*")) == ["step-2"]

    second, second_teacher, second_coll = make_trainer(out, cache, RewardWeighted(**objective()))
    second.train(resume_from="latest")
    second_coll.close()
    assert second_coll.usage.cache_hits == 4 and second_teacher.calls == 4  # step 3 from the cache
    for name, want in full.model.state_dict().items():
        assert torch.allclose(want, second.model.state_dict()[name], atol=1e-6, rtol=0), name
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]


def test_training_stopped_checkpoints_then_reraises_and_old_checkpoints_are_pruned(tmp_path):
    from opd_sdk.errors import TrainingStopped

    trainer, _, coll = make_trainer(tmp_path, None, StopInLoss(4, TrainingStopped("no signal"), **objective()),
                                    save_every=1)
    with pytest.raises(TrainingStopped, match="no signal"):
        trainer.train()
    coll.close()
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-1", "step-2", "step-3"]
    trainer.max_steps, trainer.objective.at = 6, 0
    trainer.train()
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-4", "step-5", "step-6"]  # keep_checkpoints 3


def test_resume_from_nothing_is_an_error(tmp_path):
    trainer, _, coll = make_trainer(tmp_path, None, RewardWeighted())
    with pytest.raises(ConfigError, match="nothing to resume"):
        trainer.train(resume_from="latest")
    coll.close()


class _Payload:
    def __reduce__(self):
        return (print, ("arbitrary code ran",))


def test_a_checkpoint_never_unpickles_arbitrary_objects(tmp_path, capsys):
    import pickle

    from opd_sdk.train.checkpoint import load_checkpoint

    trainer, _, coll = make_trainer(tmp_path, None, RewardWeighted())
    trainer.max_steps = 1
    trainer.train()
    coll.close()
    step = latest_checkpoint(tmp_path)
    assert (step / "model" / "model.safetensors").exists()
    (step / "rng.pt").write_bytes(pickle.dumps({"python": _Payload()}))
    state = json.loads((step / STATE_FILE).read_text())
    state["files"]["rng.pt"] = (step / "rng.pt").stat().st_size  # the size check passes: torch.load refuses it
    (step / STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(CorruptedFile, match=r"rng.pt cannot be read \(Weights only load failed") as exc:
        load_checkpoint(step, parallel=trainer.parallel, model=trainer.model, scheduler=trainer.scheduler)
    assert isinstance(exc.value.__cause__, pickle.UnpicklingError)
    assert "arbitrary code ran" not in capsys.readouterr().out

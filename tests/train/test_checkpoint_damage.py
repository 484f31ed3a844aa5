"""Damaged checkpoints name their file, and resuming from "latest" sets them aside for the newest intact
one; a process killed with SIGKILL in the middle of a save leaves no checkpoint that looks whole."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opd_sdk.errors import ConfigError, CorruptedFile
from opd_sdk.objectives import RewardWeighted
from opd_sdk.train.checkpoint import (
    STATE_FILE,
    DamagedCheckpoint,
    checkpoint_problem,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
)
from tests.loop_fixtures import one_thread  # noqa: F401 (fixture)
from tests.train.test_checkpoint import make_trainer

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory) -> Path:
    """A run of 2 steps with a checkpoint each (step-1/, step-2/); tests copy it."""
    out = tmp_path_factory.mktemp("two_steps") / "run"
    trainer, _, coll = make_trainer(out, None, RewardWeighted(), save_every=1)
    trainer.max_steps = 2
    trainer.train()
    coll.close()
    return out


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def junk_of_same_size(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * (path.stat().st_size // 256) + b"\x00" * (path.stat().st_size % 256))


def cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {  # (file in step-2/, damage, what the problem says)
    "state_junk": (STATE_FILE, junk_of_same_size, "trainer_state.json does not parse"),
    "state_missing": (STATE_FILE, Path.unlink, "trainer_state.json is missing"),
    "optimizer_truncated": ("optimizer.pt", cut_in_half, "optimizer.pt is"),
    "optimizer_junk": ("optimizer.pt", junk_of_same_size, "optimizer.pt cannot be read (Weights only load failed"),
    "weights_truncated": ("model/model.safetensors", cut_in_half, "model.safetensors is"),
    "weights_junk": ("model/model.safetensors", junk_of_same_size, "model.safetensors cannot be read (Error while"),
    "scheduler_missing": ("scheduler.pt", Path.unlink, "scheduler.pt is missing"),
    "rng_junk": ("rng.pt", junk_of_same_size, "rng.pt cannot be read"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_sets_a_damaged_checkpoint_aside_and_continues_from_the_newest_intact(tmp_path, two_steps, damage,
                                                                                    caplog):
    out = copy_run(two_steps, tmp_path / "run")
    name, spoil, says = DAMAGE[damage]
    spoil(out / "step-2" / name)
    trainer, _, coll = make_trainer(out, None, RewardWeighted(), save_every=1)
    with caplog.at_level(logging.WARNING, logger="opd_sdk.train.checkpoint"):
        assert trainer.resume("latest") == 1
    assert says in caplog.text and "checkpoint step-2 is damaged" in caplog.text
    assert "moved aside to step-2.damaged; resuming from step-1" in caplog.text
    assert sorted(p.name for p in out.glob("step-*")) == ["step-1", "step-2.damaged"]
    saved = load_file(str(out / "step-1" / "model" / "model.safetensors"))  # step-1's weights, not a mix
    for key, value in saved.items():
        assert torch.equal(trainer.model.state_dict()[key], value), key
    assert trainer.optimizer.state_dict()["state"][0]["step"] == 1  # AdamW's step count of step 1
    trainer.max_steps = 3
    trainer.train()  # trains on over the damaged step: step-2/ and step-3/ written anew
    coll.close()
    assert sorted(p.name for p in out.glob("step-*")) == ["step-1", "step-2", "step-2.damaged", "step-3"]
    assert latest_checkpoint(out) == out / "step-3" and checkpoint_problem(out / "step-2") is None


@pytest.mark.parametrize("damage", ["state_junk", "optimizer_truncated", "optimizer_junk", "weights_junk"])
def test_loading_a_damaged_checkpoint_names_the_file_and_the_fix(tmp_path, two_steps, damage):
    out = copy_run(two_steps, tmp_path / "run")
    name, spoil, says = DAMAGE[damage]
    spoil(out / "step-2" / name)
    trainer, _, coll = make_trainer(tmp_path / "other", None, RewardWeighted())
    coll.close()
    with pytest.raises(DamagedCheckpoint) as exc:
        load_checkpoint(out / "step-2", parallel=trainer.parallel, model=trainer.model, scheduler=trainer.scheduler)
    message = str(exc.value)
    assert says in message and str(out / "step-2" / name) in message and exc.value.path == out / "step-2"
    assert f"mv {out / 'step-2'} {out / 'step-2'}.damaged" in message
    assert "continues from the newest older checkpoint" in message


def test_when_every_checkpoint_is_damaged_resume_says_so_and_points_to_overwrite(tmp_path, two_steps):
    out = copy_run(two_steps, tmp_path / "run")
    cut_in_half(out / "step-1" / "optimizer.pt")
    junk_of_same_size(out / "step-2" / STATE_FILE)
    trainer, _, coll = make_trainer(out, None, RewardWeighted())
    coll.close()
    with pytest.raises(CorruptedFile, match=r"nothing intact to resume from in .*checkpoint step-2 is damaged .*"
                                            r"checkpoint step-1 is damaged .*optimizer.pt is .*--overwrite"):
        trainer.resume("latest")
    with pytest.raises(ConfigError, match="already holds a run"):  # a fresh run does not write over them either
        trainer.train()


def test_checkpoint_lists_its_files_and_prune_keeps_intact_ones(tmp_path, two_steps):
    out = copy_run(two_steps, tmp_path / "run")
    state = json.loads((out / "step-2" / STATE_FILE).read_text())
    listed = state["files"]
    on_disk = {p.relative_to(out / "step-2").as_posix(): p.stat().st_size
               for p in (out / "step-2").rglob("*") if p.is_file() and p.name != STATE_FILE}
    assert listed == on_disk and "optimizer.pt" in listed and "model/model.safetensors" in listed
    (out / "step-3.old").mkdir()  # a kill between setting the previous step-3/ aside and the rename
    (out / "step-3.tmp").mkdir()
    cut_in_half(out / "step-2" / "optimizer.pt")  # not counted among the kept, never deleted
    assert latest_checkpoint(out) == out / "step-1"
    deleted = prune_checkpoints(out, keep=1)
    assert sorted(p.name for p in deleted) == ["step-3.old", "step-3.tmp"]
    assert sorted(p.name for p in out.glob("step-*")) == ["step-1", "step-2"]


@pytest.mark.parametrize("where", ["scrubbing", "before_rename"])
def test_a_kill_during_a_save_leaves_no_checkpoint_that_looks_whole(tmp_path, where):
    """A real process killed with SIGKILL inside step 2's save: step-2.tmp/ is left, never step-2/;
    resuming takes step-1/ and saves step-2/ again."""
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "train" / "save_kill_script.py"), str(out), where],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = iter(proc.stdout.readline, "")  # other libraries print too; "" at the end of output
        assert any(line.strip() == "SAVING" for line in lines), proc.stderr.read()
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert sorted(p.name for p in out.glob("step-*")) == ["step-1", "step-2.tmp"]
    assert latest_checkpoint(out) == out / "step-1"
    trainer, _, coll = make_trainer(out, None, RewardWeighted(), save_every=1)
    trainer.max_steps = 2
    trainer.train(resume_from="latest")
    coll.close()
    assert sorted(p.name for p in out.glob("step-*")) == ["step-1", "step-2"]  # the stale .tmp pruned
    assert checkpoint_problem(out / "step-2") is None

"""One run at a time in an output_dir: a second process is refused with the holder's PID (the CLI
and the Python Trainer), the lock is re-entrant within a process, and a lock whose holder was
killed with SIGKILL blocks nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from opd_sdk.errors import ConfigError
from opd_sdk.train import run_lock
from tests.train.test_crash_resume import (
    GatedJudge,
    start,
    steps_in,
    write_config,
)

ROOT = Path(__file__).resolve().parents[2]


def hold_in_child(output_dir: Path) -> subprocess.Popen:
    """Another process that takes the lock on output_dir and sleeps (until killed)."""
    code = textwrap.dedent(f"""
        import time
        from opd_sdk.train import run_lock
        run_lock.acquire({str(output_dir)!r})
        print("HELD", flush=True)
        time.sleep(300)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "HELD", proc.stderr.read()
    return proc


def test_a_second_process_is_refused_with_the_holders_pid_until_the_holder_is_killed(tmp_path):
    out = tmp_path / "run"
    holder = hold_in_child(out)
    try:
        record = json.loads((out / run_lock.HOLDER_FILE).read_text())
        assert record["pid"] == holder.pid
        with pytest.raises(ConfigError, match=rf"output_dir {out} is in use by another run \(PID {holder.pid} on "):
            run_lock.acquire(out)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=30)
    assert (out / run_lock.HOLDER_FILE).exists()  # a dead holder's record stays; its lock went with it
    run_lock.acquire(out)
    assert json.loads((out / run_lock.HOLDER_FILE).read_text())["pid"] == os.getpid()
    run_lock.release(out)
    assert not (out / run_lock.HOLDER_FILE).exists()


def locked_elsewhere(out: Path) -> bool:
    """Whether another process finds the OS lock on out/.opd-lock taken (plain filelock: a quick import)."""
    code = (f"import filelock, sys\ntry:\n    filelock.FileLock({str(out / run_lock.LOCK_FILE)!r}, timeout=0).acquire()\n"
            "except filelock.Timeout:\n    sys.exit(3)")
    return subprocess.run([sys.executable, "-c", code], timeout=60, check=False).returncode == 3


def test_the_lock_is_reentrant_in_one_process_and_released_by_the_last_hold(tmp_path):
    out = tmp_path / "run"
    with run_lock.hold_output_dir(out):
        with run_lock.hold_output_dir(out):  # opd train holds it, and so does its Trainer
            assert locked_elsewhere(out)
        assert locked_elsewhere(out)  # still held after the inner release
    assert not locked_elsewhere(out)
    with run_lock.hold_output_dir(None):  # no output_dir: nothing to lock
        pass


def test_trainer_train_refuses_an_output_dir_another_process_trains_in(tmp_path):
    from opd_sdk.objectives import RewardWeighted
    from tests.train.test_checkpoint import make_trainer

    out = tmp_path / "run"
    holder = hold_in_child(out)
    try:
        trainer, _, coll = make_trainer(out, None, RewardWeighted())
        trainer.max_steps = 1
        with pytest.raises(ConfigError, match=rf"in use by another run \(PID {holder.pid} "):
            trainer.train()
        assert not (out / "metrics.jsonl").exists() and not list(out.glob("step-*"))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=30)
    trainer.train()  # the holder is gone
    coll.close()
    assert (out / "step-1").is_dir()


def test_two_opd_train_resume_on_one_output_dir_the_second_is_refused(tmp_path, tiny_dir):
    """A real `opd train` holds a judge call open; a second `opd train --resume` on its output_dir is
    refused at once with the first one's PID, and the first finishes with each step logged once."""
    from tests.scripted_server import ScriptedServer

    judge = GatedJudge(hold_at=4)  # step 2's first call, after step-1/ is saved
    with ScriptedServer(judge) as srv:
        config = write_config(tmp_path, tiny_dir, srv.base_url)
        first = start(config)
        try:
            assert judge.reached.wait(180), first.stderr.read() if first.poll() is not None else "no call"
            asked = len(srv.requests)
            second = start(config, "--resume")
            _, err = second.communicate(timeout=180)
            assert second.returncode == 2, err
            assert f"is in use by another run (PID {first.pid} on " in err and "Traceback" not in err
            assert len(srv.requests) == asked  # the second asked the judge nothing
        finally:
            judge.release.set()
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert steps_in(tmp_path / "run") == [0, 1, 2, 3, 4]
    assert not (tmp_path / "run" / run_lock.HOLDER_FILE).exists()

"""`opd train` as a real subprocess against the scripted judge server, killed with SIGKILL during feedback
collection and right after a step's feedback, and stopped with SIGTERM: `--resume` finishes the run, no
answered judge call is sent twice, metrics.jsonl holds each step once, and no file the run wrote (cache,
checkpoints, metrics, configs, logs) contains the API key."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.scripted_server import ScriptedServer

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-SCAN-7f3a9c1e5b2d4680"  # fake; must never appear in anything the run writes
STEPS = 4
CALLS_PER_STEP = 4  # 2 prompts x 2 samples, one pointwise judge call each



class GatedJudge:
    """Answers {"score": 7}; the request with index `hold_at` waits (the test kills the client meanwhile)."""

    def __init__(self, hold_at: int | None = None) -> None:
        self.hold_at = hold_at
        self.seen = 0
        self.reached = threading.Event()
        self.release = threading.Event()

    def __call__(self, body: dict) -> str:
        index, self.seen = self.seen, self.seen + 1
        if index == self.hold_at:
            self.reached.set()
            self.release.wait(60)
        return '{"score": 7}'


def write_config(tmp_path: Path, tiny_dir: Path, base_url: str) -> Path:
    raw = {
        "student": {"model": str(tiny_dir)},
        "data": {"task": "addition", "eval_size": 4},
        "teacher": {"type": "judge", "model": "judge", "base_url": base_url, "api_key_env": "OPD_CRASH_KEY"},
        "objective": {"type": "reward_weighted", "params": {"advantage": "rloo"}},
        "rollout": {"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 4},
        "collector": {"max_concurrency": 1},  # one call at a time: the held call is the only one in flight
        "eval": {"max_new_tokens": 4, "batch_size": 4},
        "optimizer": {"lr": 1e-3},
        "output_dir": str(tmp_path / "run"),
        "steps": STEPS,
        "save_every": 1,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def start(config: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", OPD_CRASH_KEY=KEY)
    return subprocess.Popen(
        [sys.executable, "-m", "opd_sdk", "train", str(config), *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def answered(srv: ScriptedServer) -> list[str]:
    """The judge calls the server finished answering (what a paid API would have billed)."""
    return [json.dumps(r.body["messages"], sort_keys=True) for r in srv.requests if r.finished is not None]


def cached(tmp_path: Path) -> int:
    """Judge answers the run has stored in its feedback cache (read while the run writes it)."""
    import sqlite3

    path = tmp_path / "run" / "feedback_cache.sqlite"
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1) as conn:
            return conn.execute("SELECT COUNT(*) FROM feedback").fetchone()[0]
    except sqlite3.OperationalError:  # created but no table yet, or busy
        return 0


def wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def steps_in(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def finish_and_check(config: Path, srv: ScriptedServer, logs: list[str], paid: list[str], start=start) -> dict:
    """Resume (`start(config, "--resume")`); `paid`: the calls answered before the first run died."""
    first = len(srv.requests)
    proc = start(config, "--resume")
    out, err = proc.communicate(timeout=300)
    logs += [out, err]
    assert proc.returncode == 0, err
    run = config.parent / "run"
    assert steps_in(run) == list(range(STEPS + 1))  # step 0: held-out metric before training
    again = [json.dumps(r.body["messages"], sort_keys=True) for r in srv.requests[first:]]
    repeated = [i for i, r in enumerate(srv.requests[first:]) if json.dumps(r.body["messages"], sort_keys=True) in paid]
    assert not repeated, f"judge calls answered before the crash were sent again: {repeated} of {paid and len(paid)}"
    assert len(again) == len(set(again)) and len(paid) == len(set(paid))
    return json.loads(out[out.index("{"):])


def assert_no_key_anywhere(run: Path, logs: list[str]) -> None:
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.name.endswith(".sqlite") for p in files) and any("step-" in str(p) for p in files)
    for p in files:
        assert KEY.encode() not in p.read_bytes(), p
    assert all(KEY not in text for text in logs)


@pytest.mark.parametrize("when", ["during_feedback", "after_feedback"])
def test_kill_9_then_resume_finishes_without_paying_twice(tmp_path, tiny_dir, when):
    hold_at = 2 * CALLS_PER_STEP if when == "during_feedback" else None  # step 3's first call: the server stalls
    judge = GatedJudge(hold_at)
    logs: list[str] = []
    with ScriptedServer(judge) as srv:
        config = write_config(tmp_path, tiny_dir, srv.base_url)
        proc = start(config)
        if when == "during_feedback":
            assert judge.reached.wait(180), proc.stderr.read() if proc.poll() is not None else "no call"
        else:  # step 3's feedback is stored: the process is in its loss / optimizer step (or just past it)
            wait_for(lambda: cached(tmp_path) >= 3 * CALLS_PER_STEP or proc.poll() is not None)
        proc.send_signal(signal.SIGKILL)
        paid = answered(srv)
        if when == "after_feedback":  # a reply the server sent but the killed client never read is not ours to save
            paid = [json.dumps(r.body["messages"], sort_keys=True) for r in srv.requests[: 3 * CALLS_PER_STEP]]
        out, err = proc.communicate(timeout=60)
        logs += [out, err]
        judge.release.set()
        assert proc.returncode == -signal.SIGKILL
        run = tmp_path / "run"
        assert "opd: step 1/4 reward" in err  # progress lines without a terminal
        assert len(steps_in(run)) == len(set(steps_in(run)))
        summary = finish_and_check(config, srv, logs, paid)
    assert summary["steps"] == STEPS
    assert_no_key_anywhere(tmp_path / "run", logs)


def test_sigterm_saves_a_checkpoint_mid_step_and_resume_repeats_no_call(tmp_path, tiny_dir):
    judge = GatedJudge(hold_at=CALLS_PER_STEP)  # step 2's first call, after step-1/ is saved
    logs: list[str] = []
    with ScriptedServer(judge) as srv:
        config = write_config(tmp_path, tiny_dir, srv.base_url)
        proc = start(config)
        assert judge.reached.wait(180)
        proc.send_signal(signal.SIGTERM)
        paid = answered(srv)
        judge.release.set()  # answered while the run shuts down: in flight at the stop, so not counted as paid
        out, err = proc.communicate(timeout=120)
        logs += [out, err]
        assert proc.returncode == 130, err
        assert "interrupted; checkpoint step-1 was saved" in err
        run = tmp_path / "run"
        assert sorted(p.name for p in run.glob("step-*")) == ["step-1"]
        assert steps_in(run) == [0, 1]
        summary = finish_and_check(config, srv, logs, paid)
    assert summary["steps"] == STEPS
    assert_no_key_anywhere(tmp_path / "run", logs)


def test_kill_9_between_two_calls_of_one_group_pays_nothing_twice(tmp_path, tiny_dir):
    """A pointwise judge's calls are cached one completion at a time, so half a group survives a crash."""
    judge = GatedJudge(hold_at=2 * CALLS_PER_STEP + 1)  # step 3, group 0's second call; its first is answered
    logs: list[str] = []
    with ScriptedServer(judge, max_concurrency=1) as srv:  # one call at a time: the first is surely answered
        config = write_config(tmp_path, tiny_dir, srv.base_url)
        proc = start(config)
        assert judge.reached.wait(180)
        wait_for(lambda: cached(tmp_path) >= 2 * CALLS_PER_STEP + 1)  # the client has stored the first call
        proc.send_signal(signal.SIGKILL)
        paid = answered(srv)
        proc.communicate(timeout=60)
        judge.release.set()
        assert len(paid) == 2 * CALLS_PER_STEP + 1
        finish_and_check(config, srv, logs, paid)

"""Ctrl-C with teacher calls in flight (issue 24.11), on a real `opd train` process and real SIGINTs:
the run says that the answers in flight are being kept and that a second Ctrl-C drops them; one
Ctrl-C waits for them (they are paid for: the cache keeps them), a second one exits at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from tests.scripted_server import ScriptedServer

ROOT = Path(__file__).resolve().parents[2]
LATENCY_S = 6.0  # every judge answer takes this long
NOTICE = "teacher answer(s) in flight are being kept"



def start(tmp_path: Path, tiny_dir: Path, base_url: str) -> subprocess.Popen:
    raw = {
        "student": {"model": str(tiny_dir)},
        "data": {"task": "addition", "eval_size": 4},
        "teacher": {"type": "judge", "model": "judge", "base_url": base_url, "api_key_env": "OPD_INT_KEY"},
        "objective": {"type": "reward_weighted", "params": {"advantage": "rloo"}},
        "rollout": {"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 4},
        "collector": {"timeout": 20, "max_retries": 0},
        "eval": {"max_new_tokens": 4, "batch_size": 4},
        "output_dir": str(tmp_path / "run"),
        "steps": 3,
        "logging": {"progress": False},
    }
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", OPD_INT_KEY="sk-test-not-secret")
    return subprocess.Popen([sys.executable, "-m", "opd_sdk", "train", str(config)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


class Lines:
    """stderr of a process, read on a thread, so the test can wait for one line."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self.thread = threading.Thread(target=lambda: self.lines.extend(iter(stream.readline, "")), daemon=True)
        self.thread.start()

    def wait_for(self, text: str, timeout: float) -> float | None:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if any(text in line for line in self.lines):
                return time.monotonic()
            time.sleep(0.05)
        return None


def interrupt_in_flight(tmp_path: Path, tiny_dir: Path, twice: bool) -> tuple[int, str, float, int]:
    """(exit status, stderr, seconds from the first SIGINT to the run's last word, requests the server received)."""
    with ScriptedServer(lambda body: '{"score": 7}', latency=LATENCY_S) as srv:
        proc = start(tmp_path, tiny_dir, srv.base_url)
        err = Lines(proc.stderr)
        deadline = time.monotonic() + 120
        while srv.count < 4 and time.monotonic() < deadline and proc.poll() is None:  # step 1's 4 calls sent
            time.sleep(0.05)
        assert srv.count == 4, "".join(err.lines)
        time.sleep(0.3)
        sent_at = time.monotonic()
        proc.send_signal(signal.SIGINT)
        noticed = err.wait_for(NOTICE, 10)
        assert noticed is not None and noticed - sent_at < 5, "".join(err.lines)
        if twice:
            proc.send_signal(signal.SIGINT)
        said = err.wait_for("opd: interrupted;", 60)  # (the interpreter's own teardown takes seconds more)
        rc = proc.wait(60)
        err.thread.join(5)
        return rc, "".join(err.lines), (said or time.monotonic()) - sent_at, srv.count


def test_a_second_ctrl_c_drops_the_answers_in_flight(tmp_path, tiny_dir):
    rc, err, took, sent = interrupt_in_flight(tmp_path, tiny_dir, twice=True)
    assert rc == 130 and "opd: stopping; 4 teacher answer(s) in flight are being kept" in err, err
    assert "press Ctrl-C again to drop them" in err and "Traceback" not in err, err
    assert "answers in flight dropped" in err, err
    assert took < LATENCY_S - 1, (took, err)  # it did not wait for the answers
    assert sent == 4


def test_one_ctrl_c_waits_for_the_answers_in_flight(tmp_path, tiny_dir):
    rc, err, took, sent = interrupt_in_flight(tmp_path, tiny_dir, twice=False)
    assert rc == 130 and NOTICE in err and "Traceback" not in err, err
    assert took >= LATENCY_S - 1.5, (took, err)  # the answers were waited for (sent ~0.3 s before the Ctrl-C)
    assert "opd: interrupted;" in err and sent == 4

"""Clean lifecycles (issue 14, section 6): a teacher's HTTP clients are released on their
own event loop, whether it is used from `asyncio.run`, from several collectors, or after a
collector closed. Run in a fresh interpreter with every warning an error (an unclosed socket's
ResourceWarning then surfaces as an unraisable exception, which the script reports), and
anything on stderr (asyncio's "Task exception was never retrieved", "Event loop is closed")
fails the test. On the code before the fix it fails with unclosed sockets and transports.
(Not `-X dev`: its asyncio debug mode logs slow callbacks on a loaded machine.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_teacher_clients_close_on_their_own_loop_without_noise():
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="error")
    proc = subprocess.run([sys.executable, "-W", "error", "-m", "tests.lifecycle_script"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for noise in ("Traceback", "Event loop is closed", "never retrieved", "Unclosed", "ResourceWarning",
                  "UNRAISABLE"):
        assert noise not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip() == "", proc.stderr[-3000:]

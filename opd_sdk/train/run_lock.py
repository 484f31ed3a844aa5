"""One run at a time in an output_dir: a lock the run holds while it trains.

Two runs writing one output_dir (two `opd train --resume` started by mistake) would log
steps twice and write over each other's checkpoints. A run takes an exclusive lock on
`output_dir/.opd-lock` (the `filelock` package: `flock` on Unix, `msvcrt.locking` on
Windows), so the operating system releases it when the process ends in any way, kill -9
included: a lock left by a dead process never blocks. Beside it, `.opd-lock.json` names the
holder (PID, host, start time) for the refusal of a second run.

Within one process the lock is re-entrant (`opd train` holds it, and so does the `Trainer`
it runs); in a launched job rank 0 alone holds it.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import filelock

from opd_sdk.errors import ConfigError
from opd_sdk.parallel.distributed import Distributed

LOCK_FILE = ".opd-lock"
HOLDER_FILE = ".opd-lock.json"

_held: dict[Path, list] = {}  # output_dir (resolved) -> [FileLock, holds in this process]
_guard = threading.Lock()


def acquire(output_dir: str | Path) -> None:
    """Take the lock on output_dir (created if missing), or add one hold where this process has it.

    Raises ConfigError naming the holder's PID when another process holds it, or when output_dir
    cannot be written."""
    root = Path(output_dir).resolve()
    with _guard:
        if root in _held:
            _held[root][1] += 1
            return
        try:
            root.mkdir(parents=True, exist_ok=True)
            lock = filelock.FileLock(root / LOCK_FILE, timeout=0)
            lock.acquire()
        except filelock.Timeout:
            raise ConfigError(f"output_dir {output_dir} is in use by another run ({_holder(root)}); wait for it to "
                              "end or stop it, or give this run another output_dir (--set output_dir=...)") from None
        except OSError as exc:
            raise ConfigError(f"output_dir {output_dir} cannot be written ({exc.strerror or exc}); "
                              "give a folder you may write to (--set output_dir=...)") from exc
        _held[root] = [lock, 1]
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    tmp = root / f"{HOLDER_FILE}.{os.getpid()}"
    try:
        tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
        os.replace(tmp, root / HOLDER_FILE)  # whole or absent for a reader
    except OSError as exc:
        release(root)
        raise ConfigError(f"output_dir {output_dir} cannot be written ({exc.strerror or exc}); "
                          "give a folder you may write to (--set output_dir=...)") from exc


def release(output_dir: str | Path) -> None:
    """Drop one hold; the last one removes the holder record and unlocks. A no-op where not held."""
    root = Path(output_dir).resolve()
    with _guard:
        entry = _held.get(root)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _held[root]
        (root / HOLDER_FILE).unlink(missing_ok=True)
        entry[0].release()


@contextmanager
def hold_output_dir(output_dir: str | Path | None, dist: Distributed | None = None) -> Iterator[None]:
    """The lock on output_dir for the body (nothing without an output_dir). In a launched job every
    rank enters; rank 0 takes the lock, and its refusal is raised on every rank."""
    if output_dir is None:
        yield
        return
    dist = dist or Distributed()
    dist.on_main(lambda: acquire(output_dir))
    try:
        yield
    finally:
        if dist.is_main:
            release(output_dir)


def _holder(root: Path) -> str:
    """Who holds the lock, from the record it wrote (a run that just started may not have written it yet)."""
    try:
        record = json.loads((root / HOLDER_FILE).read_text(encoding="utf-8"))
        return f"PID {record['pid']} on {record['host']}, started {record['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that is starting; its PID is not recorded yet"

"""Training progress for people: a tqdm bar on a terminal, plain lines everywhere else.

Without a terminal (nohup, CI, a job scheduler) a bar prints nothing useful,
so each step prints one line on stderr:

    opd: step 3/200 reward 0.412 loss 0.0213 failures 0 cost $0.0031 step 11.8s ETA 39m
"""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm.auto import tqdm


class Progress:
    """A tqdm bar on a terminal; otherwise one plain line per step on stderr (nohup, CI, schedulers):
    step, reward, loss, feedback failures, teacher cost, step time, ETA. shown=False: nothing
    (ranks >= 1 of a launched job)."""

    def __init__(self, total: int, initial: int, *, bar: bool, shown: bool = True) -> None:
        self.total, self.first, self.shown = total, initial, shown
        bar = bar and shown
        self.bar = tqdm(total=total, initial=initial, desc="opd train") if bar else None
        self.started = time.perf_counter()

    def update(self, step: int, row: dict[str, Any]) -> None:
        if not self.shown:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(reward=row.get("reward/mean"), loss=row.get("loss/total"),
                                 s=round(row["time/step_s"], 2))
            return
        per_step = (time.perf_counter() - self.started) / max(1, step - self.first)
        print(format_progress(step, self.total, row, eta_s=per_step * (self.total - step)), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_progress(step: int, total: int, row: dict[str, Any], *, eta_s: float) -> str:
    """`opd: step 3/10 reward 0.500 loss 0.1234 failures 0 cost $0.0000 step 1.2s ETA 8s` from a metrics
    row (reward/mean, loss/total, teacher/failures, teacher/cost_usd, time/step_s)."""

    def num(value: Any, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    eta = f"{eta_s:.0f}s" if eta_s < 120 else f"{eta_s / 60:.0f}m" if eta_s < 7200 else f"{eta_s / 3600:.1f}h"
    return (
        f"opd: step {step}/{total} reward {num(row.get('reward/mean'), '.3f')} "
        f"loss {num(row.get('loss/total'), '.4f')} "
        f"failures {row.get('teacher/failures', 0)} cost ${row.get('teacher/cost_usd') or 0.0:.4f} "
        f"step {row.get('time/step_s', 0.0):.1f}s ETA {eta}"
    )

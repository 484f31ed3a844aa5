"""How a run stops before its last step, and what it says.

The loop stops (TrainingStopped, after logging the step and before its checkpoint) when
the teacher budget is spent, or after `loop.max_no_signal_steps` steps in a row had no
usable feedback because teacher calls failed; the message names the teachers, the cause
and how to resume. A job scheduler's SIGTERM is raised as KeyboardInterrupt, like Ctrl-C,
so the loop saves on either.

A run that reaches its last step but whose failed steps (teacher failures left no
sample with a learning signal) are more than `loop.max_failed_step_share` of its steps
did not learn (`did_not_learn`): it ends with `TrainingFailed`, saving a checkpoint but
no final/, so an untrained student is never presented as the result.
"""

from __future__ import annotations

import collections
import contextlib
import signal
import threading
from pathlib import Path
from typing import Any

from opd_sdk.constants import DRAIN_TIMEOUT_S
from opd_sdk.errors import TrainingFailed, TrainingStopped


def must_stop(failure_kinds: collections.Counter, *, no_signal_streak: int, max_no_signal_steps: int) -> bool:
    """True when the run must stop: the budget is spent (a "budget" failure this step), the teacher
    refused the credentials (an "auth" failure: no later call can succeed), or `no_signal_streak`
    steps without signal reached max_no_signal_steps."""
    return bool(failure_kinds.get("budget") or failure_kinds.get("auth")) or no_signal_streak >= max_no_signal_steps


def training_stopped(failure_kinds: collections.Counter, *, no_signal_streak: int, step: int, max_steps: int,
                     teachers: str, cost_usd: float, output_dir: Path | None) -> TrainingStopped:
    """The error that stops the run at `step` (after `must_stop`), with how to resume it."""
    where = f" in {output_dir}" if output_dir is not None else ""
    # at the last step a plain resume has nothing left to train
    more = f" --set steps=N (N > {step}: this was the last step)" if step >= max_steps else ""
    if failure_kinds.get("budget"):
        return TrainingStopped(
            f"the teacher budget is spent (teacher {teachers}, ${cost_usd:.4f}) at step {step}; raise "
            f"collector.budget_usd, then resume from the checkpoint{where}"
            + (f" (`opd train CONFIG --resume{more}`)" if more else "")
        )
    if failure_kinds.get("auth"):
        return TrainingStopped(
            f"the teacher refused the credentials (HTTP 401/403; teacher {teachers}) at step {step}: check the "
            "API key (OPENAI_API_KEY, or the teacher's api_key / api_key_env) and that it may use this model "
            f"and base_url, then resume from the checkpoint{where} (`opd train CONFIG --resume{more}`)"
        )
    kinds = ", ".join(f"{kind} x{n}" for kind, n in failure_kinds.most_common())
    return TrainingStopped(
        f"{no_signal_streak} steps in a row had no usable teacher feedback (teacher {teachers}; "
        f"last step's failures: {kinds}); stopped at step {step}; fix the cause, then resume from the "
        f"checkpoint{where} (`opd train CONFIG --resume{more}`)"
    )


def did_not_learn(failure_kinds: collections.Counter, *, failed_steps: int, steps: int, max_share: float,
                  teachers: str, output_dir: Path | None) -> TrainingFailed | None:
    """The error that ends a run of `steps` steps of which `failed_steps` failed (more than
    `max_share` of them), or None when the run learned. failure_kinds: every failed call of
    the run by kind (FeedbackFailure.error_type)."""
    if steps == 0 or failed_steps <= max_share * steps:
        return None
    kinds = ", ".join(f"{kind} x{n}" for kind, n in failure_kinds.most_common()) or "none"
    where = f"{output_dir}/step-{steps}/" if output_dir is not None else "the trainer"
    return TrainingFailed(
        f"the run did not learn: {failed_steps} of {steps} steps had no usable teacher feedback (more than "
        f"max_failed_step_share {max_share:g}; teacher {teachers}; failures: {kinds}); the student is not saved "
        f"as final/ ({where} holds it); fix the teacher's cause, then start again with `opd train CONFIG "
        "--overwrite` (answers already paid for come from the feedback cache)"
    )


def in_flight_notice(collectors: list[Any]) -> str | None:
    """What a stopping run says while it waits for teacher answers already sent (Ctrl-C, SIGTERM),
    or None when none is in flight. Those answers are paid for: they go into the feedback cache
    (a resume does not pay for them again) unless a second Ctrl-C drops them."""
    busy = [(c, n) for c in collectors if (n := int(getattr(c, "in_flight", 0)))]
    if not busy:
        return None
    pending = sum(n for _, n in busy)
    wait_s = max(min(float(getattr(c, "timeout", DRAIN_TIMEOUT_S)), DRAIN_TIMEOUT_S) for c, _ in busy)
    return (f"opd: stopping; {pending} teacher answer(s) in flight are being kept (up to {wait_s:.0f} s), so "
            "that a resume does not pay for them again; press Ctrl-C again to drop them")


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (a job scheduler's stop) raises KeyboardInterrupt in the main thread, like Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

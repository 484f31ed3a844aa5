"""Where each step's batch and its feedback come from: sampled now, or in flight ahead of the update.

With `max_staleness: 0` (the default) a step samples its batch with the current
weights and then asks its feedback, both on the training thread. With
`max_staleness: k` (k >= 1) the trainer keeps up to 1 + k batches in
flight. Before each update it tops the queue up, sampling with the current
weights and submitting each batch's feedback requests at once (a background
thread per batch; the collector's own event loop does the calls). It then
trains on the oldest batch, whose feedback has been on its way for up to k
steps. A step never trains on samples older than k updates (`staleness`,
logged per step), and stale samples are corrected by truncated importance
weights against the log-probs stored when they were sampled
(`losses.policy_gradient`). Per step this approaches max(sample + update,
teacher latency) instead of their sum.

Feedback is overlapped when at least one teacher is remote (a `FeedbackCollector`);
the batch's local teachers (a verifier, a frozen copy of the student) are then asked
on the same worker thread. With local teachers only, nothing waits on the network:
each batch is graded on the training thread when it is trained. A teacher that follows the student's weights
(self-distillation in live or EMA mode) is refused with max_staleness >= 1
(`opd_sdk.train.collect.check_collectors`): it is never asked ahead of the step.

Batches in flight are part of a checkpoint (`state` / `load_state`, plain
JSON): a resumed run re-asks their feedback, which the collector's cache
answers without paying again; `drain` waits for answers in flight so that a
stopping run keeps what it paid for.
"""

from __future__ import annotations

import collections
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable

from opd_sdk.errors import ConfigError
from opd_sdk.rollout.batch import RolloutBatch


@dataclass
class InFlight:
    batch: RolloutBatch
    sampled_at: int  # optimizer steps done when it was sampled
    feedback: Future | None  # None: asked when trained (local teachers, or max_staleness 0)


class Pipeline:
    """The queue of batches in flight: `top_up` samples, `pop` hands the oldest to the step.

    sample(): the next RolloutBatch with the current weights. collect(batch): its feedback
    (blocking; run in a worker thread when `overlap`). overlap: submit feedback at sampling
    time, ahead of the step (max_staleness >= 1 only).
    """

    def __init__(self, max_staleness: int, sample: Callable[[], RolloutBatch],
                 collect: Callable[[RolloutBatch], list[Any]], *, overlap: bool) -> None:
        if overlap and max_staleness < 1:
            raise ConfigError(f"overlapping feedback needs rollout.max_staleness >= 1, got {max_staleness}")
        self.max_staleness = max_staleness
        self.sample = sample
        self.collect = collect
        self.overlap = overlap
        self.queue: collections.deque[InFlight] = collections.deque()
        self.pool = ThreadPoolExecutor(max_staleness + 1, thread_name_prefix="opd-feedback") if overlap else None

    def _submit(self, batch: RolloutBatch) -> Future | None:
        return self.pool.submit(self.collect, batch) if self.pool is not None else None

    def top_up(self, step: int, steps_left: int) -> None:
        """Sample (with the current weights) until 1 + k batches are in flight, never past the last
        step (but always the batch of the step about to run)."""
        while len(self.queue) < min(1 + self.max_staleness, max(1, steps_left)):
            batch = self.sample()
            self.queue.append(InFlight(batch, step, self._submit(batch)))

    def pop(self, step: int) -> tuple[RolloutBatch, int, Callable[[], list[Any]]]:
        """The oldest batch, its staleness in updates, and a function that returns its feedback
        (waiting for the answer in flight, or asking it now on the calling thread)."""
        item = self.queue.popleft()
        staleness = step - item.sampled_at
        assert staleness <= self.max_staleness, (staleness, self.max_staleness)
        future = item.feedback
        return item.batch, staleness, future.result if future is not None else lambda: self.collect(item.batch)

    def drain(self) -> None:
        """Wait for every answer in flight (they land in the collector's cache)."""
        wait([item.feedback for item in self.queue if item.feedback is not None])

    def state(self) -> list[dict]:
        return [{"sampled_at": item.sampled_at, "batch": item.batch.to_json()} for item in self.queue]

    def load_state(self, state: list[dict], device: Any = "cpu") -> None:
        """Restore the batches in flight and ask their feedback again (a cached answer is not paid twice)."""
        self.queue.clear()
        for entry in state:
            batch = RolloutBatch.from_json(entry["batch"], device)
            self.queue.append(InFlight(batch, int(entry["sampled_at"]), self._submit(batch)))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)

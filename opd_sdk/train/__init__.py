"""Train: the student loop, sample -> collect -> loss -> step.

Owns the `Trainer` (the loop, top to bottom), the micro-batch engine (one forward per
micro-batch, the exact big-batch gradient), the overlap pipeline (`max_staleness`), the
rank-0 collection of a batch's feedback, checkpoints that resume exactly (and survive damage), the
lock a run holds on its output_dir (`run_lock`), when a run stops early,
metrics, the student's optimizer and schedule, progress lines, greedy evaluation, and what a
Trainer refuses before it builds anything (`checks`).
May import: every layer below it; never `app/`.
"""

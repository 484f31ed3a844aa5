"""summary.json and learning_curve.png: how a run ended, written at its end (finished or stopped)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from opd_sdk.config.run import RunConfig
from opd_sdk.train.metrics import plot_learning_curve, read_metrics


def write_summary(cfg: RunConfig, trainer: Any, result: dict | None, *, stopped: str | None = None,
                  outcome: str = "finished") -> dict:
    """summary.json and learning_curve.png in output_dir, from metrics.jsonl (all runs of a resumed
    training; rows written with the old flat metric names read the same, `read_metrics`).

    outcome: "finished" (every step, final/ saved and evaluated), "stopped" (TrainingStopped:
    budget spent, or max_no_signal_steps in a row without signal) or "did_not_learn"
    (TrainingFailed: more than max_failed_step_share of the steps failed); with either of the
    last two, `stopped` holds the message, and model_dir and heldout_after are null.
    failed_steps: steps whose teacher failures left no learning signal (no weight moved)."""
    out = Path(cfg.output_dir)
    metric = cfg.eval.metric
    rows = read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
    evals = {r["step"]: r[f"eval/{metric}"] for r in rows if r.get(f"eval/{metric}") is not None}
    if result is not None and result["value"] is not None:
        evals[trainer.step] = result["value"]
    train_rows = [r for r in rows if r["step"] > 0]
    summary = {
        "steps": trainer.step,
        "final_reward_mean": train_rows[-1].get("reward/mean") if train_rows else None,
        "heldout_metric": metric,
        "heldout_before": evals.get(0),
        "heldout_after": result["value"] if result else None,
        "heldout_" + metric: result["value"] if result else None,
        "heldout_graded": result["graded"] if result else None,
        "teacher_requests": trainer.usage_total("requests_sent"),
        "cache_hits": trainer.usage_total("cache_hits"),
        # HTTP calls apart from requests: paid (carried usage), answered (used), failed (README, "How cost is counted")
        **{f"teacher_{k}": trainer.usage_total(k) for k in ("http_calls", "calls_paid", "calls_answered",
                                                             "calls_failed", "prompt_tokens", "completion_tokens")},
        "teacher_cost_usd": trainer.teacher_cost_usd(),
        "model_dir": str(out / "final") if result else None,
        "outcome": outcome,
        "failed_steps": getattr(trainer, "failed_steps", None),
        "stopped": stopped,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if importlib.util.find_spec("matplotlib") is not None:
        title = f"opd train: {Path(cfg.student.model).name}, {cfg.objective.type}"
        plot_learning_curve(train_rows, sorted(evals.items()), out / "learning_curve.png", title=title, metric=metric)
    return summary

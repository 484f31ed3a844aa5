"""Per-step training metrics: a JSONL file always, TensorBoard or W&B when installed.

One JSON object a line: {"step": N, "reward/mean": ..., ...}. Values are
plain floats (or None when a metric does not apply, e.g. no Score feedback).
Names are `namespace/name`, the namespace saying which stage of the loop
measured it (README "Metrics" lists them all): `rollout/`, `teacher/`,
`reward/`, `forward/`, `loss/`, `objective/` (what the objective reports;
`objective/<term>/` for a Hybrid term), `optim/`, `time/`, `eval/`. Each
metric is computed in one place; `merge_rows` refuses a name reported twice. The
loop's row is `step_row` (its time/ metrics from a `StepTimer`).

Runs written before the names were namespaced (`reward_mean`, `loss`,
`time_step_s`, ...) stay readable: `read_metrics` and `plot_learning_curve`
read a row through `current_names`, which maps the old names to the new.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

from opd_sdk.rollout.batch import RolloutBatch
from opd_sdk.train.collect import score_stats
from opd_sdk.types import Feedback


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else value
    return value


class MetricsLogger:
    """Writes each step's metrics to `path` (JSONL) and to optional sinks.

    tensorboard: True / False / "auto" (on when the `tensorboard` package
    is installed and `tb_dir` is given). wandb_project: when set and `wandb`
    is installed, logs there too (wandb reads its own API key; we never see it).
    """

    def __init__(
        self,
        path: str | Path | None,
        *,
        tb_dir: str | Path | None = None,
        tensorboard: bool | str = "auto",
        wandb_project: str | None = None,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.history: list[dict[str, Any]] = []
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tb = None
        has_tb = importlib.util.find_spec("tensorboard") is not None
        if tb_dir is not None and (tensorboard is True or (tensorboard == "auto" and has_tb)):
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(tb_dir))
        self._wandb = None
        if wandb_project and importlib.util.find_spec("wandb") is not None:
            import wandb

            self._wandb = wandb.init(project=wandb_project, config=run_config or {})

    @classmethod
    def for_run(cls, output_dir: Path | None, is_main: bool, *, tensorboard: bool | str,
                wandb_project: str | None) -> "MetricsLogger":
        """A run's logger: output_dir/metrics.jsonl and output_dir/tb/ (TensorBoard), written by rank 0
        alone (`is_main`); the other ranks keep their rows in memory only."""
        writes = output_dir is not None and is_main
        return cls(output_dir / "metrics.jsonl" if writes else None, tb_dir=output_dir / "tb" if writes else None,
                   tensorboard=tensorboard if is_main else False, wandb_project=wandb_project if is_main else None)

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.history.append(row)
        if self.path is not None:  # opened per row: no handle outlives a step, a crash loses at most this row
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        numeric = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)
        return row

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after `step` (a resumed run repeats them); the rows kept are rewritten
        with current names (`read_metrics`), so a resumed old run's file has one set of names."""
        self.history = [r for r in self.history if r["step"] <= step]
        if self.path is None or not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        tmp.replace(self.path)  # atomic: a crash here never leaves half a file

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


NAMESPACES = ("rollout", "teacher", "reward", "forward", "loss", "objective", "optim", "time", "eval")

# the flat names of runs written before the namespaces, and their names now
OLD_NAMES = {
    "reward_mean": "reward/mean",
    "reward_std": "reward/std",
    "feedback_failures": "teacher/failures",
    "teacher_requests": "teacher/requests",
    "cache_hits": "teacher/cache_hits",
    "teacher_cost_usd": "teacher/cost_usd",
    "staleness": "rollout/staleness",
    "completion_tokens": "rollout/completion_tokens",
    "mean_completion_len": "rollout/completion_len_mean",
    "policy_passes": "forward/policy_passes",
    "logprob_abs_diff": "forward/logprob_abs_diff",
    "max_importance_ratio": "forward/max_importance_ratio",
    "loss": "loss/total",
    "signal": "optim/signal",
    "skipped_step": "optim/skipped",
    "grad_norm": "optim/grad_norm",
    "lr": "optim/lr",
    "tokens_per_s": "time/tokens_per_s",
    "sample_tokens_per_s": "time/sample_tokens_per_s",
    "time_sampling_s": "time/sample_s",
    "time_feedback_s": "time/feedback_s",
    "time_forward_backward_s": "time/forward_backward_s",
    "time_optimizer_s": "time/optimizer_s",
    "time_sync_s": "time/sync_s",
    "time_step_s": "time/step_s",
}


def current_name(name: str) -> str:
    """A metric's name now: an old flat name mapped (`reward_mean` -> `reward/mean`,
    `failures/timeout` -> `teacher/failures/timeout`, an objective's `tokens` -> `objective/tokens`,
    a Hybrid term's `rewardweighted/tokens` -> `objective/rewardweighted/tokens`); a current one as is."""
    if name in OLD_NAMES:
        return OLD_NAMES[name]
    if name == "step" or name.split("/", 1)[0] in NAMESPACES:
        return name
    if name.startswith("failures/"):
        return "teacher/" + name
    return "objective/" + name


def current_names(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics row with every name as `current_name` gives it (a row of an old run, or a new one unchanged)."""
    return {current_name(k): v for k, v in row.items()}


def merge_rows(*parts: dict[str, Any]) -> dict[str, Any]:
    """One step's row from the metrics of the stages that computed them (the loss, the loop).

    Each metric is computed in one place: raises RuntimeError when two parts
    report the same name (two definitions of one metric, the later silently winning).
    """
    row: dict[str, Any] = {}
    for part in parts:
        twice = sorted(row.keys() & part.keys())
        if twice:
            raise RuntimeError(f"metrics {twice} are computed in two places; compute each in one and log it once")
        row.update(part)
    return row


class StepTimer:
    """Wall-clock seconds of a step's stages: each `lap(stage)` ends the stage begun at the previous
    lap (or at the start); `total()` is the seconds since the start."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.laps[stage], self.last = now - self.last, now

    def total(self) -> float:
        return self.last - self.start


def step_row(loss_metrics: dict[str, Any], feedback: Sequence[Feedback], failures: collections.Counter,
             batch: RolloutBatch, timer: StepTimer, *, teacher: dict[str, Any], staleness: int, skipped: bool,
             grad_norm: float | None, lr: float) -> dict[str, Any]:
    """One step's row: the loss's metrics (loss/, objective/, forward/, optim/signal) and the loop's.

    feedback: every Feedback of the step (one per prompt and source); failures: their
    `FeedbackFailure.error_type` counts; teacher: {requests, cache_hits, cost_usd} so far;
    timer: laps "sample", "feedback", "forward_backward", "optimizer", "sync" (seconds).
    Raises RuntimeError when the loss reports a name the loop also reports (`merge_rows`).
    """
    reward_mean, reward_std = score_stats(feedback)
    tokens, laps, total = batch.completion_tokens(), timer.laps, timer.total()
    return merge_rows(loss_metrics, {
        "reward/mean": reward_mean,
        "reward/std": reward_std,
        "teacher/failures": sum(failures.values()),
        **{f"teacher/failures/{kind}": n for kind, n in sorted(failures.items())},
        **{f"teacher/{name}": value for name, value in teacher.items()},
        "rollout/staleness": staleness,
        "rollout/completion_tokens": tokens,
        "rollout/completion_len_mean": tokens / batch.size,
        "optim/skipped": int(skipped),
        "optim/grad_norm": grad_norm,
        "optim/lr": lr,
        "time/tokens_per_s": tokens / total,
        "time/sample_tokens_per_s": tokens / max(laps["sample"], 1e-9),
        **{f"time/{stage}_s": seconds for stage, seconds in laps.items()},
        "time/step_s": total,
    })


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics JSONL file, with current names (`current_names`: a run written
    with the old flat names reads like a new one). A last line cut short by a killed
    process is dropped; a broken line before it raises json.JSONDecodeError."""
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(current_names(json.loads(line)))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise
    return rows


def reward_curve(history: list[dict[str, Any]]) -> tuple[list[int], list[float]]:
    """(steps, rewards): `reward/mean` (an old run's `reward_mean`) of the rows that have one."""
    rows = [r for r in map(current_names, history) if r.get("reward/mean") is not None]
    return [r["step"] for r in rows], [r["reward/mean"] for r in rows]


def plot_learning_curve(
    history: list[dict[str, Any]], evals: list[tuple[int, float]], path: str | Path, *, title: str, metric: str
) -> Path:
    """One PNG: training reward (`reward/mean`, or an old run's `reward_mean`) per step, with a
    3-step mean, and the held-out metric at the steps in `evals` (step 0 = before training).
    Needs matplotlib (`pip install 'opd-sdk[demo]'`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    steps, rewards = reward_curve(history)
    if rewards:
        ax.plot(steps, rewards, color="tab:blue", alpha=0.35, label="train reward (sampled)")
    if len(rewards) >= 3:
        smooth = [sum(rewards[max(0, i - 2) : i + 1]) / len(rewards[max(0, i - 2) : i + 1]) for i in range(len(rewards))]
        ax.plot(steps, smooth, color="tab:blue", label="train reward, 3-step mean")
    ax.plot([s for s, _ in evals], [a for _, a in evals], "o-", color="tab:red", label=f"held-out {metric}")
    ax.set_xlabel("optimizer step")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)

"""What `opd inspect` writes: the terminal table, `inspect.md`, and the PNG plots.

    table(reports)              one row per measure, one column per teacher (plain text)
    markdown(reports, ...)      the same table in Markdown, failures quoted, log-prob details, thresholds
    write_report(reports, out)  inspect.md, score_histogram.png, latency.png, swap_agreement.png
                                (the last only when a teacher is a pairwise or listwise judge)

Plots need matplotlib (a dependency of the package); they are skipped with a
note when it does not import.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from opd_sdk.app.inspect_measure import TeacherReport, Thresholds


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def _num(x: float | None, fmt: str = ".3g") -> str:
    return "n/a" if x is None else format(x, fmt)


def _ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 1000:.0f} ms"


def _duration(s: float | None) -> str:
    if s is None:
        return "n/a"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def rows(r: TeacherReport) -> list[tuple[str, str]]:
    """(measure, value) pairs of one teacher, in table order."""
    failures = ", ".join(f"{k} x{n}" for k, n in r.failures.items()) or "none"
    out = [
        ("teacher", f"{r.where}: {r.type} ({r.kind})"),
        ("usable answers", f"{_pct(r.usable_rate)} ({r.usable}/{r.samples} samples)"),
        ("failures", failures),
        ("repeat: rank agreement", _pct(r.repeat_agreement)),  # a reference teacher: share of identical texts
        ("repeat: max / mean |diff|", f"{_num(r.repeat_max_diff)} / {_num(r.repeat_mean_diff)}"),
    ]
    lp = r.logprob if r.kind == "token_logprobs" else {}
    out += [  # every teacher has every row ("n/a" where it does not apply), so teachers line up in one table
        ("flat groups (no gradient)", _pct(r.flat_share)),
        ("log-prob signal: mean |teacher - student|", "n/a" if r.logprob_signal is None
         else f"{r.logprob_signal:.3g} nats/token"),
        ("token alignment", ", ".join(f"{k} x{n}" for k, n in lp.get("alignment", {}).items()) or "n/a"),
        ("echo / prompt log-probs + top-k", f"{lp.get('echo', 'n/a')} / {lp.get('prompt_logprobs_top_k', 'n/a')}"),
        ("temperature of the log-probs", str(lp.get("temperature", "n/a"))),
    ]
    out += [
        ("swap agreement (position bias)", _pct(r.swap_agreement)),
        ("verifier AUC / Spearman", f"{_num(r.verifier_auc, '.2f')} / {_num(r.verifier_spearman, '.2f')}"
         + (f" ({r.verifier_classes[0]} correct, {r.verifier_classes[1]} wrong)" if r.verifier_classes else "")),
        ("latency p50 / p95", f"{_ms(r.latency(50))} / {_ms(r.latency(95))}"
         + (f" at concurrency {r.concurrency}" if r.concurrency else "")),
        ("tokens / 1k samples", _num(r.tokens_per_1k, ",.0f")),
        ("cost / 1k samples", "n/a" if r.cost_per_1k_usd is None else f"${r.cost_per_1k_usd:.4f}"),
        (f"whole run ({r.run_samples:,} samples): cost", "n/a" if r.run_cost_usd is None else f"${r.run_cost_usd:.2f}"),
        ("whole run: teacher wall time", _duration(r.run_teacher_s)),
        ("verdict", "usable" if not r.problems else "UNUSABLE: " + "; ".join(r.problems)),
    ]
    return out


def table(reports: list[TeacherReport], width: int = 48) -> str:
    """Plain-text table: measures down, teachers across (long cells are cut at `width`)."""
    grid = [rows(r) for r in reports]
    names = [name for name, _ in grid[0]] if grid else []
    cut = lambda s: s if len(s) <= width else s[: width - 3] + "..."
    cells = [[cut(dict(g)[name]) for g in grid] for name in names]
    w0 = max((len(n) for n in names), default=0)
    ws = [max(len(c[i]) for c in cells) for i in range(len(reports))]
    return "\n".join(f"{n:<{w0}}  " + "  ".join(f"{c:<{w}}" for c, w in zip(row, ws, strict=True))
                     for n, row in zip(names, cells, strict=True))


def markdown(reports: list[TeacherReport], cfg: Any, thresholds: Thresholds, plots: list[str]) -> str:
    grid = [rows(r) for r in reports]
    names = [name for name, _ in grid[0]]
    esc = lambda s: s.replace("|", "\\|")
    ro = cfg.rollout
    setting = (f"Student `{cfg.student.model}`, {reports[0].samples // ro.group_size} prompts x {ro.group_size} "
               f"samples (temperature {ro.temperature}, max_new_tokens {ro.max_new_tokens}); the run: "
               f"{cfg.steps} steps x {ro.prompts_per_step} prompts x {ro.group_size} samples.")
    lines = [
        "# opd inspect: teacher report", "", setting, "",
        "| measure | " + " | ".join(f"`{r.where}`" for r in reports) + " |",
        "|---|" + "---|" * len(reports),
    ]
    lines += [f"| {esc(name)} | " + " | ".join(esc(dict(g)[name]) for g in grid) + " |" for name in names]
    quotes = [(r.where, r.failure_quote) for r in reports if r.failure_quote]
    if quotes:
        lines += ["", "## A failed answer per teacher", ""]
        lines += [f"- `{w}`: " + q[:400].replace("\n", " ") for w, q in quotes]
    lines += ["", "## Thresholds (`opd inspect --threshold NAME=VALUE`)", ""]
    lines += [f"- {k}: {v}" for k, v in asdict(thresholds).items()]
    lines += ["", "Teacher ids: " + ", ".join(f"`{r.where}` {r.teacher_id}" for r in reports)]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def plot_scores(reports: list[TeacherReport], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for r in reports:
        if r.values:
            ax.hist(r.values, bins=20, alpha=0.5, label=f"{r.where} ({r.type})")
    ax.set_xlabel("per-sample value (score; win rate; mean log-prob per token)")
    ax.set_ylabel("samples")
    ax.set_title("opd inspect: teacher values on the student's samples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_latency(reports: list[TeacherReport], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for r in reports:
        xs = sorted(s * 1000 for s in r.latencies_s)
        if xs:
            ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post",
                    label=f"{r.where}: p50 {r.latency(50) * 1000:.0f} ms, p95 {r.latency(95) * 1000:.0f} ms")
    ax.set_xlabel(f"latency of one teacher call (ms), concurrency {reports[0].concurrency}")
    ax.set_ylabel("share of calls")
    ax.set_title("opd inspect: teacher latency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_swap(reports: list[TeacherReport], thresholds: Thresholds, path: Path) -> Path:
    import matplotlib.pyplot as plt

    judged = [r for r in reports if r.swap_agreement is not None]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.bar([f"{r.where}\n{r.type}" for r in judged], [r.swap_agreement for r in judged], color="tab:blue")
    ax.axhline(thresholds.min_swap_agreement, color="tab:red", linestyle="--", label="min_swap_agreement")
    ax.set_ylim(0, 1)
    ax.set_ylabel("agreement when the order is swapped")
    ax.set_title("opd inspect: position bias")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(reports: list[TeacherReport], out: Path, cfg: Any, *, thresholds: Thresholds | None = None,
                 log: Callable[[str], None] = print) -> Path:
    """Print the table; write inspect.md and the plots into `out`. Returns inspect.md's path."""
    thresholds = thresholds or Thresholds()
    out.mkdir(parents=True, exist_ok=True)
    plots: list[str] = []
    if importlib.util.find_spec("matplotlib") is not None:
        import matplotlib

        matplotlib.use("Agg")
        plots.append(plot_scores(reports, out / "score_histogram.png").name)
        if any(r.latencies_s for r in reports):
            plots.append(plot_latency(reports, out / "latency.png").name)
        if any(r.swap_agreement is not None for r in reports):
            plots.append(plot_swap(reports, thresholds, out / "swap_agreement.png").name)
    else:
        log("opd: matplotlib does not import: no plots")
    path = out / "inspect.md"
    path.write_text(markdown(reports, cfg, thresholds, plots), encoding="utf-8")
    log(table(reports))
    log(f"opd: report in {path}")
    return path

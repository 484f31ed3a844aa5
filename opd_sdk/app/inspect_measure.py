"""What `opd inspect` measures of one teacher, from its answers: pure functions of Feedback values.

`measure(report, first, again, g, ...)` fills a `TeacherReport` from pass 1
and pass 2 (and pass 3, the verifier's scores and the student's log-probs
where there are some); `judge_problems(report, Thresholds())` says why a
teacher is unusable. The statistics are `opd_sdk.app.inspect_stats`'s; what
each measure means is in `opd_sdk.app.inspect`'s docstring.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Any

from opd_sdk.app.inspect_stats import (
    abs_diffs,
    auc,
    finite,
    flat_share,
    order_agreement,
    percentile,
    spearman,
    swap_agreement,
    win_rates,
)
from opd_sdk.errors import ConfigError
from opd_sdk.types import (
    Feedback,
    FeedbackFailure,
    Preference,
    Reference,
    Score,
    TokenLogprobs,
)

MIN_PER_CLASS = 5  # the verifier-agreement check needs this many correct and wrong samples


@dataclass
class Thresholds:
    """When a teacher is unusable (`opd inspect --threshold NAME=VALUE` changes one).

    min_usable: share of samples with a usable answer.
    min_repeat_agreement: rank agreement of the same requests asked twice (1.0 = same ranking;
        unrelated random scores give about 1/3).
    min_swap_agreement: pairwise / listwise judges: agreement when the order is swapped.
    max_flat_share: share of groups whose values are all equal (no gradient).
    max_logprob_noise: log-prob teachers: largest repeat difference / mean |teacher - student|
        log-prob per token (the signal); checked only above logprob_noise_floor nats.
    logprob_noise_floor: repeat differences up to this (nats) count as float rounding.
    min_verifier_auc: AUC against the verifier, checked with >= MIN_PER_CLASS correct and wrong samples.
    """

    min_usable: float = 0.9
    min_repeat_agreement: float = 0.8
    min_swap_agreement: float = 0.8
    max_flat_share: float = 0.5
    max_logprob_noise: float = 0.1
    logprob_noise_floor: float = 1e-4
    min_verifier_auc: float = 0.5

    @classmethod
    def parse(cls, items: list[str]) -> Thresholds:
        """From `NAME=VALUE` strings; a ConfigError names an unknown name or a bad value."""
        names = [f.name for f in fields(cls)]
        given: dict[str, float] = {}
        for item in items:
            name, _, value = item.partition("=")
            if name not in names:
                raise ConfigError(f"--threshold {item!r}: unknown name; use one of {', '.join(names)}")
            try:
                given[name] = float(value)
            except ValueError:
                raise ConfigError(f"--threshold {item!r}: the value must be a number, e.g. {name}=0.8") from None
        return cls(**given)


@dataclass
class TeacherReport:
    """What `opd inspect` measured of one teacher; None where a measure does not apply or had no data."""

    where: str
    type: str
    kind: str
    teacher_id: str
    samples: int = 0
    usable: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    failure_quote: str | None = None
    repeat_agreement: float | None = None
    repeat_max_diff: float | None = None
    repeat_mean_diff: float | None = None
    logprob_signal: float | None = None
    swap_agreement: float | None = None
    verifier_auc: float | None = None
    verifier_spearman: float | None = None
    verifier_classes: tuple[int, int] | None = None  # (correct, wrong) samples
    flat_share: float | None = None
    values: list[float] = field(default_factory=list)
    swap_pairs: list[tuple[float, float]] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    concurrency: int | None = None
    tokens_per_1k: float | None = None
    cost_per_1k_usd: float | None = None
    run_samples: int = 0
    run_cost_usd: float | None = None
    run_teacher_s: float | None = None  # teacher wall time of the whole run
    logprob: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def usable_rate(self) -> float | None:
        return self.usable / self.samples if self.samples else None

    def latency(self, q: float) -> float | None:
        return percentile(self.latencies_s, q)


# ----------------------------------------------------------------- per-sample readings


def sample_values(fb: Feedback, g: int) -> list[float]:
    """The per-completion value the report ranks: a score, a preference win rate, a mean log-prob per
    token; NaN where there is none (a failure, a reference teacher)."""
    if isinstance(fb, Score):
        return [float(s) if finite(s) else math.nan for s in fb.scores]
    if isinstance(fb, Preference):
        return win_rates(g, [(p.winner, p.loser, p.probability) for p in fb.pairs])
    if isinstance(fb, TokenLogprobs):
        return [sum(row) / len(row) if row and all(map(finite, row)) else math.nan for row in fb.logprobs]
    return [math.nan] * g


def sample_usable(fb: Feedback, g: int) -> list[bool]:
    """Per completion: whether the teacher's answer for it can be used."""
    if isinstance(fb, FeedbackFailure):
        return [False] * g
    if isinstance(fb, Score):
        return [finite(s) for s in fb.scores]
    if isinstance(fb, TokenLogprobs):
        return [bool(row) and all(map(finite, row)) for row in fb.logprobs]
    return [True] * g  # a Preference or Reference answers the whole group


def failure_kinds(fb: Feedback, g: int) -> Counter:
    """Failure kind -> how many samples it hit."""
    if isinstance(fb, FeedbackFailure):
        return Counter({fb.error_type: g})
    kinds: Counter = Counter()
    if isinstance(fb, Score):
        failed = fb.details.get("failed") or {}
        kinds.update(v.get("error_type", "error") for v in failed.values())
        kinds["missing_score"] += sum(not finite(s) for s in fb.scores) - len(failed)
    elif isinstance(fb, TokenLogprobs):
        kinds["missing_logprob"] += sum(not (row and all(map(finite, row))) for row in fb.logprobs)
    return +kinds


def failure_quote(fb: Feedback) -> str | None:
    if isinstance(fb, FeedbackFailure):
        return f"{fb.error_type}: {fb.reason}"
    if isinstance(fb, Score) and fb.details.get("failed"):
        v = next(iter(fb.details["failed"].values()))
        return f"{v.get('error_type', 'error')}: {v.get('reason', '')}"
    return None


# ----------------------------------------------------------------- measuring


def measure(report: TeacherReport, first: list[Feedback], again: list[Feedback], g: int, *,
            swapped: list[Feedback] | None = None, labels: list[list[float]] | None = None,
            student_logprobs: list[list[list[float]]] | None = None, flat_tol: float = 1e-6) -> TeacherReport:
    """Fill `report` from the answers: `first` (pass 1) and `again` (pass 2) aligned with the
    requests (g completions each); `swapped`: pass 3 mapped back to the original order; `labels`:
    the verifier's score per sample (groups); `student_logprobs`: per request, per completion, the
    student's sampler log-prob per token."""
    values = [sample_values(fb, g) for fb in first]
    values_again = [sample_values(fb, g) for fb in again]
    report.samples = g * len(first)
    report.usable = sum(sum(sample_usable(fb, g)) for fb in first)
    kinds: Counter = Counter()
    for fb in first:
        kinds += failure_kinds(fb, g)
        report.failure_quote = report.failure_quote or failure_quote(fb)
    report.failures = dict(kinds.most_common())
    report.values = [v for row in values for v in row if finite(v)]
    report.flat_share = flat_share(values, flat_tol)
    report.repeat_agreement = order_agreement(values, values_again, flat_tol)
    diffs = [d for a, b in zip(values, values_again, strict=True) for d in abs_diffs(a, b)]
    if report.kind == "reference":  # teacher text: repeatability is the share of identical references
        same = [a.completions == b.completions for a, b in zip(first, again, strict=True)
                if isinstance(a, Reference) and isinstance(b, Reference)]
        report.repeat_agreement = sum(same) / len(same) if same else None
    if report.kind == "token_logprobs":  # the signal is per token, never flat: no flat share
        report.flat_share = None
        _measure_logprobs(report, first, again, student_logprobs)
    elif diffs:
        report.repeat_max_diff, report.repeat_mean_diff = max(diffs), sum(diffs) / len(diffs)
    verdicts = [(v["i_first"], v["j_first"]) for fb in first if isinstance(fb, Preference)
                for v in fb.details.get("verdicts", [])]
    if verdicts:
        report.swap_agreement = swap_agreement(verdicts)
    elif swapped is not None:
        values_swapped = [sample_values(fb, g) for fb in swapped]
        report.swap_agreement = order_agreement(values, values_swapped, flat_tol)
        report.swap_pairs = [(a, b) for ra, rb in zip(values, values_swapped, strict=True)
                             for a, b in zip(ra, rb, strict=True) if finite(a) and finite(b)]
    if labels is not None:
        flat_values = [v for row in values for v in row]
        flat_labels = [v for row in labels for v in row]
        correct = [finite(v) and v >= 0.5 for v in flat_labels]
        report.verifier_auc = auc(flat_values, correct)
        report.verifier_spearman = spearman(flat_values, flat_labels)
        present = [c for v, c in zip(flat_values, correct, strict=True) if finite(v)]
        report.verifier_classes = (sum(present), len(present) - sum(present))
    return report


def _measure_logprobs(report: TeacherReport, first: list[Feedback], again: list[Feedback],
                      student: list[list[list[float]]] | None) -> None:
    token_diffs, signal = [], []
    for i, (a, b) in enumerate(zip(first, again, strict=True)):
        if not (isinstance(a, TokenLogprobs) and isinstance(b, TokenLogprobs)):
            continue
        for c, (ra, rb) in enumerate(zip(a.logprobs, b.logprobs, strict=True)):
            if len(ra) == len(rb):
                token_diffs += abs_diffs(ra, rb)
            if student is not None and len(student[i][c]) == len(ra):
                signal += abs_diffs(ra, student[i][c])
        alignments = Counter(pc.get("alignment", "?") for pc in a.details.get("per_completion", []))
        report.logprob.setdefault("alignment", Counter()).update(alignments)
    if token_diffs:
        report.repeat_max_diff, report.repeat_mean_diff = max(token_diffs), sum(token_diffs) / len(token_diffs)
    report.logprob_signal = sum(signal) / len(signal) if signal else None
    report.logprob["alignment"] = dict(report.logprob.get("alignment", {}))


def judge_problems(report: TeacherReport, t: Thresholds) -> list[str]:
    """Why the teacher is unusable under thresholds `t` ([] when it passes)."""
    out = []
    rate = report.usable_rate
    if rate is not None and rate < t.min_usable:
        kinds = ", ".join(f"{k} x{n}" for k, n in report.failures.items()) or "none recorded"
        out.append(f"usable answers {rate:.0%} < min_usable {t.min_usable:.0%} (failures: {kinds})")
    if report.kind == "token_logprobs":
        noise, signal = report.repeat_max_diff, report.logprob_signal
        if noise is not None and noise > t.logprob_noise_floor and (not signal or noise > t.max_logprob_noise * signal):
            out.append(f"non-deterministic log-probs: the same text scored twice differs by up to {noise:.3g} "
                       f"nats, against a signal of {signal or 0:.3g} nats/token (max_logprob_noise "
                       f"{t.max_logprob_noise:g} x signal)")
    elif report.kind != "reference":
        if report.repeat_agreement is not None and report.repeat_agreement < t.min_repeat_agreement:
            out.append(f"noisy: asked twice, the rankings agree on {report.repeat_agreement:.0%} of pairs "
                       f"< min_repeat_agreement {t.min_repeat_agreement:.0%}")
        if report.flat_share is not None and report.flat_share > t.max_flat_share:
            out.append(f"flat: {report.flat_share:.0%} of groups have all-equal scores (no gradient) "
                       f"> max_flat_share {t.max_flat_share:.0%}")
    if report.swap_agreement is not None and report.swap_agreement < t.min_swap_agreement:
        out.append(f"position-biased: the verdict changes with the order; agreement when swapped "
                   f"{report.swap_agreement:.0%} < min_swap_agreement {t.min_swap_agreement:.0%}")
    classes = report.verifier_classes or (0, 0)
    if (report.verifier_auc is not None and min(classes) >= MIN_PER_CLASS
            and report.verifier_auc < t.min_verifier_auc):
        out.append(f"does not track the verifier: AUC {report.verifier_auc:.3f} < min_verifier_auc "
                   f"{t.min_verifier_auc:g} ({classes[0]} correct, {classes[1]} wrong samples)")
    return out

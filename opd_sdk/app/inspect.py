"""`opd inspect CONFIG`: know your teacher before you pay for it (the teacher report).

On N prompts of the run's data (default 32; dealt by the run's own
`PromptSampler`) the student samples G completions each, with the run's
rollout engine and settings, as training would. Each configured teacher is
asked about them through the run's collector (its cache, limits and budget):

    pass 1   the requests, through the run's cache (answers paid here are not paid again in training)
    pass 2   the same requests again, cache bypassed: repeatability, latency, tokens
    pass 3   listwise judges only: each group in reversed order (position bias)

and the answers are measured (`measure`):

- usable answers: share of samples with a usable answer (a finite score; for
  a preference / reference teacher, its request answered; for a log-prob
  teacher, every token's log-prob), failure kinds with counts, one failure quoted;
- repeatability: rank agreement of passes 1 and 2 inside each group
  (`inspect_stats.order_agreement`), largest and mean score difference; for
  log-prob teachers the largest difference between two answers for the same
  token, against the signal the objective uses: the mean |teacher - student|
  log-prob per token (the student's at its sampling temperature);
- position bias: pairwise judges answer both orders already (agreement of the
  two verdicts, `swap_agreement`); listwise judges are asked pass 3 and its
  ranking is compared with pass 1's;
- agreement with the verifier, where the prompts have reference answers:
  AUC of the teacher's per-sample value for the verifier's "correct", and
  Spearman's rho with the verifier's score (exact implementations in
  `opd_sdk.app.inspect_stats`). A teacher's per-sample value: its score; a
  preference teacher's win rate in the group; a log-prob teacher's mean
  log-prob per token;
- learning signal: the share of groups whose values are all equal (within the
  run's flat_group_tolerance: no gradient), and a histogram of the values;
- log-prob teachers: token alignment with the student (exact, mapped by
  character offsets, refused), support for echo / prompt log-probs / top-k
  (one `self_test` probe asking for top-k), and the temperature of the numbers;
- latency p50 / p95 of one teacher call at the configured concurrency;
  tokens and cost per 1,000 samples (pass 2, never cached); the projected
  cost and teacher wall time of the whole run (steps x prompts_per_step x G).

Before any teacher call the projected cost of the inspection is printed and
the user asked (`yes=True` skips the question; without a terminal it is
required). A teacher is unusable when a check crosses a `Thresholds` value;
`run_inspect` returns the reports, each with its `problems`, and the CLI exits
1 naming them. Output: a terminal table, `inspect.md` and PNG plots in the
output folder (`opd_sdk.app.inspect_report`).
"""

from __future__ import annotations

import math
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

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
from opd_sdk.app.runner import build_collector, find_verifier, load_student
from opd_sdk.config.data import load_data
from opd_sdk.config.registry import BuildContext, Checked, build_teacher
from opd_sdk.config.run import RunConfig
from opd_sdk.config.teachers import VerifierTeacherConfig
from opd_sdk.data import PromptItem, PromptSampler
from opd_sdk.errors import ConfigError, TeacherError
from opd_sdk.feedback.factory import make_collector
from opd_sdk.feedback.ratelimit import estimate_tokens
from opd_sdk.feedback.requests import build_requests
from opd_sdk.feedback.teacher import api_calls, is_local, tokenizer_fingerprint
from opd_sdk.rollout.build import build_rollout_engine
from opd_sdk.types import (
    Feedback,
    FeedbackFailure,
    FeedbackRequest,
    Preference,
    Reference,
    Score,
    TokenLogprobs,
)
from providers.judge import JudgeTeacher
from providers.logprob import LogprobTeacher

DEFAULT_PROMPTS = 32
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


class _Timed:
    """A teacher whose `feedback` calls are timed (wall seconds, in `seconds`); it offers the
    collector the same optional capabilities (`opd_sdk.feedback.teacher`) as the teacher."""

    CAPABILITIES = ("pointwise", "api_calls", "cache_key", "cacheable", "aclose", "children")

    def __init__(self, teacher: Any) -> None:
        self.teacher, self.id, self.seconds = teacher, teacher.id, []
        for name in self.CAPABILITIES:
            if hasattr(teacher, name):
                setattr(self, name, getattr(teacher, name))

    async def feedback(self, request: FeedbackRequest) -> Feedback:
        start = time.perf_counter()
        try:
            return await self.teacher.feedback(request)
        finally:
            self.seconds.append(time.perf_counter() - start)


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


# ----------------------------------------------------------------- the run


def sample_requests(cfg: RunConfig, items: list[PromptItem], n: int, model: Any, tokenizer: Any
                    ) -> tuple[list[FeedbackRequest], list[list[list[float]]]]:
    """The first n prompts the run's sampler deals, G samples each from the run's rollout engine:
    (requests, per request and completion the student's sampler log-prob per token)."""
    settings = cfg.rollout
    sampler = PromptSampler(items, settings.prompts_per_step, seed=cfg.seed, shuffle=cfg.shuffle)
    engine = build_rollout_engine(settings, model, tokenizer, seed=cfg.seed)
    tok_id = tokenizer_fingerprint(tokenizer)
    requests: list[FeedbackRequest] = []
    student: list[list[list[float]]] = []
    try:
        while len(requests) < n:
            prompts = sampler.next_batch()[: n - len(requests)]
            batch = engine.sample(prompts, settings.group_size)
            requests += build_requests(batch, tok_id)
            rows = [batch.sampler_logprobs_BT[r][batch.completion_mask_BT[r] > 0].tolist() for r in range(batch.size)]
            student += [rows[p * batch.group_size:(p + 1) * batch.group_size] for p in range(batch.num_prompts)]
    finally:
        engine.close()
    return requests, student


def projected_inspection(teacher: Any, requests: list[FeedbackRequest], cfg: RunConfig) -> tuple[int, int, float]:
    """(calls, prompt tokens, USD) the inspection's uncached passes would cost at most: prompt text /
    4 chars per token, and max_tokens completion tokens a call (1 for log-prob echo calls)."""
    passes = 3 if isinstance(teacher, JudgeTeacher) and teacher.mode == "listwise" else 2
    calls = passes * sum(api_calls(teacher, r) for r in requests)
    prompt_tokens = passes * sum(estimate_tokens(r, api_calls(teacher, r)) for r in requests)
    completion_tokens = calls * int(getattr(teacher, "max_tokens", 1))
    c = cfg.collector
    cost = (prompt_tokens * c.price_per_1k_prompt_tokens + completion_tokens * c.price_per_1k_completion_tokens) / 1000
    return calls, prompt_tokens, cost


def _confirm(lines: list[str], yes: bool, ask: Callable[[str], str], log: Callable[[str], None]) -> bool:
    for line in lines:
        log(line)
    if yes:
        return True
    if ask is input and not sys.stdin.isatty():
        raise ConfigError("opd inspect asks before calling paid teachers and no terminal is attached; "
                          "pass --yes to accept the projected cost above")
    return ask("opd: call the teachers? [y/N] ").strip().lower() in ("y", "yes")


def _probe_logprob_support(probe: LogprobTeacher, report: TeacherReport) -> None:
    """Echo works when any answer came; prompt log-probs with top-k: one `self_test` of `probe` (the
    teacher asking for top-k), whose `Unsupported` names what the server lacks."""
    import asyncio

    report.logprob["echo"] = "yes" if report.usable > 0 else "no answer came"
    try:
        asyncio.run(probe.self_test())
        report.logprob["prompt_logprobs_top_k"] = "yes"
    except TeacherError as exc:
        report.logprob["prompt_logprobs_top_k"] = f"no ({exc.error_type}: {str(exc)[:160]})"
    report.logprob["temperature"] = "1.0 (echo / prompt log-probs are the model's own distribution)"


def inspect_teacher(cfg: RunConfig, where: str, tcfg: Any, teacher: Any, requests: list[FeedbackRequest],
                    student: list[list[list[float]]], labels: list[list[float]] | None,
                    thresholds: Thresholds, ctx: BuildContext) -> TeacherReport:
    """Passes 1-3 for one teacher through the run's collector settings, measured."""
    g = cfg.rollout.group_size
    report = TeacherReport(where=where, type=tcfg.type, kind=tcfg.feedback, teacher_id=teacher.id)
    local = is_local(teacher)
    timed = teacher if local else _Timed(teacher)
    first_col = build_collector(cfg, timed)
    try:
        first = first_col.collect_sync(requests)
        swapped = None
        if isinstance(teacher, JudgeTeacher) and teacher.mode == "listwise":
            back = first_col.collect_sync([r.with_completions(r.completions[::-1]) for r in requests])
            swapped = [fb.model_copy(update={"scores": fb.scores[::-1]}) if isinstance(fb, Score) else fb for fb in back]
    finally:
        first_col.close()
    spent = first_col.usage.cost_usd
    c = cfg.collector
    budget = None if c.budget_usd is None else max(c.budget_usd - spent, 1e-9)
    again_cfg = cfg.model_copy(update={"collector": c.model_copy(update={"no_cache": True, "budget_usd": budget})})
    again_col = build_collector(again_cfg, timed)
    try:
        start = time.perf_counter()
        again = again_col.collect_sync(requests)
        wall = time.perf_counter() - start
    finally:
        again_col.close()
    measure(report, first, again, g, swapped=swapped, labels=labels, student_logprobs=student,
            flat_tol=cfg.flat_group_tolerance)
    n = report.samples
    report.run_samples = cfg.steps * cfg.rollout.prompts_per_step * g
    if not local:
        usage = again_col.usage
        report.latencies_s = list(timed.seconds)
        report.concurrency = c.max_concurrency
        report.tokens_per_1k = (usage.prompt_tokens + usage.completion_tokens) / n * 1000
        report.cost_per_1k_usd = usage.cost_usd / n * 1000
        report.run_cost_usd = usage.cost_usd / n * report.run_samples
        seconds = wall / n * report.run_samples
        if c.rpm:  # the RPM limit may bound it harder than the measured throughput
            seconds = max(seconds, usage.requests_sent / n * report.run_samples / c.rpm * 60)
        report.run_teacher_s = seconds
    if isinstance(teacher, LogprobTeacher):
        k = max(teacher.top_k, 1)
        probe_cfg = tcfg.model_copy(update={"top_k": k, "params": {**tcfg.params, "top_k": k}})
        _probe_logprob_support(build_teacher(probe_cfg, ctx, where), report)
    report.problems = judge_problems(report, thresholds)
    return report


def verifier_labels(cfg: RunConfig, requests: list[FeedbackRequest]) -> list[list[float]] | None:
    """The verifier's score of every sample (the config's verifier, else the numeric one), when every
    prompt has a reference answer; else None."""
    if not requests or any("answer" not in r.metadata for r in requests):
        return None
    vcfg = next((v for t in cfg.teacher_list() if (v := find_verifier(t)) is not None), None)
    collector = make_collector(build_teacher(vcfg or VerifierTeacherConfig(type="verifier")), progress=False)
    try:
        return [sample_values(fb, len(r.completions)) for fb, r in zip(collector.collect_sync(requests), requests)]
    finally:
        collector.close()


def run_inspect(cfg: RunConfig, checked: Checked | None = None, *, prompts: int = DEFAULT_PROMPTS,
                out_dir: str | Path | None = None, yes: bool = False, thresholds: Thresholds | None = None,
                log: Callable[[str], None] = print, ask: Callable[[str], str] = input) -> list[TeacherReport] | None:
    """The teacher report of a run config (see the module docstring). Returns one TeacherReport per
    teacher (`problems` empty when usable), or None when the user declined (nothing was sent).
    Writes inspect.md and PNG plots to out_dir (default OUTPUT_DIR/inspect)."""
    from opd_sdk.app.inspect_report import write_report

    if not cfg.teacher_list():
        raise ConfigError("opd inspect reports on a run's teachers, and this config has none (teacher: or teachers:)")
    if prompts < 1:
        raise ConfigError(f"--prompts must be >= 1, got {prompts}")
    thresholds = thresholds or Thresholds()
    items = (checked.data if checked is not None and checked.data else load_data(cfg.data, seed=cfg.seed))[0]
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_student(cfg.student)
    n = min(prompts, len(items))
    log(f"opd: inspect: {n} prompts x {cfg.rollout.group_size} samples from {cfg.student.model}")
    requests, student = sample_requests(cfg, items, n, model, tokenizer)
    ctx = BuildContext(model=model, tokenizer=tokenizer, timeout=cfg.collector.timeout)
    where = ["teacher"] if cfg.teachers is None else [f"teachers.{i}" for i in range(len(cfg.teacher_list()))]
    teachers = [(w, t, build_teacher(t, ctx, w)) for w, t in zip(where, cfg.teacher_list(), strict=True)]
    remote = [(w, t) for w, _, t in teachers if not is_local(t)]
    if remote:
        lines, total = [], 0.0
        for w, t in remote:
            calls, tokens, cost = projected_inspection(t, requests, cfg)
            total += cost
            lines.append(f"opd: inspect {w} ({t.id}): at most {calls} calls, ~{tokens} prompt tokens, ~${cost:.4f}")
        priced = cfg.collector.price_per_1k_prompt_tokens or cfg.collector.price_per_1k_completion_tokens
        lines.append(f"opd: projected cost of this inspection: ~${total:.4f}" if priced else
                     "opd: no prices set (collector.price_per_1k_*): cost counted as $0")
        if not _confirm(lines, yes, ask, log):
            return None
    labels = verifier_labels(cfg, requests)
    reports = [inspect_teacher(cfg, w, tc, t, requests, student, labels, thresholds, ctx) for w, tc, t in teachers]
    out = Path(out_dir) if out_dir is not None else Path(cfg.output_dir) / "inspect"
    write_report(reports, out, cfg, thresholds=thresholds, log=log)
    return reports

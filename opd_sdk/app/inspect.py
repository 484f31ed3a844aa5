"""`opd inspect CONFIG`: know your teacher before you pay for it (the teacher report).

On N prompts of the run's data (default 32; dealt by the run's own
`PromptSampler`) the student samples G completions each, with the run's
rollout engine and settings, as training would. Each configured teacher is
asked about them through the run's collector (its cache, limits and budget):

    pass 1   the requests, through the run's cache (answers paid here are not paid again in training)
    pass 2   the same requests again, cache bypassed: repeatability, latency, tokens
    pass 3   listwise judges only: each group in reversed order (position bias)

and the answers are measured (`opd_sdk.app.inspect_measure.measure`):

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

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from opd_sdk.app.inspect_measure import (
    TeacherReport,
    Thresholds,
    judge_problems,
    measure,
    sample_values,
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
from opd_sdk.types import Feedback, FeedbackRequest, Score
from providers.judge import JudgeTeacher
from providers.logprob import LogprobTeacher

DEFAULT_PROMPTS = 32
__all__ = ["DEFAULT_PROMPTS", "TeacherReport", "Thresholds", "run_inspect"]


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
    """(calls, prompt tokens, USD) of the inspection's passes if none is cached and nothing is retried or
    re-asked: prompt text / 4 chars per token, max_tokens completion tokens a call (1 for echo calls)."""
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
            lines.append(f"opd: inspect {w} ({t.id}): {calls} calls (plus retries and re-asks), ~{tokens} prompt "
                         f"tokens, ~${cost:.4f}")
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

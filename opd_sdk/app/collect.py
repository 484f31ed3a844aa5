"""`opd collect CONFIG [--batch]`: ask a run's teacher(s) about its prompts ahead of time.

For offline uses: teacher references for SFT, SPIN and GAD; scoring an eval set; labelling a
dataset. One request per prompt of the run's data (`--split train | eval | all`), built as
training builds it (the prompt, its privileged context, its metadata with the reference
`answer`); the completion is the prompt's reference answer, which a grading teacher (judge,
preference, reward model, verifier) grades and a reference teacher does not read (its cache key
is the prompt alone, so a later `opd train` with the same teacher takes its references from the
cache, paying nothing). A grading teacher needs an answer on every prompt.

Every answer goes into the run's feedback cache (collector.cache) and into
OUTPUT_DIR/collected.jsonl, one line per prompt and teacher: {"teacher", "index", "prompt",
"answer", "feedback"} (a failure is a `FeedbackFailure` value, never a score). With `--batch`
the calls go through the OpenAI Batch API at the batch price (`opd_sdk.feedback.batch`):
killed while a batch is pending, the same command resumes that batch.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from opd_sdk.app.runner import build_collector
from opd_sdk.config.data import load_data
from opd_sdk.config.registry import BuildContext, build_teacher, feedback_kind
from opd_sdk.config.run import RunConfig
from opd_sdk.data import PromptItem
from opd_sdk.errors import ConfigError
from opd_sdk.feedback.teacher import is_local
from opd_sdk.types import Completion, FeedbackFailure, FeedbackRequest

SPLITS = ("train", "eval", "all")


class _Say(logging.Handler):
    """Log records at INFO and above, passed to `log` as "opd: <message>"."""

    def __init__(self, log: Callable[[str], None]) -> None:
        super().__init__(logging.INFO)
        self.say = log

    def emit(self, record: logging.LogRecord) -> None:
        self.say(f"opd: {record.getMessage()}")


def collect_requests(items: list[PromptItem], grading: bool) -> list[FeedbackRequest]:
    """One request per prompt: the reference answer as its completion (for a grading teacher) or
    as a placeholder a reference teacher never reads. ConfigError when a grading teacher meets a
    prompt without an answer."""
    missing = [i for i, it in enumerate(items) if it.answer is None]
    if grading and missing:
        raise ConfigError(f"opd collect: {len(missing)} prompt(s) have no reference answer (first: #{missing[0]}) "
                          "for the teacher to grade; give every prompt an `answer` (data.answer_field), or "
                          "collect references with a `type: reference` teacher")
    requests = []
    for it in items:
        metadata = dict(it.metadata) | ({"answer": it.answer} if it.answer is not None else {})
        requests.append(FeedbackRequest(prompt=it.prompt, completions=[Completion(text=it.answer or "")],
                                        privileged=it.privileged, metadata=metadata))
    return requests


def collect(cfg: RunConfig, *, batch: bool = False, split: str = "train",
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Collect every teacher's feedback on the split's prompts; returns the summary it prints."""
    if split not in SPLITS:
        raise ConfigError(f"--split: one of {', '.join(SPLITS)}, got {split!r}")
    teachers = cfg.teacher_list()
    if not teachers:
        raise ConfigError("opd collect: the config has no `teacher:` to ask")
    train, held = load_data(cfg.data, seed=cfg.seed)
    items = {"train": train, "eval": held, "all": train + held}[split]
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"prompts": len(items), "mode": "batch" if batch else "online", "teachers": []}
    rows = []
    for t_cfg in teachers:
        requests = collect_requests(items, grading=feedback_kind(t_cfg.type) != "reference")
        teacher = build_teacher(t_cfg, BuildContext(timeout=cfg.collector.timeout))
        if batch and is_local(teacher):
            raise ConfigError(f"opd collect --batch: teacher {t_cfg.type} runs in this process, not behind an "
                              "API; collect it without --batch")
        collector = build_collector(cfg, teacher, batch=batch)
        said, batch_log = _Say(log), logging.getLogger("opd_sdk.feedback.batch")
        level = batch_log.level
        batch_log.addHandler(said)  # batches created, their status as polled: hours may pass, say what happens
        batch_log.setLevel(logging.INFO)
        try:
            log(f"opd: collecting {t_cfg.type} feedback ({teacher.id}) on {len(requests)} {split} prompts"
                + (" through the Batch API" if batch else ""))
            feedback = collector.collect_sync(requests)
        finally:
            collector.close()
            batch_log.removeHandler(said)
            batch_log.setLevel(level)
        failures = Counter(fb.error_type for fb in feedback if isinstance(fb, FeedbackFailure))
        usage = collector.usage
        summary["teachers"].append({
            "teacher": teacher.id, "answered": len(feedback) - sum(failures.values()), "failures": dict(failures),
            "cache_hits": usage.cache_hits, "requests_sent": usage.requests_sent,
            "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "cost_usd": round(usage.cost_usd, 6),
        })
        rows += [{"teacher": teacher.id, "index": i, "prompt": it.model_dump(mode="json")["prompt"],
                  "answer": it.answer, "feedback": fb.model_dump(mode="json")}
                 for i, (it, fb) in enumerate(zip(items, feedback, strict=True))]
    path = out / "collected.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    summary |= {"cache": str(cfg.cache_path()), "collected": str(path)}
    return summary

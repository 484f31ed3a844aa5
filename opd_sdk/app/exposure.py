"""`opd eval CONFIG --model M --exposure`: an exposure-bias meter for a student.

Exposure bias (Bengio et al. 2015; Ranzato et al. 2016): a model trained only
on reference text never sees its own mistakes, so once its own answer drifts
it keeps drifting. On-policy distillation exists to fix that (Agarwal et al.
2024, GKD). This meter makes it visible on held-out prompts:

1. The teacher's per-token log-loss, -log p_T(y_t | x, y_<t), against the
   position t in the answer (tokens from 0), for (a) the student's own samples
   (at the config's rollout temperature, `samples` a prompt) and (b) text the
   student did not write: the teacher's own answers when the teacher is an
   endpoint (a `reference` call on the same model and URL, at the same
   temperature), else the dataset's reference solutions. A student that
   drifts shows (a) rising with t above (b).
2. The student's final-answer accuracy against how far into its answer its
   first wrong step falls: `opd_sdk.tasks.first_wrong_step`, the first line
   that differs from the reference solution (the last step is the "Answer: N"
   line; "none": every line right).

Any teacher that returns log-probs of given text works: `type: logprob` (an
endpoint with echo log-probs: vLLM, llama.cpp) or `self_distill` (the student
itself, shown the reference: local). Writes exposure.json and exposure.png
(matplotlib, when installed) to OUTPUT_DIR/exposure/<model>/ and returns the
result; `format_table` is the terminal summary.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from opd_sdk.config.data import load_data
from opd_sdk.config.registry import BuildContext, build_teacher, check_config
from opd_sdk.config.run import RunConfig
from opd_sdk.config.teachers import TEACHERS
from opd_sdk.data import PromptItem
from opd_sdk.errors import ConfigError
from opd_sdk.feedback.requests import build_requests
from opd_sdk.feedback.teacher import tokenizer_fingerprint
from opd_sdk.rollout.engine import TransformersRollout
from opd_sdk.tasks import check, first_wrong_step
from opd_sdk.types import Completion, FeedbackRequest, Reference, TokenLogprobs

POSITION_BIN = 8  # tokens per row of the terminal table


def _solution(item: PromptItem) -> str | None:
    return item.metadata.get("solution") or item.privileged


def per_position(logprobs: list[list[float]]) -> list[dict]:
    """[{"pos", "mean_nll", "n"}] over answer positions: the mean of -logprob over the rows that reach
    position pos (missing values, NaN, skipped)."""
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    for row in logprobs:
        for t, v in enumerate(row):
            if math.isfinite(v):
                sums[t] = sums.get(t, 0.0) - v
                counts[t] = counts.get(t, 0) + 1
    return [{"pos": t, "mean_nll": sums[t] / counts[t], "n": counts[t]} for t in sorted(counts)]


def by_first_wrong_step(texts: list[str], items: list[PromptItem]) -> list[dict]:
    """[{"step", "n", "accuracy"}]: samples grouped by their first wrong step (an int from 0, or "none"),
    with the final-answer accuracy of each group. Needs each item's reference solution."""
    groups: dict[Any, list[bool]] = {}
    for text, item in zip(texts, items, strict=True):
        solution = _solution(item)
        if solution is None or item.answer is None:
            raise ConfigError("--exposure needs a reference solution and answer for every held-out prompt "
                              "(a built-in task has them; a JSONL needs `privileged` and `answer`)")
        step = first_wrong_step(text, solution)
        groups.setdefault("none" if step is None else step, []).append(check(text, item.answer))
    order = sorted(k for k in groups if k != "none") + (["none"] if "none" in groups else [])
    return [{"step": k, "n": len(groups[k]), "accuracy": sum(groups[k]) / len(groups[k])} for k in order]


def _logprobs_of(feedback: list, what: str) -> list[list[float]]:
    rows = []
    for fb in feedback:
        if not isinstance(fb, TokenLogprobs):
            raise ConfigError(f"the teacher gave no log-probs for {what} ({getattr(fb, 'reason', fb)}); "
                              "--exposure needs a teacher that returns log-probs of given text")
        rows.extend(fb.logprobs)
    return rows


def measure(model, tokenizer, items: list[PromptItem], collector, *, reference_texts: list[str],
            samples: int = 4, temperature: float = 1.0, max_new_tokens: int = 64, seed: int = 0) -> dict:
    """The meter's numbers (see the module docstring) from a student, its held-out prompts, a collector
    whose teacher returns `TokenLogprobs`, and one text per prompt the student did not write."""
    if len(reference_texts) != len(items):
        raise ConfigError(f"{len(reference_texts)} reference texts for {len(items)} prompts; give one per prompt")
    torch.manual_seed(seed)
    model.eval()
    engine = TransformersRollout(model, tokenizer, temperature=temperature, max_new_tokens=max_new_tokens)
    batch = engine.sample(items, samples)
    own = _logprobs_of(collector.collect_sync(build_requests(batch, tokenizer_fingerprint(tokenizer))),
                       "the student's samples")
    ref_requests = [FeedbackRequest(prompt=it.prompt, completions=[Completion(text=t)], privileged=it.privileged,
                                    metadata=dict(it.metadata)) for it, t in zip(items, reference_texts, strict=True)]
    ref = _logprobs_of(collector.collect_sync(ref_requests), "the reference text")
    texts = [c.text for c in batch.completions]
    sampled_items = [items[b // samples] for b in range(len(texts))]
    return {
        "prompts": len(items), "samples_per_prompt": samples, "temperature": temperature,
        "student_accuracy": sum(check(t, it.answer or "") for t, it in zip(texts, sampled_items)) / len(texts),
        "student_nll_by_position": per_position(own),
        "reference_nll_by_position": per_position(ref),
        "student_mean_nll": _mean([-v for row in own for v in row if math.isfinite(v)]),
        "reference_mean_nll": _mean([-v for row in ref for v in row if math.isfinite(v)]),
        "first_wrong_step": by_first_wrong_step(texts, sampled_items),
        "examples": texts[:3],
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def format_table(result: dict) -> str:
    """The terminal summary: log-loss by position bin, then accuracy by first wrong step."""
    def binned(rows: list[dict]) -> dict[int, float]:
        out: dict[int, list[tuple[float, int]]] = {}
        for r in rows:
            out.setdefault(r["pos"] // POSITION_BIN, []).append((r["mean_nll"] * r["n"], r["n"]))
        return {b: sum(s for s, _ in v) / sum(n for _, n in v) for b, v in out.items()}

    own, ref = binned(result["student_nll_by_position"]), binned(result["reference_nll_by_position"])
    lines = [f"teacher log-loss (nats/token) by answer position; reference text: {result['reference_source']}",
             "| positions | student's samples | reference text |", "|---|---|---|"]
    for b in sorted(set(own) | set(ref)):
        cells = [f"{d[b]:.3f}" if b in d else "-" for d in (own, ref)]
        lines.append(f"| {b * POSITION_BIN}-{(b + 1) * POSITION_BIN - 1} | {cells[0]} | {cells[1]} |")
    accuracy = (f"student accuracy {result['student_accuracy']:.3f} by first wrong step (line of the answer, "
                "from 0; 'none': all right)")
    lines += ["", accuracy, "| first wrong step | samples | accuracy |", "|---|---|---|"]
    lines += [f"| {g['step']} | {g['n']} | {g['accuracy']:.3f} |" for g in result["first_wrong_step"]]
    return "\n".join(lines)


def plot(result: dict, path: Path, title: str) -> Path | None:
    """exposure.png: log-loss by position (left), accuracy and share of samples by first wrong step (right)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("student_nll_by_position", "student's own samples"),
                       ("reference_nll_by_position", f"reference text ({result['reference_source']})")):
        rows = result[key]
        left.plot([r["pos"] for r in rows], [r["mean_nll"] for r in rows], marker=".", label=label)
    left.set_xlabel("token position in the answer")
    left.set_ylabel("teacher log-loss (nats/token)")
    left.legend()
    groups = result["first_wrong_step"]
    names = [str(g["step"]) for g in groups]
    total = sum(g["n"] for g in groups)
    right.bar(names, [g["n"] / total for g in groups], color="#bbbbbb", label="share of samples")
    right.plot(names, [g["accuracy"] for g in groups], "o-", color="C3", label="final-answer accuracy")
    right.set_xlabel("first wrong step (line of the answer; none = all right)")
    right.set_ylim(0, 1.05)
    right.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _logprob_teacher(cfg: RunConfig) -> Any:
    for t in cfg.teacher_list():
        if TEACHERS[t.type].feedback == "token_logprobs":
            return t
    kinds = ", ".join(t.type for t in cfg.teacher_list()) or "none"
    raise ConfigError(f"--exposure needs a teacher that returns log-probs of given text (`type: logprob`, an "
                      f"endpoint with echo log-probs, or `self_distill`); this config's teachers: {kinds}")


def reference_texts(cfg: RunConfig, teacher_cfg: Any, items: list[PromptItem], ctx: BuildContext) -> tuple[list[str], str]:
    """One text a prompt that the student did not write: the teacher's own answer when the teacher is an
    endpoint, else the dataset's reference solution. Returns (texts, where they came from)."""
    if not TEACHERS[teacher_cfg.type].remote:
        missing = [i for i, it in enumerate(items) if _solution(it) is None]
        if missing:
            raise ConfigError(f"held-out prompt {missing[0]} has no reference solution for --exposure")
        return [_solution(it) for it in items], "dataset reference solutions"
    from opd_sdk.app.runner import build_collector

    spec = {"type": "reference", "model": teacher_cfg.model, "base_url": teacher_cfg.base_url, "n": 1,
            "temperature": cfg.rollout.temperature, "max_tokens": cfg.eval.max_new_tokens}
    if "api_key_env" in teacher_cfg.model_fields_set:  # the same key, required as the config requires it
        spec["api_key_env"] = teacher_cfg.api_key_env
    collector = build_collector(cfg, build_teacher(TEACHERS["reference"].model_validate(spec), ctx))
    try:
        feedback = collector.collect_sync([FeedbackRequest(prompt=it.prompt, completions=[Completion(text="")])
                                           for it in items])
    finally:
        collector.close()
    bad = [fb for fb in feedback if not isinstance(fb, Reference)]
    if bad:
        raise ConfigError(f"the teacher endpoint wrote no answer for {len(bad)} prompts ({bad[0].reason}); "
                          "--exposure needs its text")
    return [fb.completions[0].text for fb in feedback], f"the teacher's samples at T={cfg.rollout.temperature}"


def _slug(model_dir: str | None) -> str:
    return "base" if model_dir is None else re.sub(r"[^A-Za-z0-9_.-]+", "-", str(model_dir)).strip("-")[-80:]


def run_exposure(cfg: RunConfig, model_dir: str | None = None, *, samples: int = 4) -> dict:
    """`opd eval --exposure`: measure, write exposure.json / exposure.png, return the result (with `out_dir`)."""
    from opd_sdk.app.runner import build_collector, load_student

    checked = check_config(cfg)
    teacher_cfg = _logprob_teacher(cfg)
    model, tokenizer = load_student(cfg.student, model_dir)
    _, held = checked.data or load_data(cfg.data, seed=cfg.seed)
    ctx = BuildContext(model=model, tokenizer=tokenizer, timeout=cfg.collector.timeout)
    texts, source = reference_texts(cfg, teacher_cfg, held, ctx)
    collector = build_collector(cfg, build_teacher(teacher_cfg, ctx))
    try:
        result = measure(model, tokenizer, held, collector, reference_texts=texts, samples=samples,
                         temperature=cfg.rollout.temperature, max_new_tokens=cfg.eval.max_new_tokens, seed=cfg.seed)
    finally:
        collector.close()
    result.update(reference_source=source, model=model_dir or cfg.student.model, teacher=teacher_cfg.type)
    out = Path(cfg.output_dir) / "exposure" / _slug(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "exposure.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    png = plot(result, out / "exposure.png", f"exposure: {result['model']}")
    result["out_dir"], result["png"] = str(out), str(png) if png else None
    return result

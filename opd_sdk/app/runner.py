"""From a validated `RunConfig` to a running distillation: load, wire, train, evaluate.

The CLI (`opd train`, `opd eval`) is a thin shell over these functions; a
script can call them too. Order matters: `check_config` (no model) runs
first, so a bad config fails in a second; only then does the student load.
It runs once per run, and the prompts it read are the ones trained on
(`Checked`): nothing is checked or read twice.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from opd_sdk.config.data import load_data
from opd_sdk.config.registry import (
    BuildContext,
    Checked,
    build_objective,
    build_teacher,
    check_config,
    check_prompt_lengths,
)
from opd_sdk.config.run import RunConfig, StudentConfig
from opd_sdk.data import PromptItem
from opd_sdk.errors import ConfigError, TrainingFailed, TrainingStopped
from opd_sdk.feedback.factory import Collector, make_collector
from opd_sdk.models import ensure_pad_token, resolve_model_path
from opd_sdk.parallel.distributed import Distributed
from opd_sdk.train.checkpoint import check_launch, damaged_checkpoints, latest_checkpoint
from opd_sdk.app.summary import write_summary
from opd_sdk.train.metrics import read_metrics
from opd_sdk.train.run_lock import hold_output_dir
from opd_sdk.types import FeedbackFailure, FeedbackRequest, Score

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_student(cfg: StudentConfig, path: str | None = None, device: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) from `path` or the config's model, on `device` (default: the config's).

    A LoRA adapter folder (`final/` of a LoRA run) loads onto the config's
    student.model: saved adapters name their base, never a path of the
    machine that trained them.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = resolve_model_path(cfg.model)
    where = path or base
    if path is not None and not Path(path).is_dir():
        raise ConfigError(f"--model {path}: no such folder; give the output_dir/final folder of a run")
    dtype = _DTYPES[cfg.dtype]
    if path is not None and (Path(path) / "adapter_config.json").exists():
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), path)
    else:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
    model.to(device or (cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"))
    return model, ensure_pad_token(AutoTokenizer.from_pretrained(where))


def build_collector(cfg: RunConfig, teacher: Any, batch: bool = False) -> Collector:
    """`make_collector` with the config's limits and cache (in process for a local teacher; the
    collector keeps no cache for a teacher whose answers change as the student trains).
    batch: through the OpenAI Batch API (`opd collect --batch`; `opd_sdk.feedback.batch`)."""
    c = cfg.collector
    batch_api = {"mode": "batch", "batch_discount": c.batch_discount, "batch_poll_s": c.batch_poll_s} if batch else {}
    return make_collector(
        teacher,
        max_concurrency=c.max_concurrency,
        rpm=c.rpm,
        tpm=c.tpm,
        timeout=c.timeout,
        max_retries=c.max_retries,
        cache=cfg.cache_path(),
        budget_usd=c.budget_usd,
        price_per_1k_prompt_tokens=c.price_per_1k_prompt_tokens,
        price_per_1k_completion_tokens=c.price_per_1k_completion_tokens,
        progress=cfg.logging.progress,
        **batch_api,
    )


def make_trainer(
    cfg: RunConfig, model: Any, tokenizer: Any, objective: Any, collector: Any, prompts: list, eval_fn: Any = None,
    distributed: Distributed | None = None,
) -> Any:
    """The Trainer for a config: its optimizer:, rollout: and loop settings passed as validated (no renames)."""
    from opd_sdk.config.settings import LoopSettings
    from opd_sdk.train.trainer import Trainer

    lora = cfg.student.lora
    return Trainer(
        model,
        tokenizer,
        objective,
        collector,
        prompts,
        optimizer=cfg.optimizer,
        sampling=cfg.rollout,
        loop=LoopSettings.model_validate({name: getattr(cfg, name) for name in LoopSettings.model_fields}),
        precision=cfg.student.precision,
        lora=dict(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules)
        if lora is not None
        else None,
        gradient_checkpointing=cfg.student.gradient_checkpointing,
        output_dir=cfg.output_dir,
        eval_fn=eval_fn if cfg.eval.every else None,
        eval_every=cfg.eval.every or 0,
        tensorboard=cfg.logging.tensorboard,
        wandb_project=cfg.logging.wandb_project,
        progress=cfg.logging.progress,
        distributed=distributed,
    )


def find_verifier(teacher_cfg: Any) -> Any | None:
    """The first verifier config in a teacher tree (for accuracy), or None."""
    if teacher_cfg is None:
        return None
    if teacher_cfg.type == "verifier":
        return teacher_cfg
    for _, child in teacher_cfg.children():
        found = find_verifier(child)
        if found is not None:
            return found
    return None


def evaluate(cfg: RunConfig, model: Any, tokenizer: Any, items: list[PromptItem], collector: Any = None) -> dict:
    """Greedy answers on held-out prompts, graded by a verifier (accuracy) or the teacher (mean score).

    Accuracy uses the config's verifier when it has one, else a numeric
    verifier on PromptItem.answer. `collector` (the run's, so its cache and
    event loop are reused; with several teachers, the first one's) grades for
    metric teacher_score. A failed teacher call is counted apart and never
    scored as 0.
    """
    from opd_sdk.train.evaluate import greedy_accuracy
    from opd_sdk.types import Completion

    if cfg.eval.metric == "none":
        return {"metric": "none", "value": None, "graded": 0, "failures": 0, "completions": []}
    texts = greedy_accuracy(
        model, tokenizer, items, lambda t, p: False, max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size
    ).completions
    if cfg.eval.metric == "accuracy":
        if any(it.answer is None for it in items):
            raise ConfigError("eval.metric accuracy needs an answer for every held-out prompt; use metric: teacher_score")
        from opd_sdk.config.teachers import VerifierTeacherConfig

        verifier = next((v for t in cfg.teacher_list() if (v := find_verifier(t)) is not None), None)
        grader = build_teacher(verifier or VerifierTeacherConfig(type="verifier"))
        collector = make_collector(grader, progress=False)
    elif collector is None:
        raise ConfigError("eval.metric teacher_score needs the run's collector")
    requests = []
    for it, text in zip(items, texts, strict=True):
        meta = dict(it.metadata) | ({"answer": it.answer} if it.answer is not None else {})
        requests.append(FeedbackRequest(prompt=it.prompt, completions=[Completion(text=text)], privileged=it.privileged, metadata=meta))
    if cfg.eval.metric == "accuracy":
        try:
            feedback = collector.collect_sync(requests)
        finally:
            collector.close()
    else:
        feedback = collector.collect_sync(requests)
    scores = [fb.scores[0] for fb in feedback if isinstance(fb, Score)]
    failures = sum(isinstance(fb, FeedbackFailure) for fb in feedback)
    if not scores:
        first = next((fb.reason for fb in feedback if isinstance(fb, FeedbackFailure)), "no score returned")
        raise ConfigError(f"eval: no held-out answer could be graded ({failures} teacher failures; the first: "
                          f"{first}); fix the teacher, or set eval.metric: accuracy (answers needed) or none")
    value = sum(scores) / len(scores)
    if cfg.eval.metric == "accuracy":
        value = sum(s >= 0.5 for s in scores) / len(scores)
    return {"metric": cfg.eval.metric, "value": value, "graded": len(scores), "failures": failures, "completions": texts}


def save_resolved_config(cfg: RunConfig) -> Path:
    """output_dir/config.yaml: the validated config (it holds no secrets: keys live in the environment)."""
    out = Path(cfg.output_dir)
    path = out / "config.yaml"
    try:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    except OSError as exc:
        raise ConfigError(f"output_dir {out}: cannot write there ({exc.strerror or exc}); choose a folder you can "
                          "write (--set output_dir=...)") from None
    return path


# What a run writes into output_dir (the feedback cache is kept by --overwrite: it only saves money).
RUN_FILES = ("metrics.jsonl", "config.yaml", "summary.json", "learning_curve.png", "final", "tb")


def prepare_output_dir(
    output_dir: str | Path, *, resume: bool, overwrite: bool, dist: Distributed | None = None,
    steps: int | None = None,
) -> None:
    """Refuse to mix two runs in one folder: --resume needs a checkpoint there, saved by a job of
    this launch's process count and layout (`dist`, default one process), and steps left to train
    (a run of `steps` that saved final/ is finished); a new run needs a folder that holds no trained
    run unless --overwrite (which deletes the earlier run's files, not its cache). What an attempt
    refused before its first step left (config.yaml, a step-0 metrics row) blocks nothing: it is
    replaced. An output_dir that cannot be written is a ConfigError, not a raw OSError."""
    out = Path(output_dir)
    try:
        _prepare_output_dir(out, resume=resume, overwrite=overwrite, dist=dist, steps=steps)
    except OSError as exc:
        raise ConfigError(
            f"output_dir {out}: cannot write there ({exc.strerror or exc}); choose a folder you can write "
            "(--set output_dir=...)"
        ) from None


def _trained(out: Path) -> bool:
    """True when output_dir holds a run that trained at least one step (a checkpoint, a half-saved
    one, final/, or a metrics row past step 0)."""
    return (latest_checkpoint(out) is not None or any(out.glob("step-*")) or (out / "final").exists()
            or _rows_past_step_zero(out / "metrics.jsonl"))


def _rows_past_step_zero(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        return any(row.get("step", 0) > 0 for row in read_metrics(path))
    except (ValueError, AttributeError):  # unreadable: keep it, as a run's
        return True


def _prepare_output_dir(out: Path, *, resume: bool, overwrite: bool, dist: Distributed | None,
                        steps: int | None) -> None:
    if resume:
        last = latest_checkpoint(out)
        if last is None:
            damaged = "; ".join(damaged_checkpoints(out))
            raise ConfigError(
                f"--resume: nothing to resume from, {out} holds no complete step-N/ checkpoint"
                f"{f' (damaged: {damaged})' if damaged else ''}; "
                + ("start the run again with --overwrite (its feedback cache is kept)" if _trained(out)
                   else "run without --resume to start a new run")
            )
        dist = dist or Distributed()
        done = int(check_launch(last, world_size=dist.world_size, fsdp=dist.fsdp, zero_stage=dist.zero_stage)["step"])
        if steps is not None and done >= steps and (out / "final").exists():
            raise ConfigError(
                f"--resume: the run in {out} is finished ({last.name} of steps: {steps}, final/ saved), nothing is "
                f"left to train; to train further, start a new run from it (--set student.model={out / 'final'} "
                "--set output_dir=...), or raise steps and --resume"
            )
        return
    held = [out / n for n in RUN_FILES if (out / n).exists()] + sorted(out.glob("step-*"))
    if held and not overwrite and _trained(out):
        names = ", ".join(p.name for p in held[:4]) + (", ..." if len(held) > 4 else "")
        raise ConfigError(
            f"output_dir {out} already holds a run ({names}); pass --resume to continue it, "
            "--overwrite to replace it, or choose another output_dir (--set output_dir=...)"
        )
    for p in held:
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def train(
    cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, log=print, checked: Checked | None = None,
    allow_config_change: bool = False,
) -> dict:
    """The whole run: check, load, wire, (resume,) evaluate held-out, train, evaluate, report.

    Leaves in output_dir: config.yaml, metrics.jsonl (step 0: the held-out
    metric before training), step-N/ checkpoints, final/, summary.json and
    learning_curve.png (when matplotlib is installed).

    Under `accelerate launch` / `torchrun` every process runs this; rank 0
    alone prepares output_dir, asks the teacher (for every rank), evaluates,
    logs and writes (`opd_sdk.parallel.distributed`).

    checked: what `check_config(cfg)` returned, when the caller already ran it
    (the CLI); None: it runs here.
    allow_config_change: with resume, accept changes to config.yaml's fields that break the
    resumed run's exactness (group size, objective, teacher, lr, ...; `opd_sdk.config.changes`);
    without it they raise ConfigError naming them. Changes that keep it (steps, limits) are logged.

    How it ended: the summary's `outcome` is "finished"; a run that stopped (budget, no
    signal) or did not learn (`max_failed_step_share`) raises TrainingStopped / TrainingFailed
    after writing summary.json with outcome "stopped" / "did_not_learn" and no final/ model.
    """
    checked = check_config(cfg) if checked is None else checked
    dist = Distributed.from_environment()
    with hold_output_dir(cfg.output_dir, dist):  # one run at a time in output_dir, from before it is prepared
        summary = _train(cfg, dist, checked, resume=resume, overwrite=overwrite, allow_change=allow_config_change,
                         log=log if dist.is_main else lambda *a: None)
    dist.close()  # not after a failure: leaving the group waits on peers that may be gone
    return summary


def _train(cfg: RunConfig, dist: Distributed, checked: Checked, *, resume: bool, overwrite: bool, allow_change: bool,
           log) -> dict:
    if not dist.is_main or cfg.logging.progress is False:  # one stream of bars (loading, saving), or none
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging as transformers_logging

        disable_progress_bars()
        transformers_logging.disable_progress_bar()
    def prepare() -> None:
        prepare_output_dir(
            cfg.output_dir, resume=resume, overwrite=overwrite, dist=dist, steps=cfg.steps
        )
        if resume:
            from opd_sdk.config.changes import check_resume_changes

            note = check_resume_changes(cfg.output_dir, cfg, allow=allow_change)
            if note:
                log(note)
        save_resolved_config(cfg)

    dist.on_main(prepare)  # rank 0 prepares output_dir before any rank reads it; its error stops every rank
    torch.manual_seed(cfg.seed)
    train_items, held, notes = _fitting_prompts(cfg, checked)  # before the weights load
    for note in notes:
        log(note)
    model, tokenizer = load_student(cfg.student, device=dist.device if dist.enabled else None)
    objective = build_objective(cfg.objective, tokenizer)
    def teachers() -> list:  # one collector per teacher, in source order
        ctx = BuildContext(model=model, tokenizer=tokenizer, timeout=cfg.collector.timeout,
                           collector=lambda teacher: build_collector(cfg, teacher))  # GAD's reference teacher
        return [build_collector(cfg, build_teacher(t, ctx)) for t in cfg.teacher_list()]

    # rank 0 asks the teachers for every rank; an error building them stops every rank
    collectors = (dist.on_main(teachers) or []) if objective.feedback_kinds else []
    grader = collectors[0] if collectors else None  # for eval.metric teacher_score
    metric = cfg.eval.metric

    def held_out(student: Any) -> dict:
        result = evaluate(cfg, student, tokenizer, held, grader)
        return {result["metric"]: result["value"]}

    out = Path(cfg.output_dir)
    trainer = None
    try:
        # before the trainer wraps the student (a new LoRA adapter changes no output; FSDP shards it)
        before = held_out(model)[metric] if dist.is_main and not resume else None
        trainer = make_trainer(cfg, model, tokenizer, objective, collectors or None, train_items, held_out, dist)
        if resume:
            log(f"opd: resuming from step {trainer.resume('latest')} ({cfg.output_dir})")
        elif dist.is_main and before is not None:
            trainer.metrics.log(0, {f"eval/{metric}": before})
            log(f"opd: held-out {metric} before training {before:.3f} on {len(held)} prompts")
        processes = f" on {dist.world_size} processes" if dist.enabled else ""
        log(f"opd: training {cfg.student.model} for {cfg.steps} steps on {len(train_items)} prompts{processes} -> {out}")
        try:
            trainer.train()
        except TrainingStopped as exc:
            if dist.is_main:
                outcome = "did_not_learn" if isinstance(exc, TrainingFailed) else "stopped"
                write_summary(cfg, trainer, None, stopped=str(exc), outcome=outcome)
            raise
        if not dist.is_main:
            return {}
        # a sharded student is evaluated whole, as saved (final/), in this process
        student = load_student(cfg.student, str(out / "final"))[0] if dist.fsdp else trainer.model
        result = evaluate(cfg, student, tokenizer, held, grader)
    finally:
        _close(trainer, collectors)
    summary = write_summary(cfg, trainer, result)
    if metric == "none":
        log(f"opd: no held-out evaluation (eval.metric: none); model in {summary['model_dir']}")
    else:
        log(f"opd: held-out {metric} before {_fmt(summary['heldout_before'])} -> after {result['value']:.3f} "
            f"on {result['graded']} prompts; model in {summary['model_dir']}")
    return summary


def _close(trainer: Any, collectors: list) -> None:
    """Free the trainer and the collectors; the collectors wait for answers in flight (into the cache).
    A Ctrl-C meanwhile (the second of a stop) drops those answers, and says so."""
    try:
        if trainer is not None:
            trainer.close()
        for c in collectors:
            c.close()
    except KeyboardInterrupt:
        print("opd: answers in flight dropped; a resume asks for them again", file=sys.stderr, flush=True)
        raise


def _fitting_prompts(cfg: RunConfig, checked: Checked) -> tuple[list, list, list[str]]:
    """(train, held-out, notes): the prompts `check_config` read and measured against the student's
    context; when it could not measure them (the student not on this machine yet, an hf_dataset),
    they are read and measured here, from the student's tokenizer and config.json, before its
    weights load. Raises ConfigError naming each prompt that does not fit (data.too_long: error)."""
    data = checked.data or load_data(cfg.data, seed=cfg.seed)
    if checked.lengths_checked:
        return data[0], data[1], checked.notes
    problems, (train, held), _, notes = check_prompt_lengths(cfg, data, resolve_model_path(cfg.student.model))
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    return train, held, checked.notes + notes


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def run_eval(cfg: RunConfig, model_dir: str | None = None) -> dict:
    """`opd eval`: the held-out metric of a saved student (or the config's untrained student)."""
    if cfg.eval.metric == "none":
        raise ConfigError("opd eval: this config has eval.metric: none; add --set eval.metric=accuracy (every "
                          "held-out prompt needs an answer) or --set eval.metric=teacher_score")
    checked = check_config(cfg)
    model, tokenizer = load_student(cfg.student, model_dir)
    _, held = checked.data or load_data(cfg.data, seed=cfg.seed)
    if cfg.eval.metric != "teacher_score":
        return evaluate(cfg, model, tokenizer, held)
    teacher = build_teacher(cfg.teacher_list()[0], BuildContext(model=model, tokenizer=tokenizer, timeout=cfg.collector.timeout))
    collector = build_collector(cfg, teacher)
    try:
        return evaluate(cfg, model, tokenizer, held, collector)
    finally:
        collector.close()

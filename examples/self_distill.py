"""Privileged-context self-distillation: no external teacher at all.

The teacher is the student itself, shown what the student will not see at
test time: here the task's reference solution (`PromptItem.privileged`).
`SelfDistillTeacher` scores the student's own samples token by token under
that privileged view, locally, in one batched forward pass; `TokenDistill`
pulls the student (without the context) towards it (OPSD / SDFT / SDPO,
see providers/self_distill.py for where we depart). The teacher view and the
student view must tokenise the completion identically; the teacher checks
and refuses otherwise.

--mode frozen: teacher = the student at the start (cacheable);
--mode live:   teacher = the current student (no cache: answers change each step);
--mode ema:    teacher = an exponential moving average of the student.

python examples/self_distill.py --steps 30
"""

from __future__ import annotations

import argparse
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd_sdk import ConfigError, make_collector
from opd_sdk.app.runner import prepare_output_dir
from opd_sdk.models import resolve_model_path
from opd_sdk.objectives import TokenDistill
from opd_sdk.tasks import get_task
from opd_sdk.train.evaluate import greedy_accuracy, last_number_matches
from opd_sdk.train.trainer import Trainer
from providers.self_distill import SelfDistillTeacher


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="smollm2")
    p.add_argument("--task", default="times_table")
    p.add_argument("--mode", choices=["frozen", "live", "ema"], default="frozen")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--n-eval", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--out", default="runs/self_distill")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    path = resolve_model_path(args.student)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    task = get_task(args.task)
    try:  # enumerated tasks: every problem once; generated ones (word_problems): draw n
        train, held = task.items("train"), task.items("heldout")[: args.n_eval]
    except ConfigError:
        train, held = task.items("train", 1000), task.items("heldout", args.n_eval)

    def accuracy() -> float:
        return greedy_accuracy(model, tokenizer, held, last_number_matches, max_new_tokens=args.max_new_tokens).accuracy

    before = accuracy()
    teacher = SelfDistillTeacher(model, tokenizer, mode=args.mode)
    cache = os.path.join(args.out, "self_teacher_cache.sqlite")  # used by a frozen teacher only
    collector = make_collector(teacher, cache=cache, progress=False)
    prepare_output_dir(args.out, resume=False, overwrite=True)  # a rerun replaces the last run; the cache stays
    trainer = Trainer(
        model, tokenizer, TokenDistill(divergence="reverse_kl_pg"), collector, train,
        group_size=args.group_size, prompts_per_step=args.prompts_per_step, max_steps=args.steps,
        lr=args.lr, max_new_tokens=args.max_new_tokens, output_dir=args.out,
    )
    try:
        while trainer.step < args.steps:
            trainer.train_step()  # the trainer tells the teacher about each step (an EMA teacher folds then)
        trainer.save_pretrained(os.path.join(args.out, "final"))
    finally:
        collector.close()
    history = trainer.metrics.history
    after = accuracy()
    print(f"held-out accuracy {before:.3f} -> {after:.3f} on {len(held)} prompts; student in {args.out}/final")
    return {"history": history, "before": before, "after": after}


if __name__ == "__main__":
    main()

"""SPIN from an API teacher's sampled answers (Chen et al. 2024, "Self-Play Fine-Tuning").

`ReferenceTeacher` asks the teacher model for its own answer to each prompt
(cached per prompt, so later epochs cost nothing); `SPIN` treats that answer
as the real side and the student's sample as the generated side, against an
opponent that is the frozen student from the start of the iteration
(refreshed every `--refresh-every` steps). With `--no-teacher` the dataset's
reference answers are the real side instead (self-play, no API at all).

python examples/spin_from_api_teacher.py --base-url http://127.0.0.1:8000/v1 --teacher-model smollm2
"""

from __future__ import annotations

import argparse
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd_sdk import make_collector
from opd_sdk.app.runner import prepare_output_dir
from opd_sdk.models import resolve_model_path
from opd_sdk.objectives import SPIN
from opd_sdk.tasks import get_task
from opd_sdk.train.trainer import Trainer
from providers.reference import ReferenceTeacher


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default=None)
    p.add_argument("--teacher-model", default="gpt-4o-mini")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY")
    p.add_argument("--no-teacher", action="store_true", help="use the dataset's reference answers (self-play)")
    p.add_argument("--student", default="smollm2")
    p.add_argument("--task", default="word_problems")
    p.add_argument("--n-prompts", type=int, default=200)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--group-size", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--teacher-max-tokens", type=int, default=128)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--refresh-every", type=int, default=10)
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--out", default="runs/spin")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    path = resolve_model_path(args.student)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    prompts = get_task(args.task).items("train", args.n_prompts)

    collector = None
    if not args.no_teacher:
        teacher = ReferenceTeacher(
            args.teacher_model, n=1, temperature=0.0, max_tokens=args.teacher_max_tokens,
            base_url=args.base_url, api_key=os.environ.get(args.api_key_env),
        )
        collector = make_collector(teacher, cache=os.path.join(args.out, "reference_cache.sqlite"))
    objective = SPIN(tokenizer, source="answer" if args.no_teacher else "reference",
                     beta=args.beta, refresh_every=args.refresh_every)
    prepare_output_dir(args.out, resume=False, overwrite=True)  # a rerun replaces the last run; the cache stays
    trainer = Trainer(
        model, tokenizer, objective, collector, prompts,
        group_size=args.group_size, prompts_per_step=args.prompts_per_step, max_steps=args.steps,
        lr=args.lr, max_new_tokens=args.max_new_tokens, output_dir=args.out,
    )
    try:
        history = trainer.train()
    finally:
        if collector is not None:
            collector.close()
    print(f"SPIN loss {history[0]['loss/total']:.4f} -> {history[-1]['loss/total']:.4f} over {len(history)} steps; "
          f"student in {args.out}/final")
    return {"history": history, "usage": collector.usage if collector else None}


if __name__ == "__main__":
    main()

"""Distil a student from an LLM judge behind any OpenAI-compatible API (OpenAI, a local vLLM).

The student samples G answers per prompt; `JudgeTeacher` scores each against
a rubric (0-10, normalised to [0, 1]); `RewardWeighted` with GRPO advantages
turns the scores into a policy-gradient update. Every judge call goes through
`FeedbackCollector`: concurrency and RPM limits, retries honouring
Retry-After, and a persistent cache (rerun the same command: no call is paid
twice).

OpenAI:        export OPENAI_API_KEY=...; python examples/distil_from_judge.py --teacher-model gpt-4o-mini
Local vLLM:    python examples/distil_from_judge.py --base-url http://127.0.0.1:8000/v1 --teacher-model smollm2
(start vLLM on CPU as README shows; a local server needs no key).
"""

from __future__ import annotations

import argparse
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd_sdk import make_collector
from opd_sdk.app.runner import prepare_output_dir
from opd_sdk.models import resolve_model_path
from opd_sdk.objectives import RewardWeighted
from opd_sdk.tasks import get_task
from opd_sdk.train.trainer import Trainer
from providers.judge import JudgeTeacher


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint (default: api.openai.com)")
    p.add_argument("--teacher-model", default="gpt-4o-mini")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key")
    p.add_argument("--rubric", default="Is the final answer correct? Is it short and direct?")
    p.add_argument("--student", default="smollm2", help="HF id, local folder, or smollm2 (offline)")
    p.add_argument("--task", default="times_table", help="built-in task for the prompts")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--rpm", type=float, default=None, help="judge requests per minute")
    p.add_argument("--out", default="runs/judge")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    path = resolve_model_path(args.student)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    judge = JudgeTeacher(
        args.teacher_model,
        rubric=args.rubric,
        base_url=args.base_url,
        api_key=os.environ.get(args.api_key_env),  # never from a flag or a file
    )
    collector = make_collector(judge, rpm=args.rpm, cache=os.path.join(args.out, "judge_cache.sqlite"))
    prepare_output_dir(args.out, resume=False, overwrite=True)  # a rerun replaces the last run; the cache stays
    trainer = Trainer(
        model, tokenizer, RewardWeighted(advantage="grpo"), collector, get_task(args.task).items("train"),
        group_size=args.group_size, prompts_per_step=args.prompts_per_step, max_steps=args.steps,
        lr=args.lr, max_new_tokens=args.max_new_tokens, output_dir=args.out,
    )
    try:
        history = trainer.train()
    finally:
        collector.close()
    u = collector.usage
    print(f"judge reward {history[0]['reward/mean']:.3f} -> {history[-1]['reward/mean']:.3f}; "
          f"{u.requests_sent} judge calls, {u.cache_hits} cache hits, {u.failures} failures; student in {args.out}/final")
    return {"history": history, "usage": u}


if __name__ == "__main__":
    main()

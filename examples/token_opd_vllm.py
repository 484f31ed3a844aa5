"""Token-level on-policy distillation from a vLLM teacher's log-probabilities.

The student samples; `LogprobTeacher` sends prompt + completion to the
teacher's /v1/completions with echo and prompt_logprobs and returns the
teacher's log-probability of every student token (and the top-k when asked);
`TokenDistill` minimises the per-token reverse KL on the student's own
samples, as a policy gradient with advantage log p_T - log p_S (Agarwal et
al. 2024, GKD; "On-Policy Distillation", Thinking Machines 2025), or forward
KL / JSD / TV over the teacher's top-k with --divergence.

Teacher and student must share a tokenizer (same model family). Before
training, `self_test()` scores one text twice and reports the spread, so you
learn whether the endpoint's numbers are stable.

Start a teacher on CPU (see README), then:
  python examples/token_opd_vllm.py --base-url http://127.0.0.1:8000/v1 --teacher-model smollm2
"""

from __future__ import annotations

import argparse
import asyncio
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd_sdk import make_collector
from opd_sdk.app.runner import prepare_output_dir
from opd_sdk.models import resolve_model_path
from opd_sdk.objectives import TokenDistill
from opd_sdk.tasks import get_task
from opd_sdk.train.trainer import Trainer
from providers.logprob import LogprobTeacher


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", required=True, help="vLLM (or llama.cpp) server, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--teacher-model", required=True, help="the served model name")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY")
    p.add_argument("--student", default="smollm2")
    p.add_argument("--task", default="word_problems")
    p.add_argument("--n-prompts", type=int, default=200)
    p.add_argument("--send", choices=["text", "token_ids"], default="token_ids")
    p.add_argument("--top-k", type=int, default=0, help="teacher top-k per token (needed by forward_kl/jsd/tv)")
    p.add_argument("--divergence", default="reverse_kl_pg", choices=["reverse_kl_pg", "forward_kl", "reverse_kl", "jsd", "tv"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--group-size", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--out", default="runs/token_opd")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    path = resolve_model_path(args.student)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    def make_teacher() -> LogprobTeacher:
        return LogprobTeacher(
            args.teacher_model, tokenizer=tokenizer, top_k=args.top_k, send=args.send,
            base_url=args.base_url, api_key=os.environ.get(args.api_key_env),
        )

    check = asyncio.run(make_teacher().self_test())  # its own client: the collector's lives on another loop
    teacher = make_teacher()
    print(f"teacher self-test: {check['n_tokens']} tokens, max |diff| between two runs {check['max_abs_diff']:.2e}"
          f" ({'stable' if check['stable'] else 'UNSTABLE: expect noisy targets'})")
    collector = make_collector(teacher, cache=os.path.join(args.out, "logprob_cache.sqlite"))
    prepare_output_dir(args.out, resume=False, overwrite=True)  # a rerun replaces the last run; the cache stays
    trainer = Trainer(
        model, tokenizer, TokenDistill(divergence=args.divergence), collector,
        get_task(args.task).items("train", args.n_prompts),
        group_size=args.group_size, prompts_per_step=args.prompts_per_step, max_steps=args.steps,
        lr=args.lr, max_new_tokens=args.max_new_tokens, output_dir=args.out,
    )
    try:
        history = trainer.train()
    finally:
        collector.close()
    print(f"token-distill loss {history[0]['loss/total']:.4f} -> {history[-1]['loss/total']:.4f}; "
          f"{collector.usage.requests_sent} teacher calls; student in {args.out}/final")
    return {"history": history, "usage": collector.usage, "self_test": check}


if __name__ == "__main__":
    main()

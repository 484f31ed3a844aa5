"""opd-sdk teachers as reward functions inside TRL's GRPOTrainer.

`opd_sdk.app.trl.as_reward_func(teacher, ...)` wraps any Score-returning teacher
(a judge behind an API, a verifier, a reward-model endpoint, a composition)
in TRL's reward-function signature. TRL users get what TRL's own reward
calls lack: our concurrency and RPM/TPM limits, retries honouring
Retry-After, the persistent cache, a budget, and failures reported as None
(TRL leaves them out of the group statistics) instead of a reward of 0.0.

python examples/trl_grpo_rewards.py --teacher verifier --steps 5
python examples/trl_grpo_rewards.py --teacher judge --base-url http://127.0.0.1:8000/v1 --teacher-model smollm2
"""

from __future__ import annotations

import argparse
import os

from opd_sdk.app.trl import as_reward_func
from opd_sdk.models import resolve_model_path
from opd_sdk.tasks import get_task


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", choices=["verifier", "judge"], default="verifier")
    p.add_argument("--base-url", default=None)
    p.add_argument("--teacher-model", default="gpt-4o-mini", help="the served judge model name")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY")
    p.add_argument("--rpm", type=float, default=None)
    p.add_argument("--student", default="smollm2")
    p.add_argument("--task", default="times_table")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--prompts-per-step", type=int, default=2)
    p.add_argument("--group-size", type=int, default=4, help="completions per prompt (GRPO's num_generations)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--out", default="runs/trl_grpo")
    args = p.parse_args(argv)

    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    if args.teacher == "verifier":
        from providers.verifier import VerifierTeacher

        teacher = VerifierTeacher("numeric")
    else:
        from providers.judge import JudgeTeacher

        teacher = JudgeTeacher(args.teacher_model, base_url=args.base_url, api_key=os.environ.get(args.api_key_env))
    reward = as_reward_func(teacher, rpm=args.rpm, cache=os.path.join(args.out, "reward_cache.sqlite"))

    items = get_task(args.task).items("train")
    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": it.prompt}], "answer": it.answer} for it in items]
    )
    config = GRPOConfig(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=args.prompts_per_step * args.group_size,
        num_generations=args.group_size,
        max_completion_length=args.max_new_tokens,
        learning_rate=args.lr,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
    )
    trainer = GRPOTrainer(
        model=resolve_model_path(args.student), reward_funcs=[reward], args=config, train_dataset=dataset
    )
    try:
        trainer.train()
    finally:
        reward.collector.close()
    rewards = [row["reward"] for row in trainer.state.log_history if "reward" in row]
    u = reward.collector.usage
    print(f"GRPO reward {rewards[0]:.3f} -> {rewards[-1]:.3f}; teacher: {u.requests_sent} calls, "
          f"{u.cache_hits} cache hits, {u.failures} failures")
    return {"rewards": rewards, "usage": u}


if __name__ == "__main__":
    main()

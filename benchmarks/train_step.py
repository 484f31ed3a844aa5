"""Step time, peak memory and reward curve: our RewardWeighted (RLOO) trainer vs TRL's RLOOTrainer.

Same student (SmolLM2-135M-Instruct, offline via opd_sdk.models.smollm2_dir),
same batch (8 prompts x 4 samples, 24 new tokens, temperature 1), same
optimizer (AdamW, constant LR, grad-norm clip 1.0), same KL weight (--beta),
same precision (--precision), and the same reward function (VerifierTeacher's
numeric check: 1 when the last number of the answer equals A*B) on the
times-table task "What is A times B? Answer with just the number." (A, B in
2..9), and the same prompts at each step (`prompt_order`). Each trainer runs
in its own subprocess so its peak RSS is its own.

Differences that remain (each trainer's own design): TRL's RLOO loss sums
log-probs over a sequence and averages over sequences, ours averages over
tokens (with Adam the update scale barely depends on it); TRL also computes
the entropy over the vocabulary for logging.

    python benchmarks/train_step.py --steps 12 --seeds 0 1 2 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "What is {a} times {b}? Answer with just the number."


def times_table() -> list[tuple[str, str]]:
    pairs = [(a, b) for a in range(2, 10) for b in range(2, 10)]
    return [(PROMPT.format(a=a, b=b), str(a * b)) for a, b in pairs]


def prompt_order(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The prompts both trainers walk through, in this order: seeded shuffled epochs of the table.

    Which 8 prompts a step draws moves its reward by more than the trainers
    differ, so both see the same ones (each with its sampler's shuffling off).
    """
    rows, rng, order = times_table(), random.Random(args.seed), []
    while len(order) < args.steps * args.prompts:
        epoch = list(rows)
        rng.shuffle(epoch)
        order += epoch
    return order[: args.steps * args.prompts]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_ours(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd_sdk.data import PromptItem
    from opd_sdk.feedback.factory import make_collector
    from opd_sdk.models import smollm2_dir
    from opd_sdk.objectives import RewardWeighted
    from opd_sdk.train.trainer import Trainer
    from providers.verifier import VerifierTeacher

    path = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    prompts = [PromptItem(prompt=p, answer=a) for p, a in prompt_order(args)]
    seen = []
    with make_collector(VerifierTeacher("numeric"), progress=False) as collector:
        trainer = Trainer(
            model, tokenizer, RewardWeighted(advantage="rloo", beta=args.beta), collector, prompts,
            group_size=args.group_size, prompts_per_step=args.prompts, max_steps=args.steps, lr=args.lr,
            max_new_tokens=args.max_new_tokens, temperature=1.0, precision=args.precision, seed=args.seed,
            max_grad_norm=1.0, progress=False, shuffle=False,
        )
        next_batch = trainer.sampler.next_batch

        def recording_next_batch():  # what each step really drew
            batch = next_batch()
            seen.append(sorted(p.prompt for p in batch))
            return batch

        trainer.sampler.next_batch = recording_next_batch
        history = trainer.train()
        hybrid = hybrid_forwards(trainer, prompts[: args.prompts], collector)
    return {
        "hybrid": hybrid,
        "name": "opd-sdk RewardWeighted (RLOO)",
        "step_s": [r["time/step_s"] for r in history],
        "reward": [r["reward/mean"] for r in history],
        "split": {
            k: [r[f"time/{k.replace('sampling', 'sample')}_s"] for r in history]
            for k in ("sampling", "feedback", "forward_backward", "optimizer")
        },
        "completion_len": [r["rollout/completion_len_mean"] for r in history],
        "prompts": seen,
        "peak_rss_mb": peak_rss_mb(),
    }


def hybrid_forwards(trainer, prompts, collector) -> dict:
    """Trunk calls of one batch's loss: RewardWeighted alone vs a Hybrid of it and an SFT term."""
    import torch

    from opd_sdk.feedback.requests import build_requests
    from opd_sdk.objectives import SFT, Hybrid, RewardWeighted
    from opd_sdk.train.microbatch import batch_loss

    batch = trainer.rollout.sample(prompts, trainer.group_size)
    feedback = collector.collect_sync(build_requests(batch))
    calls = []
    trunk = trainer.model.get_decoder()
    hook = trunk.register_forward_hook(lambda *a: calls.append(1))
    out = {}
    try:
        for name, objective in (("reward_weighted", RewardWeighted()),
                                ("hybrid", Hybrid([(RewardWeighted(), 1.0), (SFT(trainer.tokenizer), 0.5)]))):
            calls.clear()
            with torch.no_grad():
                result = batch_loss(objective, trainer.model, batch, feedback)
            out[name] = {"policy_passes": result.metrics["forward/policy_passes"], "trunk_calls": len(calls)}
    finally:
        hook.remove()
    return out


def run_trl(args: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    from opd_sdk.models import smollm2_dir
    from providers.verifier import VerifierTeacher

    verifier = VerifierTeacher("numeric")
    seen = []

    def reward_times_table(prompts, completions, answer, **kwargs):  # called once a step, on its 32 samples
        seen.append(sorted({p[-1]["content"] for p in prompts}))
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [verifier.score_text(t, a)[0] for t, a in zip(texts, answer)]

    rows = prompt_order(args)
    dataset = Dataset.from_dict(
        {"prompt": [[{"role": "user", "content": p}] for p, _ in rows], "answer": [a for _, a in rows]}
    )
    path = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    out = tempfile.mkdtemp(prefix="trl-rloo-")
    config = RLOOConfig(
        output_dir=out, per_device_train_batch_size=args.prompts * args.group_size, num_generations=args.group_size,
        max_completion_length=args.max_new_tokens, max_steps=args.steps, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, beta=args.beta, bf16=args.precision == "bf16",
        gradient_checkpointing=False, logging_steps=1, report_to=[], save_strategy="no", seed=args.seed,
        temperature=1.0, top_p=1.0, top_k=0, max_grad_norm=1.0, use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=True, shuffle_dataset=False,
    )
    step_s, reward, completion_len, gen_s = [], [], [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            step_s.append(time.perf_counter() - self.t)

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "reward" in logs:
                reward.append(float(logs["reward"]))
                length = logs.get("completions/mean_length")
                completion_len.append(float(length) if length is not None else None)

    trainer = RLOOTrainer(
        model=model, reward_funcs=reward_times_table, args=config, train_dataset=dataset,
        processing_class=tokenizer, callbacks=[Timer()],
    )
    generate_and_score = trainer._generate_and_score_completions

    def timed(*a, **k):  # TRL samples, scores and runs its no-grad forwards here
        t = time.perf_counter()
        try:
            return generate_and_score(*a, **k)
        finally:
            gen_s.append(time.perf_counter() - t)

    trainer._generate_and_score_completions = timed
    trainer.train()
    return {
        "name": "TRL RLOOTrainer",
        "step_s": step_s,
        "reward": reward,
        "split": {"generate_score_and_extra_forwards": gen_s,
                  "loss_backward_optimizer": [s - g for s, g in zip(step_s, gen_s)]},
        "completion_len": completion_len,
        "prompts": seen,
        "peak_rss_mb": peak_rss_mb(),
    }


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def std(xs: list[float]) -> float:
    m = mean(xs)
    return (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0


def steady(r: dict) -> float:
    """Mean step time without the first step (warm-up)."""
    return mean(r["step_s"][1:] or r["step_s"])


def report(runs: dict[str, list[dict]]) -> None:
    """runs: trainer name -> one result per seed."""
    seeds = len(next(iter(runs.values())))
    print(f"\n{seeds} seed(s); reward = mean reward of the step's own samples, before its update")
    print(f"{'trainer':32} {'s/step (2+)':>11} {'peak RSS MB':>11} {'reward first3':>13} {'reward last3':>16}")
    for name, rs in runs.items():
        last3 = [mean(r["reward"][-3:]) for r in rs]
        print(f"{name:32} {mean([steady(r) for r in rs]):11.2f} {mean([r['peak_rss_mb'] for r in rs]):11.0f} "
              f"{mean([mean(r['reward'][:3]) for r in rs]):13.3f} {mean(last3):8.3f} +- {std(last3):.3f}")
    if len(runs) == 2:
        (a, ra), (b, rb) = runs.items()
        same = all(x["prompts"] == y["prompts"] for x, y in zip(ra, rb))
        print(f"\nsame prompts at every step in both trainers: {'yes' if same else 'NO'}")
        diff = [mean(x["reward"][-3:]) - mean(y["reward"][-3:]) for x, y in zip(ra, rb)]
        print(f"reward last3, ours minus TRL, paired by seed: {mean(diff):+.3f} +- {std(diff):.3f} "
              f"({' '.join(f'{d:+.2f}' for d in diff)})")
        ratio = mean([steady(r) for r in ra]) / mean([steady(r) for r in rb])
        rss = mean([r["peak_rss_mb"] for r in ra]) / mean([r["peak_rss_mb"] for r in rb])
        print(f"\nstep-time ratio ours/TRL (steps 2+): {ratio:.2f}   peak RSS ratio: {rss:.2f}")
    print("\nreward per step (mean over seeds), then each seed:")
    for name, rs in runs.items():
        curve = [mean([r["reward"][k] for r in rs]) for k in range(min(len(r["reward"]) for r in rs))]
        print(f"  {name:32} " + " ".join(f"{x:.2f}" for x in curve))
        if seeds > 1:
            for r in rs:
                print(f"    seed {r['seed']:<25} " + " ".join(f"{x:.2f}" for x in r["reward"]))
    for name, rs in runs.items():
        if rs[0].get("hybrid"):
            h = rs[0]["hybrid"]
            print(f"\none batch's loss, {name}: RewardWeighted alone {h['reward_weighted']['policy_passes']:.0f} policy "
                  f"pass ({h['reward_weighted']['trunk_calls']} trunk calls); Hybrid(RewardWeighted + SFT) "
                  f"{h['hybrid']['policy_passes']:.0f} policy pass ({h['hybrid']['trunk_calls']} trunk calls)")
    print("\nmean completion length per step (first seed):")
    for name, rs in runs.items():
        print(f"  {name:32} " + " ".join(f"{x:.1f}" if x is not None else "-" for x in rs[0]["completion_len"]))
    print("\nwhere the time goes (mean seconds per step, over seeds):")
    for name, rs in runs.items():
        parts = ", ".join(f"{k} {mean([mean(r['split'][k]) for r in rs]):.2f}" for k in rs[0]["split"])
        print(f"  {name:32} {parts}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--which", choices=["both", "ours", "trl"], default="both")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=0.0, help="KL weight to a frozen reference, both trainers")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="fp32")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run of each trainer per seed")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)  # the worker's seed
    args = parser.parse_args()

    if args.worker:
        random.seed(args.seed)
        result = run_ours(args) if args.worker == "ours" else run_trl(args)
        Path(args.json).write_text(json.dumps({**result, "seed": args.seed}))
        return

    runs: dict[str, list[dict]] = {}
    for seed in args.seeds:
        for which in (["ours", "trl"] if args.which == "both" else [args.which]):
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
                out = f.name
            cmd = [sys.executable, __file__, "--worker", which, "--json", out, "--steps", str(args.steps),
                   "--prompts", str(args.prompts), "--group-size", str(args.group_size),
                   "--max-new-tokens", str(args.max_new_tokens), "--lr", str(args.lr), "--beta", str(args.beta),
                   "--precision", args.precision, "--seed", str(seed)]
            t = time.perf_counter()
            subprocess.run(cmd, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            print(f"[{which} seed {seed}] finished in {time.perf_counter() - t:.0f} s", file=sys.stderr)
            result = json.loads(Path(out).read_text())
            os.unlink(out)
            runs.setdefault(result["name"], []).append(result)
            if args.json:
                Path(args.json).write_text(json.dumps(runs, indent=1))
    report(runs)


if __name__ == "__main__":
    main()

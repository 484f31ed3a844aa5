"""Teacher-free distillation on SmolLM2-135M-Instruct: held-out accuracy before and after.

Three ways to learn from a dataset of reference solutions with no external
teacher, each for the same number of optimizer steps on the same prompts:

- self_distill: on-policy self-distillation with privileged information
  (OPSD / SDFT style). The student samples; `SelfDistillTeacher` (the live
  student, shown the reference solution in its prompt) scores every sampled
  token; `TokenDistill(divergence="reverse_kl_pg")` pushes log p_S(y_t)
  towards log p_T(y_t) with per-token advantage log p_T - log p_S.
- spin: self-play (SPIN, Chen et al. 2024). The reference answer is the real
  side, the student's own samples the generated side; the opponent is the
  student as it was at the start of each iteration (refreshed every
  `steps // iterations` steps). No teacher at all.
- sft: the off-policy baseline: NLL of the same reference solutions.

Held-out accuracy is measured on the task's held-out split (problems never
seen in training, e.g. for the times table neither 3x7 nor 7x3): greedy, and
sampled at temperature 1 (`--eval-samples` per prompt). Mean and sample std
over seeds are printed as a markdown table.

Run it under the CPU lock (about 15-20 minutes on 2 cores):

    flock /work/cpu.lock python benchmarks/teacher_free.py --seeds 0 1 2

The recipe functions (`self_distill_trainer`, `spin_trainer`, `sft_trainer`)
are the documented way to set up each method with the project's Trainer.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from opd_sdk.data import PromptItem  # noqa: E402
from opd_sdk.feedback.factory import make_collector  # noqa: E402
from opd_sdk.models import smollm2_dir  # noqa: E402
from opd_sdk.objectives import SFT, SPIN, TokenDistill  # noqa: E402
from opd_sdk.rollout.engine import TransformersRollout  # noqa: E402
from opd_sdk.tasks import check, get_task  # noqa: E402
from opd_sdk.train.evaluate import greedy_accuracy  # noqa: E402
from opd_sdk.train.trainer import Trainer  # noqa: E402
from providers.self_distill import PrivilegedTemplate, SelfDistillTeacher  # noqa: E402

METHODS = ("self_distill", "spin", "sft")


def _checker(text: str, item: PromptItem) -> bool:
    return check(text, item.answer or "")


def self_distill_trainer(model, tokenizer, items, *, template: PrivilegedTemplate | None = None,
                         mode: str = "live", autocast_dtype=None, **trainer_kwargs) -> Trainer:
    """On-policy self-distillation: the student, shown `PromptItem.privileged`, is its own teacher.

    The teacher pass is local compute: `make_collector` runs it in process, on the training thread.
    """
    teacher = SelfDistillTeacher(model, tokenizer, mode=mode, template=template, autocast_dtype=autocast_dtype)
    collector = make_collector(teacher, progress=False)
    return Trainer(model, tokenizer, TokenDistill(divergence="reverse_kl_pg"), collector, items, **trainer_kwargs)


def spin_trainer(model, tokenizer, items, *, iterations: int, beta: float = 0.1, **trainer_kwargs) -> Trainer:
    """Self-play fine-tuning on `PromptItem.answer` over `iterations` opponent refreshes.

    The real side is each prompt's reference answer, the generated side the
    student's G samples of the current step; the opponent (a frozen copy)
    is reloaded from the student every max_steps // iterations steps.
    """
    steps = trainer_kwargs.get("max_steps", 100)
    every = max(1, steps // max(1, iterations))
    objective = SPIN(tokenizer, source="answer", beta=beta, refresh_every=every)
    return Trainer(model, tokenizer, objective, None, items, **trainer_kwargs)


def sft_trainer(model, tokenizer, items, **trainer_kwargs) -> Trainer:
    """Off-policy baseline: NLL of `PromptItem.answer` (the student's samples are not used)."""
    return Trainer(model, tokenizer, SFT(tokenizer, source="answer"), None, items, **trainer_kwargs)


def load_student():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, tokenizer


def evaluate(model, tokenizer, heldout, *, max_new_tokens: int, samples: int, seed: int, autocast_dtype) -> dict:
    greedy = greedy_accuracy(model, tokenizer, heldout, _checker, max_new_tokens=max_new_tokens,
                             autocast_dtype=autocast_dtype)
    torch.manual_seed(1000 + seed)
    engine = TransformersRollout(model, tokenizer, temperature=1.0, max_new_tokens=max_new_tokens,
                                 autocast_dtype=autocast_dtype)
    batch = engine.sample(heldout, samples)
    right = [check(c.text, heldout[b // samples].answer or "") for b, c in enumerate(batch.completions)]
    return {"greedy": greedy.accuracy, "sampled": sum(right) / len(right), "greedy_examples": greedy.completions[:3]}


def run_one(method: str, seed: int, args, train, heldout) -> dict:
    model, tokenizer = load_student()
    autocast_dtype = torch.bfloat16 if args.precision == "bf16" else None
    common = dict(group_size=args.group_size, prompts_per_step=args.prompts_per_step, max_steps=args.steps,
                  lr=args.lr, max_new_tokens=args.max_new_tokens, seed=seed, precision=args.precision,
                  progress=False, tensorboard=False, temperature=1.0)
    if method == "self_distill":
        trainer = self_distill_trainer(model, tokenizer, train, mode=args.self_distill_mode,
                                       autocast_dtype=autocast_dtype, **common)
    elif method == "spin":
        trainer = spin_trainer(model, tokenizer, train, iterations=args.spin_iterations, **common)
    elif method == "sft":  # SFT ignores the samples: draw one per prompt instead of G (same prompts, same steps)
        trainer = sft_trainer(model, tokenizer, train, **{**common, "group_size": 1})
    else:
        raise SystemExit(f"unknown method {method!r}; choose from {METHODS}")
    cpu0, wall0 = time.process_time(), time.perf_counter()
    history = trainer.train()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    after = evaluate(trainer.model, tokenizer, heldout, max_new_tokens=args.eval_max_new_tokens,
                     samples=args.eval_samples, seed=seed, autocast_dtype=autocast_dtype)
    keys = ("loss/total", "objective/reverse_kl", "objective/margin_mean", "objective/nll", "teacher/failures",
            "rollout/completion_len_mean")
    first, last = history[0], history[-1]
    trace = {k: (first.get(k), last.get(k)) for k in keys if first.get(k) is not None}
    return {"method": method, "seed": seed, **after, "train_cpu_s": cpu, "train_wall_s": wall, "trace": trace}


def summarise(rows: list[dict], before: list[dict], args) -> str:
    def stat(values):
        mean = statistics.mean(values)
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{100 * mean:.1f} ± {100 * sd:.1f}"

    lines = [
        f"Task `{args.task}`, held-out split ({args.heldout_size} prompts), SmolLM2-135M-Instruct; "
        f"{args.steps} steps x {args.prompts_per_step} prompts x {args.group_size} samples, lr {args.lr}, "
        f"{args.max_new_tokens} new tokens in training, {args.eval_max_new_tokens} in eval, {args.precision}; seeds {args.seeds}. Accuracy % (mean ± std over seeds).",
        "",
        "| method | greedy acc. | sampled acc. (T=1) | train CPU s / run |",
        "|---|---|---|---|",
        f"| before training | {stat([b['greedy'] for b in before])} | {stat([b['sampled'] for b in before])} | - |",
    ]
    names = {"self_distill": f"self-distillation ({args.self_distill_mode} teacher + privileged reference, "
                             "TokenDistill reverse-KL)",
             "spin": f"SPIN ({args.spin_iterations} iterations)", "sft": "SFT on the reference solutions (off-policy)"}
    for method in args.methods:
        mine = [r for r in rows if r["method"] == method]
        cpu = statistics.mean(r["train_cpu_s"] for r in mine)
        lines.append(f"| {names[method]} | {stat([r['greedy'] for r in mine])} | "
                     f"{stat([r['sampled'] for r in mine])} | {cpu:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="times_table")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--prompts-per-step", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--max-new-tokens", type=int, default=8, help="sampled tokens per answer in training")
    ap.add_argument("--eval-max-new-tokens", type=int, default=16)
    ap.add_argument("--spin-iterations", type=int, default=3)
    ap.add_argument("--self-distill-mode", default="live", choices=("live", "frozen", "ema"),
                    help="teacher weights: the live student, a frozen copy of the start, or an EMA copy")
    ap.add_argument("--eval-samples", type=int, default=4)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                    help="bf16 autocast pays off only on CPUs with AVX-512 BF16/AMX (on AVX2 it is ~10x slower)")
    ap.add_argument("--out", default=None, help="write every run's numbers here as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    task = get_task(args.task)
    n_train = None if args.task != "word_problems" else 200
    train = task.items("train", n_train, seed=0)
    heldout = task.items("heldout", None if n_train is None else 48, seed=0)
    args.heldout_size = len(heldout)
    t0, cpu0 = time.perf_counter(), time.process_time()
    model, tokenizer = load_student()
    autocast_dtype = torch.bfloat16 if args.precision == "bf16" else None
    before = [evaluate(model, tokenizer, heldout, max_new_tokens=args.eval_max_new_tokens, samples=args.eval_samples,
                       seed=s, autocast_dtype=autocast_dtype) for s in args.seeds]
    print(f"before: {[(b['greedy'], b['sampled']) for b in before]} e.g. {before[0]['greedy_examples']}", flush=True)
    del model
    rows = []
    for seed in args.seeds:
        for method in args.methods:
            row = run_one(method, seed, args, train, heldout)
            rows.append(row)
            print(json.dumps(row), flush=True)
    table = summarise(rows, before, args)
    total = f"total: {time.perf_counter() - t0:.0f} s wall, {time.process_time() - cpu0:.0f} s CPU (this process)"
    print("\n" + table + "\n\n" + total)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "before": before, "runs": rows,
                                              "table": table, "total": total}, indent=1))


if __name__ == "__main__":
    main()

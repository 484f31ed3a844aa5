"""Rollout speed: transformers `generate` vs vLLM (colocated), and the whole step with each.

Same student (SmolLM2-135M-Instruct offline, or --model DIR), same prompts
(the times table, "What is A times B? Answer with just the number."), same
sampler (temperature 1, no top-p / top-k), G samples of up to N new tokens
for P prompts. Each engine runs in its own subprocess (vLLM binds the
process's OpenMP threads), with the same python: run it with the vLLM
venv's python, which has both engines.

Rollout tokens/s = sampled tokens (EOS included) / wall time of `sample`,
after one warm-up call, over --repeats calls. Step time: `Trainer` steps
(RewardWeighted RLOO with the numeric verifier, no teacher network) with
that engine, first step excluded; "sync" is the weight load into vLLM after
the optimizer step (inside the trainer's optimizer time).

    /work/main/.venv-vllm/bin/python benchmarks/rollout.py            # CPU: P=4, G=8, N=64
    python benchmarks/rollout.py --device cuda --model DIR --prompts 16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "What is {a} times {b}? Answer with just the number."


def prompts(n: int):
    from opd_sdk.data import PromptItem

    pairs = [(a, b) for a in range(2, 10) for b in range(2, 10)]
    return [PromptItem(prompt=PROMPT.format(a=a, b=b), answer=str(a * b)) for a, b in pairs[: max(n, 1) * 8]]


def run_one(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd_sdk.config.settings import RolloutSettings
    from opd_sdk.feedback.factory import make_collector
    from opd_sdk.models import smollm2_dir
    from opd_sdk.objectives import RewardWeighted
    from opd_sdk.rollout.build import build_rollout_engine
    from opd_sdk.train.trainer import Trainer
    from providers.verifier import VerifierTeacher

    torch.manual_seed(0)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    path = args.model or str(smollm2_dir())
    tokenizer = AutoTokenizer.from_pretrained(path)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(args.device)
    settings = RolloutSettings(
        engine=args.only, temperature=1.0, max_new_tokens=args.max_new_tokens, group_size=args.group_size,
        prompts_per_step=args.prompts, gpu_memory_utilization=args.gpu_memory_utilization,
    )
    t0 = time.perf_counter()
    engine = build_rollout_engine(settings, model, tokenizer, autocast_dtype=dtype if args.device == "cuda" else None)
    startup_s = time.perf_counter() - t0
    items = prompts(args.prompts)
    batch_prompts = items[: args.prompts]
    engine.sample(batch_prompts, args.group_size)  # warm-up
    print(f"{args.only}: up in {startup_s:.1f} s, warmed up", file=sys.stderr, flush=True)
    tokens, seconds = 0, 0.0
    for _ in range(args.repeats):
        t = time.perf_counter()
        batch = engine.sample(batch_prompts, args.group_size)
        seconds += time.perf_counter() - t
        tokens += batch.completion_tokens()
        print(f"{args.only}: {batch.completion_tokens()} tokens in {time.perf_counter() - t:.1f} s",
              file=sys.stderr, flush=True)
    out = {"engine": args.only, "startup_s": startup_s, "tokens": tokens, "rollout_s": seconds,
           "tokens_per_s": tokens / seconds, "torch_threads": torch.get_num_threads()}
    if args.steps:
        with make_collector(VerifierTeacher("numeric"), progress=False) as collector:
            trainer = Trainer(
                model, tokenizer, RewardWeighted(advantage="rloo"), collector, items, rollout=engine,
                group_size=args.group_size, prompts_per_step=args.prompts, max_steps=args.steps + 1, lr=1e-6,
                max_new_tokens=args.max_new_tokens, temperature=1.0, progress=False, shuffle=False,
                precision="bf16" if args.device == "cuda" else "fp32",
            )
            history = trainer.train()[1:]
        mean = lambda key: sum(r[key] for r in history) / len(history)  # noqa: E731
        out.update(step_s=mean("time/step_s"), step_sampling_s=mean("time/sample_s"),
                   step_fwd_bwd_s=mean("time/forward_backward_s"), step_optimizer_sync_s=mean("time/optimizer_s"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF model folder (default: SmolLM2-135M-Instruct offline)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="timed trainer steps per engine (0: skip)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    parser.add_argument("--engines", nargs="+", default=["transformers", "vllm"])
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="torch threads in each engine's process (0: torch's default; colocated vLLM on CPU "
                        "sets 1 for the whole process itself)")
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = parser.parse_args()
    if args.only:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return
    rows = []
    for engine in args.engines:
        cmd = [sys.executable, __file__, "--only", engine] + [
            a for a in sys.argv[1:] if a != "--json"
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            raise SystemExit(f"{engine} run failed (exit {proc.returncode})")
        rows.append(json.loads(lines[-1][len("RESULT "):]))
    base = rows[0]["tokens_per_s"]
    print(f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: rollout P={args.prompts} x G={args.group_size} x {args.max_new_tokens} new tokens, "
          f"device {args.device}, model {args.model or 'SmolLM2-135M-Instruct'}")
    head = "| engine | torch threads | startup s | rollout tok/s | speed-up | step s | sampling s | fwd+bwd s | optim+sync s |"
    print(head + "\n|" + "---|" * (head.count("|") - 1))
    for r in rows:
        step = (f"{r['step_s']:.1f} | {r['step_sampling_s']:.1f} | {r['step_fwd_bwd_s']:.1f} | "
                f"{r['step_optimizer_sync_s']:.2f}" if "step_s" in r else "- | - | - | -")
        print(f"| {r['engine']} | {r['torch_threads']} | {r['startup_s']:.1f} | {r['tokens_per_s']:.1f} | "
              f"{r['tokens_per_s'] / base:.2f}x | {step} |")
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()

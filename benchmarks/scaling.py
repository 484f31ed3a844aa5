"""Scaling out: step time and tokens/s of one training job at 1 and N processes, same global batch.

Each layout trains SmolLM2-135M-Instruct (offline, fp32) with RewardWeighted (RLOO) on the
times table, P prompts x G samples a step, under `torchrun`. The reward is the answer's
length (a local scorer: every group has a spread, so every step runs the same forward and
backward work whatever was sampled; a verifier's all-wrong groups would be skipped). Every
process samples P/N prompts, gradients are summed (DDP), sharded with the parameters (FSDP2)
or partitioned with the optimizer state (DeepSpeed ZeRO-2, when deepspeed is installed). Each
process gets the same compute: `--threads` CPU threads (default 1) on a CPU machine, one
GPU on a GPU machine. The ideal is then N times the 1-process rate.

    python benchmarks/scaling.py                       # 1 and 2 processes, DDP, FSDP and ZeRO-2 at 2
    python benchmarks/scaling.py --processes 1 2 4 --steps 6
    python benchmarks/scaling.py --processes 1 --fsdp-processes 1    # one GPU: a real FSDP wrap at world size 1

Step times are means over the steps after the first (warm-up). Prints one table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(args: argparse.Namespace) -> None:
    """One process of a launched job (run by torchrun)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.train_step import times_table
    from opd_sdk.data import PromptItem
    from opd_sdk.feedback.factory import make_collector
    from opd_sdk.models import smollm2_dir
    from opd_sdk.objectives import RewardWeighted
    from opd_sdk.parallel.distributed import Distributed
    from opd_sdk.train.trainer import Trainer
    from opd_sdk.types import Score

    class LengthScore:  # dense and instant: the benchmark measures the trainer, not a teacher
        id = "answer-length"

        async def feedback(self, request):
            return Score(scores=[len(c.text) / 100 for c in request.completions])

    dist = Distributed.from_environment()
    path = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.to("cuda" if torch.cuda.is_available() else "cpu")  # the trainer moves it to this rank's GPU
    prompts = [PromptItem(prompt=p, answer=a) for p, a in times_table()]
    collector = make_collector(LengthScore(), progress=False) if dist.is_main else None
    trainer = Trainer(
        model, tokenizer, RewardWeighted(advantage="rloo"), collector, prompts, distributed=dist,
        group_size=args.group_size, prompts_per_step=args.prompts, max_steps=args.steps, lr=1e-6,
        max_new_tokens=args.max_new_tokens, temperature=1.0, precision="fp32", seed=0, progress=False,
        save_every=0,
    )
    try:
        history = trainer.train()
    finally:
        trainer.close()
        if collector is not None:
            collector.close()
    if dist.is_main:
        Path(args.out).write_text(json.dumps(history))
    dist.close()


# what `accelerate launch` exports for each layout (examples/accelerate/); "" is plain data parallel
LAYOUT_ENV = {
    "": {},
    "FSDP2": {"ACCELERATE_USE_FSDP": "true"},
    "ZeRO-2": {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"},
}


def launch(args: argparse.Namespace, processes: int, layout: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "history.json"
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(args.threads), **LAYOUT_ENV[layout])
        cmd = ["torchrun", "--standalone", "--nproc_per_node", str(processes), __file__, "--worker", "--out", str(out),
               "--steps", str(args.steps), "--prompts", str(args.prompts), "--group-size", str(args.group_size),
               "--max-new-tokens", str(args.max_new_tokens)]
        done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
        return json.loads(out.read_text())


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts (default: 1 2)")
    parser.add_argument("--steps", type=int, default=4, help="steps per layout; the first is warm-up (default: 4)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts a step, all processes together (default: 8)")
    parser.add_argument("--group-size", type=int, default=8, help="samples per prompt (default: 8)")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="new tokens per sample at most (default: 24)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process (default: 1)")
    parser.add_argument("--fsdp-processes", type=int, nargs="*", default=None,
                        help="process counts to run FSDP2 at (default: those of --processes above 1)")
    parser.add_argument("--zero-processes", type=int, nargs="*", default=None,
                        help="process counts to run DeepSpeed ZeRO-2 at (default: those of --processes above 1, "
                             "when deepspeed is installed)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    several = [n for n in args.processes if n > 1]
    fsdp = args.fsdp_processes if args.fsdp_processes is not None else several
    zero = args.zero_processes if args.zero_processes is not None else (
        several if importlib.util.find_spec("deepspeed") else [])
    layouts = [(n, "") for n in args.processes] + [(n, "FSDP2") for n in fsdp] + [(n, "ZeRO-2") for n in zero]
    rows = []
    for processes, layout in layouts:
        history = launch(args, processes, layout)[1:]  # the first step warms up
        step_s = mean([r["time/step_s"] for r in history])
        tokens = mean([r["rollout/completion_tokens"] / r["time/step_s"] for r in history])
        split = {k: mean([r[f"time/{name}_s"] for r in history])
                 for k, name in (("sampling", "sample"), ("forward_backward", "forward_backward"), ("optimizer", "optimizer"))}
        rows.append((processes, layout or ("DDP" if processes > 1 else "single"), step_s, tokens, split))
        print(f"done: {processes} process(es) {rows[-1][1]}: {step_s:.2f} s/step", file=sys.stderr, flush=True)

    base = rows[0][2]
    print(f"\nSmolLM2-135M, {args.prompts} prompts x {args.group_size} samples, {args.max_new_tokens} new tokens, "
          f"{args.threads} CPU thread(s) per process on {os.cpu_count()} cores; mean of steps 2..{args.steps}\n")
    print("| processes | layout | s/step | sampled tokens/s | sampling s | fwd+bwd s | optimizer s | speed-up | ideal |")
    print("|---|---|---|---|---|---|---|---|---|")
    for processes, layout, step_s, tokens, split in rows:
        print(f"| {processes} | {layout} | {step_s:.2f} | {tokens:.1f} | {split['sampling']:.2f} | "
              f"{split['forward_backward']:.2f} | {split['optimizer']:.2f} | {base / step_s:.2f}x | {processes}.00x |")


if __name__ == "__main__":
    main()

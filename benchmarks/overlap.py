"""Hiding the teacher's latency: sync vs rollout.max_staleness k=1, k=2.

SmolLM2-135M-Instruct learns the times table ("What is A times B? Answer
with just the number.") with RewardWeighted (RLOO) from a JudgeTeacher
(pointwise, free-text verdicts) served by the scripted OpenAI-compatible
server on 127.0.0.1 (tests/scripted_server.py) with a fixed latency per
call: a judge that grades correctly (10 when the answer's last number is
A*B, else 0) and answers after LATENCY seconds, as a slow API judge does.
With --vllm-url, the same runs use a real vLLM judge (no added latency).

Per setting it prints steps per minute, the bound max(sample + update,
feedback) per step (each measured in the sync run: sample + update is the
step minus its wait for feedback, feedback is that wait), the fraction of
the bound reached, and the reward curve, mean over seeds.

    python benchmarks/overlap.py --latency 2 8 --seeds 0 1 2 --steps 10
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "What is {a} times {b}? Answer with just the number."


def grading_judge(body: dict) -> str:
    """The scripted judge: reads the question and the fenced answer from the judge prompt."""
    text = "\n".join(m.get("content", "") for m in body.get("messages", []) if isinstance(m.get("content"), str))
    question = re.search(r"What is (\d) times (\d)", text)
    answer = re.findall(r"<<<BEGIN UNTRUSTED[^\n]*>>>\n(.*?)\n<<<END UNTRUSTED", text, flags=re.S)
    numbers = re.findall(r"-?\d+", answer[-1]) if answer else []
    right = question and numbers and int(numbers[-1]) == int(question[1]) * int(question[2])
    return "Score: 10" if right else "Score: 0"


def run(args: argparse.Namespace, latency: float | None, k: int, seed: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd_sdk.data import PromptItem
    from opd_sdk.feedback.factory import make_collector
    from opd_sdk.models import smollm2_dir
    from opd_sdk.objectives import RewardWeighted
    from opd_sdk.train.trainer import Trainer
    from providers.judge import JudgeTeacher
    from tests.scripted_server import ScriptedServer

    torch.manual_seed(seed)
    path = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    prompts = [PromptItem(prompt=PROMPT.format(a=a, b=b), answer=str(a * b)) for a in range(2, 10) for b in range(2, 10)]
    server = None
    if args.vllm_url and latency is None:
        judge = JudgeTeacher("smollm2", base_url=args.vllm_url, api_key="unused", structured="none")
    else:
        server = ScriptedServer(grading_judge, latency=latency).start()
        judge = JudgeTeacher("judge", base_url=server.base_url, api_key="unused", structured="none")
    try:
        with make_collector(judge, max_concurrency=64, progress=False) as collector:
            trainer = Trainer(
                model, tokenizer, RewardWeighted(), collector, prompts, group_size=args.group_size,
                prompts_per_step=args.prompts, max_steps=args.steps, lr=args.lr, max_new_tokens=args.max_new_tokens,
                precision="fp32", seed=seed, max_staleness=k, progress=False,
            )
            t0 = time.perf_counter()
            history = trainer.train()
            wall = time.perf_counter() - t0
    finally:
        if server is not None:
            server.stop()
    return {
        "wall_s": wall,
        "step_s": [r["time/step_s"] for r in history],
        "wait_s": [r["time/feedback_s"] for r in history],
        "reward": [r["reward/mean"] for r in history],
        "staleness": [r["rollout/staleness"] for r in history],
    }


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency", type=float, nargs="+", default=[2.0, 8.0], help="judge latency per call, s")
    parser.add_argument("--vllm-url", help="also run against a real vLLM judge at this URL")
    parser.add_argument("--k", type=int, nargs="+", default=[0, 1, 2], help="max_staleness values (0: sync)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--json", help="write the raw results here")
    parser.add_argument("--from-json", help="print the table of results written earlier with --json")
    args = parser.parse_args()

    if args.from_json:
        report(json.loads(Path(args.from_json).read_text()), args)
        return
    settings = [(f"scripted judge, {lat:g} s", lat) for lat in args.latency]
    if args.vllm_url:
        settings.append(("real vLLM judge", None))
    results: dict[str, dict[str, list[dict]]] = {}
    for label, latency in settings:
        for k in args.k:
            for seed in args.seeds:
                t = time.perf_counter()
                results.setdefault(label, {}).setdefault(str(k), []).append(run(args, latency, k, seed))
                print(f"[{label} k={k} seed={seed}] {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(results, indent=1))
    report(results, args)


def report(results: dict[str, dict[str, list[dict]]], args: argparse.Namespace) -> None:
    """Per teacher and mode: steps/min, the bound per step, the fraction of it reached, rewards.

    feedback = the sync run's wait per step (the teacher's latency for a batch);
    work = the run's own step minus its wait (sampling + update). The bound is
    work + feedback for sync (they run in turn) and max(work, feedback / k) with
    k batches of feedback in flight.
    """
    runs_ = next(iter(next(iter(results.values())).values()))
    print(f"\n{len(runs_)} seed(s), {len(runs_[0]['step_s'])} steps; times over steps 2+ (the first step waits "
          "for its own feedback in every mode); reward last3 mean +- std over seeds")
    print(f"{'teacher':24} {'mode':6} {'s/step':>6} {'steps/min':>9} {'x sync':>7} {'bound s/step':>12} "
          f"{'% of bound':>10} {'max stale':>9} {'reward first3':>13} {'reward last3':>15}")
    for label, by_k in results.items():
        sync = by_k.get("0")
        feedback = mean([mean(r["wait_s"][1:]) for r in sync]) if sync else float("nan")
        sync_step = mean([mean(r["step_s"][1:]) for r in sync]) if sync else float("nan")
        for k, runs in by_k.items():
            step = mean([mean(r["step_s"][1:]) for r in runs])
            work = mean([mean([s - w for s, w in zip(r["step_s"][1:], r["wait_s"][1:])]) for r in runs])
            bound = work + feedback if k == "0" else max(work, feedback / int(k))
            last = [mean(r["reward"][-3:]) for r in runs]
            spread = (sum((x - mean(last)) ** 2 for x in last) / (len(last) - 1)) ** 0.5 if len(last) > 1 else 0.0
            print(f"{label:24} {'sync' if k == '0' else f'k={k}':6} {step:6.2f} {60 / step:9.2f} "
                  f"{sync_step / step:7.2f} {bound:12.2f} {100 * bound / step:9.0f}% "
                  f"{max(max(r['staleness']) for r in runs):9d} {mean([mean(r['reward'][:3]) for r in runs]):13.3f} "
                  f"{mean(last):8.3f} +- {spread:.3f}")
    print("\nreward per step, mean over seeds:")
    for label, by_k in results.items():
        for k, runs in by_k.items():
            curve = [mean([r["reward"][i] for r in runs]) for i in range(min(len(r["reward"]) for r in runs))]
            print(f"  {label:24} {'sync' if k == '0' else f'k={k}':6} " + " ".join(f"{x:.2f}" for x in curve))


if __name__ == "__main__":
    main()

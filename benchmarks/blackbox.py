"""Distil from a black-box teacher model: on-policy against off-policy, per step and per dollar (issue #19).

Every row of `blackbox_rows.ROWS` trains the same student (SmolLM2-135M-Instruct)
for the same number of steps, prompts per step and samples per prompt, from
the same teacher (benchmarks/make_teacher.py's, served by vLLM: the loop sees
only `--teacher-url`), over several seeds. Each (row, seed) cell is evaluated
on the task's held-out split (greedy, and sampled at the training
temperature), on an unrelated task the rows never train on (forgetting:
times_table, greedy), and counts its teacher calls and tokens, their cost at
the stated prices, and its CPU time. Every cell is written to
OUT/cells/<mode>/<row>/seed<S>-lr<LR>.json as soon as it finishes; a rerun
skips the cells already there (and refuses cells made with other settings),
and the table (OUT/table.md, OUT/table.json) is rebuilt from the cells: mean
± sample standard deviation over seeds.

Learning rates: `--mode sweep` trains every row once (seed 0, `--sweep-steps`)
at each of `--lrs` and scores greedy accuracy on the task's validation split
(disjoint from the held-out one); `--mode table` then uses each row's best
swept lr (`--lr` for a row with no sweep cells, marked in the table).

    # the teacher (once): python benchmarks/make_teacher.py; then serve it:
    VLLM_PYTHON=... VLLM_MODEL_DIR=~/.cache/opd-sdk/teachers/running_total-smollm2 VLLM_SERVED_NAME=teacher \\
        VLLM_PORT=8012 .ci/start_vllm.sh
    python benchmarks/blackbox.py --mode sweep --teacher-url http://127.0.0.1:8012/v1 --out runs/blackbox
    python benchmarks/blackbox.py --mode table --teacher-url http://127.0.0.1:8012/v1 --out runs/blackbox
    python benchmarks/blackbox.py --tiny --out /tmp/bb   # every row in seconds: tiny models, scripted teacher

CPU time is this process's (the student's training and evaluation, all
threads; GAD's discriminator too); the teacher server's own CPU is not in it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from blackbox_rows import ROWS, Endpoint, RowContext, phase_steps

from opd_sdk.data import PromptItem
from opd_sdk.feedback.factory import make_collector
from opd_sdk.rollout.engine import TransformersRollout
from opd_sdk.tasks import check, first_wrong_step, get_task
from opd_sdk.train.evaluate import greedy_accuracy
from opd_sdk.train.trainer import Trainer

# Settings that change a cell's numbers: a cell saved with other values is not reused.
CELL_SETTINGS = ("student", "task_steps", "steps", "sweep_steps", "prompts_per_step", "group_size", "max_new_tokens",
                 "temperature", "eval_size", "eval_samples", "forget_size", "top_k", "control_shift",
                 "teacher_model", "eval_max_new_tokens")


def _right(text: str, item: PromptItem) -> bool:
    return check(text, item.answer or "")


# ----------------------------------------------------------------- data and student


def task_items(args) -> dict[str, list[PromptItem]]:
    """train, validation, heldout (running_total) and forget (times_table, every problem: no row trains on it)."""
    task = get_task("running_total")
    params = {} if args.task_steps is None else {"steps": args.task_steps}
    forget = get_task("times_table")
    forget_items = (forget.items("train") + forget.items("heldout"))[: args.forget_size]
    return {"train": task.items("train", args.n_train, seed=0, **params),
            "validation": task.items("validation", args.eval_size, seed=0, **params),
            "heldout": task.items("heldout", args.eval_size, seed=0, **params),
            "forget": forget_items}


def load_student(path: str, device: str = "cpu"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd_sdk.models import resolve_model_path

    where = resolve_model_path(path)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32).to(device)
    tokenizer = AutoTokenizer.from_pretrained(where)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def steps_right(texts: list[str], items: list[PromptItem]) -> float:
    """Partial credit: the mean share of each reference solution's lines (the "Answer: N" line too) that
    the answer gets right before its first wrong line (`tasks.first_wrong_step`); 1.0 = all right."""
    shares = []
    for text, item in zip(texts, items, strict=True):
        solution = item.metadata["solution"]
        n = len([line for line in solution.splitlines() if line.strip()])
        wrong = first_wrong_step(text, solution)
        shares.append(1.0 if wrong is None else wrong / n)
    return sum(shares) / len(shares)


def evaluate(model, tokenizer, items: dict, split: str, args, seed: int, *, full: bool = True) -> dict:
    """Greedy accuracy and steps right on `split`; with `full`, also sampled accuracy (temperature
    `args.temperature`, `eval_samples` a prompt) and greedy accuracy on the forgetting task."""
    model.eval()
    held = items[split]
    greedy = greedy_accuracy(model, tokenizer, held, _right, max_new_tokens=args.eval_max_new_tokens)
    result = {"greedy": greedy.accuracy, "steps_right": steps_right(greedy.completions, held),
              "examples": greedy.completions[:2]}
    if not full:
        return result
    torch.manual_seed(1000 + seed)
    engine = TransformersRollout(model, tokenizer, temperature=args.temperature,
                                 max_new_tokens=args.eval_max_new_tokens)
    batch = engine.sample(held, args.eval_samples)
    sampled = [_right(c.text, held[b // args.eval_samples]) for b, c in enumerate(batch.completions)]
    forget = greedy_accuracy(model, tokenizer, items["forget"], _right, max_new_tokens=8)
    return {**result, "sampled": sum(sampled) / len(sampled), "forget": forget.accuracy}


# ----------------------------------------------------------------- one cell


def cell_path(out: Path, mode: str, row: str, seed: int, lr: float | None) -> Path:
    return out / "cells" / mode / row / f"seed{seed}-lr{'none' if lr is None else f'{lr:g}'}.json"


def settings_of(args, mode: str) -> dict:
    """The settings a `mode` cell depends on (a sweep cell trains `sweep_steps`, a table cell `steps`)."""
    other = "steps" if mode == "sweep" else "sweep_steps"
    return {k: getattr(args, k) for k in CELL_SETTINGS if k != other}


def run_cell(row_name: str, seed: int, lr: float | None, mode: str, args, items: dict) -> dict:
    """Train one row for one seed (row "base": no training) and evaluate it; returns the cell."""
    model, tokenizer = load_student(args.student, args.device)
    torch.manual_seed(seed)
    steps = args.sweep_steps if mode == "sweep" else args.steps
    usage = {"api_calls": 0, "requests_sent": 0, "prompt_tokens": 0, "completion_tokens": 0, "failures": 0}
    history: list[dict] = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    if row_name != "base":
        row = ROWS[row_name]
        ctx = RowContext(student=model, tokenizer=tokenizer, steps=steps, group_size=args.group_size,
                         endpoint=Endpoint(args.teacher_url, args.teacher_model), max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, control_shift=args.control_shift)
        for phase, n in zip(row.phases, phase_steps(row, steps), strict=True):
            if n == 0:
                continue
            objective, teacher = phase.build(ctx)
            collector = make_collector(teacher, max_concurrency=args.max_concurrency, progress=False) if teacher else None
            trainer = Trainer(model, tokenizer, objective, collector, items["train"], max_steps=n, lr=lr,
                              prompts_per_step=args.prompts_per_step,
                              group_size=1 if phase.one_sample else args.group_size,
                              max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=seed,
                              save_every=0, progress=False, tensorboard=False)
            try:
                history += trainer.train()
            finally:
                trainer.close()
                if collector is not None:
                    for k in usage:  # the trainer's total: also the calls a teacher makes through its own
                        usage[k] += int(trainer.usage_total(k))  # collectors (GAD's reference teacher)
                    collector.close()
            model = trainer.model
    train_cpu, train_wall = time.process_time() - cpu0, time.perf_counter() - wall0
    sweep = mode == "sweep"
    result = evaluate(model, tokenizer, items, "validation" if sweep else "heldout", args, seed, full=not sweep)
    if not sweep and row_name in args.save_models and seed == min(args.seeds):
        model.save_pretrained(Path(args.out) / "models" / row_name)  # for `opd eval --exposure`
        tokenizer.save_pretrained(Path(args.out) / "models" / row_name)
    keys = ("loss/total", "teacher/failures", "rollout/completion_len_mean", "gad/accuracy", "gad/margin")
    trace = {k: [h.get(k) for h in history] for k in keys if any(h.get(k) is not None for h in history)}
    return {"row": row_name, "seed": seed, "lr": lr, "mode": mode, "steps": 0 if row_name == "base" else steps,
            **result, **usage, "train_cpu_s": train_cpu, "train_wall_s": train_wall,
            "cpu_s": time.process_time() - cpu0, "trace": trace, "settings": settings_of(args, mode)}


def cell(row: str, seed: int, lr: float | None, mode: str, args, items: dict, log=print) -> dict:
    """The saved cell when there is one (made with the same settings), else run it and save it."""
    path = cell_path(Path(args.out), mode, row, seed, lr)
    if path.exists():
        saved = json.loads(path.read_text())
        mine = settings_of(args, mode)
        diff = sorted(k for k, v in mine.items() if saved["settings"].get(k) != v)
        if diff:
            raise SystemExit(f"blackbox: {path} was made with other settings ({', '.join(diff)}); "
                             "use another --out, or delete the cells to redo them")
        return saved
    log(f"blackbox: {mode} {row} seed {seed} lr {lr} ...")
    result = run_cell(row, seed, lr, mode, args, items)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
    scores = " ".join(f"{k} {result[k]:.3f}" for k in ("greedy", "steps_right", "sampled", "forget") if k in result)
    log(f"blackbox: {mode} {row} seed {seed} lr {lr}: {scores}, teacher tokens "
        f"{result['prompt_tokens'] + result['completion_tokens']}, {result['cpu_s']:.0f} CPU s")
    return result


# ----------------------------------------------------------------- learning rates and the table


def best_lrs(out: Path, rows: list[str]) -> dict[str, float]:
    """Each row's lr with the best validation greedy accuracy among its sweep cells; ties go to the better
    steps right (partial credit: a short sweep often leaves every lr at the same accuracy), then the smaller lr."""
    best = {}
    for row in rows:
        cells = [json.loads(p.read_text()) for p in sorted((out / "cells" / "sweep" / row).glob("*.json"))]
        if cells:
            best[row] = max(cells, key=lambda c: (c["greedy"], c.get("steps_right", 0.0), -c["lr"]))["lr"]
    return best


def mean_spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for one value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def build_table(cells: list[dict], *, price_prompt: float, price_completion: float, swept: dict) -> tuple[str, list]:
    """Markdown table and its rows from table cells: per row, mean ± spread over seeds; gains are points of
    held-out greedy accuracy over the untrained student of the same seed; prices are $ per M tokens."""
    base = {c["seed"]: c for c in cells if c["row"] == "base"}
    names = ["base"] + [r for r in ROWS if any(c["row"] == r for c in cells)]
    names += sorted({c["row"] for c in cells} - set(names))
    head = ("| row | lr | seeds | held-out greedy % | held-out sampled % | steps right % | "
            "forgetting (times table) % | teacher calls | teacher tokens prompt / completion | cost $ | "
            "points / M teacher tokens | CPU s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    out = []
    for name in names:
        mine = sorted((c for c in cells if c["row"] == name), key=lambda c: c["seed"])
        if not mine:
            continue

        def pct(key: str, mine: list[dict] = mine) -> str:
            m, s = mean_spread([100 * c[key] for c in mine])
            return f"{m:.1f} ± {s:.1f}"

        tokens = [c["prompt_tokens"] + c["completion_tokens"] for c in mine]
        cost = [(c["prompt_tokens"] * price_prompt + c["completion_tokens"] * price_completion) / 1e6 for c in mine]
        gains = [100 * (c["greedy"] - base[c["seed"]]["greedy"]) for c in mine if c["seed"] in base]
        per_m = ([g / (t / 1e6) for g, t in zip(gains, tokens, strict=True) if t > 0]
                 if len(gains) == len(mine) else [])
        lr = "-" if name == "base" else f"{mine[0]['lr']:g}" + ("" if name in swept else " (not swept)")
        row = {"row": name, "lr": mine[0]["lr"], "seeds": [c["seed"] for c in mine],
               "greedy": mean_spread([c["greedy"] for c in mine]), "sampled": mean_spread([c["sampled"] for c in mine]),
               "forget": mean_spread([c["forget"] for c in mine]),
               "steps_right": mean_spread([c["steps_right"] for c in mine]),
               "teacher_calls": statistics.mean(c["api_calls"] for c in mine),
               "prompt_tokens": statistics.mean(c["prompt_tokens"] for c in mine),
               "completion_tokens": statistics.mean(c["completion_tokens"] for c in mine),
               "cost_usd": statistics.mean(cost), "gain_points": mean_spread(gains) if gains else None,
               "points_per_m_tokens": mean_spread(per_m) if per_m else None,
               "cpu_s": statistics.mean(c["cpu_s"] for c in mine)}
        out.append(row)
        ppm = f"{row['points_per_m_tokens'][0]:.1f} ± {row['points_per_m_tokens'][1]:.1f}" if per_m else "-"
        lines.append(f"| {name} | {lr} | {len(mine)} | {pct('greedy')} | {pct('sampled')} | {pct('steps_right')} | "
                     f"{pct('forget')} | "
                     f"{row['teacher_calls']:.0f} | {row['prompt_tokens']:.0f} / {row['completion_tokens']:.0f} | "
                     f"{row['cost_usd']:.4f} | {ppm} | {row['cpu_s']:.0f} |")
    return "\n".join(lines), out


# ----------------------------------------------------------------- the run


def run(args, log=print) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    items = task_items(args)
    rows = list(args.rows)
    t0 = time.perf_counter()
    if args.mode == "sweep":
        cells = [cell(r, 0, lr, "sweep", args, items, log) for r in rows for lr in args.lrs]
        best = best_lrs(out, rows)
        (out / "best_lrs.json").write_text(json.dumps(best, indent=1))
        log(f"blackbox: best lr per row (validation greedy accuracy): {best}")
        return {"cells": cells, "best_lrs": best, "wall_s": time.perf_counter() - t0}
    swept = best_lrs(out, rows)
    cells = [cell("base", s, None, "table", args, items, log) for s in args.seeds]
    cells += [cell(r, s, swept.get(r, args.lr), "table", args, items, log) for s in args.seeds for r in rows]
    table, table_rows = build_table(cells, price_prompt=args.price_prompt, price_completion=args.price_completion,
                                    swept=swept)
    note = (f"Task running_total ({args.task_steps or 3} steps), held-out {args.eval_size} problems, student "
            f"{args.student}, teacher `{args.teacher_model}` over HTTP; {args.steps} steps x {args.prompts_per_step} "
            f"prompts x {args.group_size} samples, {args.max_new_tokens} new tokens, T={args.temperature}; "
            f"mean ± std over seeds {args.seeds}; prices ${args.price_prompt}/M prompt, "
            f"${args.price_completion}/M completion tokens.")
    (out / "table.md").write_text(note + "\n\n" + table + "\n")
    (out / "table.json").write_text(json.dumps({"note": note, "rows": table_rows}, indent=1))
    log(note + "\n\n" + table)
    return {"cells": cells, "table": table, "rows": table_rows, "wall_s": time.perf_counter() - t0}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=("table", "sweep"), default="table")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--student", default="smollm2")
    ap.add_argument("--teacher-url", default="http://127.0.0.1:8012/v1")
    ap.add_argument("--teacher-model", default="teacher", help="the served model name")
    ap.add_argument("--task-steps", type=int, default=None, help="running_total's chain length (default 3)")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--sweep-steps", type=int, default=3)
    ap.add_argument("--lrs", nargs="+", type=float, default=[2e-5, 1e-4])
    ap.add_argument("--lr", type=float, default=2e-5, help="for a row without sweep cells")
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--eval-max-new-tokens", type=int, default=40)
    ap.add_argument("--temperature", type=float, default=1.0, help="training sampling, teacher references, "
                    "and the sampled held-out accuracy")
    ap.add_argument("--eval-size", type=int, default=48)
    ap.add_argument("--eval-samples", type=int, default=1)
    ap.add_argument("--forget-size", type=int, default=48)
    ap.add_argument("--top-k", type=int, default=5, help="GKD's teacher top-k")
    ap.add_argument("--control-shift", type=float, default=1.0, help="the control's constant negative advantage")
    ap.add_argument("--max-concurrency", type=int, default=8)
    ap.add_argument("--price-prompt", type=float, default=0.10, help="$ per M teacher prompt tokens")
    ap.add_argument("--price-completion", type=float, default=0.40, help="$ per M teacher completion tokens")
    ap.add_argument("--device", default="cpu", help="the student's: cpu or cuda (the Trainer's precision: auto)")
    ap.add_argument("--out", default="runs/blackbox")
    ap.add_argument("--save-models", nargs="*", default=[], choices=list(ROWS), metavar="ROW",
                    help="save these rows' first-seed table students to OUT/models/ROW (for opd eval --exposure)")
    ap.add_argument("--tiny", action="store_true", help="tiny random student and teacher (scripted HTTP server): "
                    "every row in seconds, for CI")
    return ap


TINY = {"steps": 2, "sweep_steps": 1, "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 6,
        "eval_max_new_tokens": 6, "eval_size": 3, "forget_size": 3, "n_train": 16, "top_k": 2, "lrs": [1e-3]}


def main(argv: list[str] | None = None, log=print) -> dict:
    args = parser().parse_args(argv)
    if not args.tiny:
        return run(args, log)
    # tiny: a random student and a random teacher (another seed) behind the scripted OpenAI-compatible server
    from tests.loop_fixtures import tiny_model, tiny_tokenizer
    from tests.model_server import ModelResponder
    from tests.scripted_server import ScriptedServer

    given = sys.argv[1:] if argv is None else argv
    for k, v in TINY.items():  # the tiny sizes, except where a flag was given
        if f"--{k.replace('_', '-')}" not in given:
            setattr(args, k, v)
    student = Path(args.out) / "tiny-student"  # kept beside the cells: a rerun resumes with the same student
    tok = tiny_tokenizer()
    if not (student / "config.json").exists():
        tiny_model(tok, seed=0).save_pretrained(student)
        tok.save_pretrained(student)
    with ExitStack() as stack:
        srv = stack.enter_context(ScriptedServer(ModelResponder(tiny_model(tok, seed=1), tok)))
        args.student, args.teacher_url = str(student), srv.base_url
        result = run(args, log)
        result["server_requests"] = srv.count
        return result


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()

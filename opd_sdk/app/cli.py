"""`opd`: the command line.

    opd train CONFIG.yaml [--set key.sub=value ...] [--resume [--allow-config-change] | --overwrite] [--check]
    opd eval  CONFIG.yaml [--model DIR] [--set ...] [--exposure [--samples N]]
    opd demo  [--out DIR] [--steps N] [--seed S]
    opd collect CONFIG.yaml [--batch] [--split train|eval|all] [--set ...]
    opd inspect CONFIG.yaml [--prompts N] [--out DIR] [--yes] [--threshold NAME=VALUE ...] [--set ...]

Every config error is reported as `opd: invalid config:` plus one line per
field, before any model loads, and the exit status is 2. A teacher's API key
is read from the environment variable the config names, never from the file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from opd_sdk.errors import OPDError
from opd_sdk.parallel.distributed import is_main_process, launched_world_size

RANK_EXIT_DELAY_S = 2.0  # ranks >= 1 wait this long before exiting on an error all ranks raised


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opd", description="On-policy distillation from black-box API teachers, and without any teacher."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:  # `opd NAME --help` says what it does too
        return sub.add_parser(name, help=text, description=text)

    def add_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", help="a YAML run config (see examples/configs/)")
        p.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
            help="override a config field, e.g. --set optimizer.lr=3e-6 (repeatable; values read as YAML)",
        )

    train = command("train", "run a distillation from a YAML config")
    add_config(train)
    again = train.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from output_dir's last checkpoint")
    again.add_argument("--overwrite", action="store_true", help="replace the run already in output_dir")
    train.add_argument(
        "--allow-config-change", action="store_true",
        help="with --resume: accept config changes that break the resumed run's exactness (group size, objective, "
             "teacher, lr, ...); they are listed either way",
    )
    train.add_argument(
        "--check", action="store_true", help="run every check that needs no model weights, print all problems, exit"
    )

    ev = command("eval", "held-out accuracy (verifier) or mean teacher score of a student")
    add_config(ev)
    ev.add_argument("--model", default=None, help="a saved student folder (default: the config's student)")
    ev.add_argument("--json", action="store_true", help="print the result as JSON")
    ev.add_argument("--exposure", action="store_true", help="exposure-bias meter: the teacher's log-loss of the "
                    "student's samples and of text it did not write, by answer position, and accuracy by first "
                    "wrong step (PNG + JSON in OUTPUT_DIR/exposure/); needs a log-prob teacher")
    ev.add_argument("--samples", type=int, default=4, help="--exposure: student samples per held-out prompt")

    col = command("collect", "ask the teacher(s) about the run's prompts into the feedback cache "
                                          "(references for SFT/SPIN/GAD, labels, eval scores)")
    add_config(col)
    col.add_argument("--batch", action="store_true", help="through the OpenAI Batch API: half price, within 24 h; "
                     "a killed run resumes its pending batch")
    col.add_argument("--split", choices=("train", "eval", "all"), default="train", help="which prompts (default train)")

    ins = command("inspect", "the teacher report: is each teacher worth paying for? (opd_sdk.app.inspect)")
    add_config(ins)
    ins.add_argument("--prompts", type=int, default=32, help="prompts of the run's data to sample (default 32)")
    ins.add_argument("--out", default=None, help="output folder (default OUTPUT_DIR/inspect)")
    ins.add_argument("--yes", action="store_true", help="do not ask before calling the teachers")
    ins.add_argument("--threshold", action="append", default=[], metavar="NAME=VALUE",
                     help="change when a teacher is unusable, e.g. --threshold min_usable=0.95 (repeatable)")

    demo = command("demo", "offline demo: distil SmolLM2-135M-Instruct with a verifier, no API key")
    demo.add_argument("--out", default="opd-demo", help="output folder (plot, metrics, trained student)")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: the tuned demo setting)")
    demo.add_argument("--seed", type=int, default=0)
    return parser


def _say(text: str) -> None:
    print(text, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cfg = None
    try:
        if args.command == "train":
            from opd_sdk.config.registry import load_and_check

            cfg, checked = load_and_check(args.config, args.overrides)  # every problem at once, before any model loads
            if args.check:
                if is_main_process():
                    _say(f"opd: {args.config} is valid")
                return 0
            from opd_sdk.app.runner import train

            summary = train(cfg, resume=args.resume, overwrite=args.overwrite, log=_say, checked=checked,
                            allow_config_change=args.allow_config_change)
            if is_main_process():  # one summary for a launched job
                _say(json.dumps(summary, indent=2))
        elif args.command == "eval":
            from opd_sdk.app.runner import run_eval
            from opd_sdk.config.run import load_config

            cfg = load_config(args.config, args.overrides)
            if args.exposure:
                from opd_sdk.app.exposure import format_table, run_exposure

                result = run_exposure(cfg, args.model, samples=args.samples)
                _say(json.dumps(result) if args.json else
                     f"{format_table(result)}\nopd: exposure written to {result['out_dir']}")
                return 0
            result = run_eval(cfg, args.model)
            if args.json:
                _say(json.dumps({k: v for k, v in result.items() if k != "completions"}))
            else:
                _say(
                    f"opd: held-out {result['metric']} {result['value']:.3f} "
                    f"({result['graded']} graded, {result['failures']} teacher failures)"
                )
        elif args.command == "collect":
            from opd_sdk.app.collect import collect
            from opd_sdk.config.run import load_config

            run_cfg = load_config(args.config, args.overrides)
            try:
                _say(json.dumps(collect(run_cfg, batch=args.batch, split=args.split, log=_say), indent=2))
            except KeyboardInterrupt:
                print("opd: interrupted; the answers received are in the feedback cache, and the same command "
                      "resumes a pending batch instead of paying for it again", file=sys.stderr)
                return 130
        elif args.command == "inspect":
            from opd_sdk.app.inspect import Thresholds, run_inspect
            from opd_sdk.config.registry import load_and_check

            thresholds = Thresholds.parse(args.threshold)
            cfg, checked = load_and_check(args.config, args.overrides)
            reports = run_inspect(cfg, checked, prompts=args.prompts, out_dir=args.out, yes=args.yes,
                                  thresholds=thresholds, log=_say)
            if reports is None:
                print("opd: inspect cancelled; no teacher was called", file=sys.stderr)
                return 1
            for r in (r for r in reports if r.problems):
                print(f"opd: {r.where} ({r.type}) is unusable: " + "; ".join(r.problems), file=sys.stderr)
            if any(r.problems for r in reports):
                return 1
        elif args.command == "demo":
            from opd_sdk.app.demo import run_demo

            run_demo(out_dir=args.out, steps=args.steps, seed=args.seed, log=_say)
    except OPDError as exc:
        if is_main_process():
            print(f"opd: {exc}", file=sys.stderr)
        else:  # every rank raised it: let rank 0 print before the launcher stops it for this exit
            time.sleep(RANK_EXIT_DELAY_S)
        return 2
    except KeyboardInterrupt:
        if is_main_process():
            print(f"opd: interrupted; {_after_interrupt(cfg)}", file=sys.stderr)
        return 130
    return 0


def _after_interrupt(cfg) -> str:
    """What the user can do after Ctrl-C / SIGTERM, from what the run left on disk."""
    if cfg is None:
        return "nothing was trained"
    from opd_sdk.train.checkpoint import latest_checkpoint

    # a job of several processes saves nothing on a stop (a peer may be gone): only its scheduled checkpoints
    several = launched_world_size() > 1
    note = f" (a job of several processes saves only every save_every={cfg.save_every} steps)" if several else ""
    last = latest_checkpoint(cfg.output_dir)
    if last is not None:
        saved = "is the newest" if several else "was saved"
        return f"checkpoint {last.name} {saved}{note}; `opd train CONFIG --resume` continues from it"
    partial = sorted(p.name.split(".")[0] for p in Path(cfg.output_dir).glob("step-*.tmp"))
    why = (f"it stopped while saving {partial[-1]}" if partial
           else "no checkpoint was saved yet" if several else "no step had finished")
    return (f"{why}{note}, so there is no complete checkpoint; `opd train CONFIG --overwrite` starts again "
            "(the feedback cache is kept: answers already paid for are not paid again)")


if __name__ == "__main__":
    sys.exit(main())

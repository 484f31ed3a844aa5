"""The Batch API round trip of `opd collect --batch`, against the scripted server's Files and
Batches routes: what the README shows.

It starts the scripted OpenAI-compatible server (tests/scripted_server.py) with the OpenAI
Files and Batches routes (tests/scripted_batches.py) and a teacher model that answers "What is
A times B?" with the product; writes a run config whose teacher is a `type: reference` teacher
on that server (teacher references for SFT / SPIN / GAD); and runs

    opd collect CONFIG --batch

printing what it logs (each batch created, its status as polled) and its summary. The first
batch fails two lines (in its error file, code server_error): they go out again in a second
batch. Then the same command once more: every answer comes from the cache, no batch is made.

    python benchmarks/batch_roundtrip.py [--prompts 8] [--out DIR]
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from opd_sdk.app.cli import main as opd
from tests.scripted_batches import BatchRoutes
from tests.scripted_server import ScriptedServer

CONFIG = """\
student: {{model: smollm2}}
data: {{task: times_table, task_params: {{n_train: {prompts}}}}}
teacher:
  type: reference
  model: teacher-m
  base_url: {base_url}
  temperature: 0.0
  max_tokens: 16
objective: {{type: sft}}
collector:
  price_per_1k_prompt_tokens: 0.00015     # gpt-4o-mini's synchronous prices; the batch pays half
  price_per_1k_completion_tokens: 0.0006
  batch_poll_s: [0.2, 1.0]                 # the default polls every 5 s, doubling up to 5 min
logging: {{progress: false}}
output_dir: {out}
"""


def teacher_model(body: dict) -> str:
    """The product asked for in the last user turn."""
    a, b = map(int, re.findall(r"What is (\d+) times (\d+)", body["messages"][-1]["content"])[0])
    return f"{a} times {b} is {a * b}."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    args = parser.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="opd-batch-"))

    failed_once = {"5 times 3", "7 times 7"}

    def fate(custom_id: str, body: dict, n: int) -> str | None:
        asked = body["messages"][-1]["content"]
        return "fail" if n == 0 and any(f"What is {q}" in asked for q in failed_once) else None

    with ScriptedServer(teacher_model) as srv:
        routes = BatchRoutes(srv, fate=fate, finish_after=3)
        config = out / "collect.yaml"
        out.mkdir(parents=True, exist_ok=True)
        config.write_text(CONFIG.format(prompts=args.prompts, base_url=srv.base_url, out=out / "run"))
        for attempt in ("first run", "second run (all cached)"):
            print(f"$ opd collect {config.name} --batch        # {attempt}")
            status = opd(["collect", str(config), "--batch"])
            print(f"exit status {status}; batches created so far: {routes.created}, lines sent: {routes.lines_sent}, "
                  f"synchronous calls: {srv.count_path('/v1/chat/completions')}\n")
        print("$ head -3 run/collected.jsonl")
        print("".join((out / "run" / "collected.jsonl").read_text().splitlines(keepends=True)[:3]), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

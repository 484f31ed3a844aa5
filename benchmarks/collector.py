"""Feedback throughput: FeedbackCollector vs the usual ways of calling a judge.

Against the scripted OpenAI-compatible server (tests/scripted_server.py, run
in its own process so client and server do not share a GIL) with a fixed
latency, a server-side concurrency cap and randomly injected 429/5xx faults,
it measures feedback per second of:

  sequential   a loop over the plain sync `openai` client (its own retries on)
  threads-8    a ThreadPoolExecutor of 8 workers with the sync client (the
               pattern TRL's judges used)
  collector    FeedbackCollector(max_concurrency=cap) with a minimal judge on
               the AsyncOpenAI client, and the same judge on a bare
               httpx.AsyncClient (the collector's own overhead, without the
               openai client's per-call CPU cost)

The bound is the server's: cap / latency requests a second. Every answer is
checked against the scripted judge's rule, so "lost" counts missing or wrong
answers (it must be 0).

    python benchmarks/collector.py                      # 250 ms, cap 32, 5% faults
    python benchmarks/collector.py --latency 0.1 --n 1000  # the 100 ms variant

The client's CPU per request (the openai client costs a few ms a call) is
reported too: when cap / latency exceeds what one core can drive, the
bound is out of reach for any single-process Python client, and the table
says so (column "CPU ceiling" = 1 / client CPU seconds per request).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import openai  # noqa: E402

from opd_sdk import Completion, FeedbackCollector, FeedbackRequest, Score, TeacherError  # noqa: E402
from opd_sdk.constants import RETRIABLE_STATUS  # noqa: E402
from opd_sdk.retry import parse_retry_after  # noqa: E402
from tests.minimal_judge import MinimalJudge, answer_of, judge_prompt  # noqa: E402
from tests.scripted_server import ScriptedServer  # noqa: E402


def score_reply(body: dict) -> str:
    return f"Score: {len(answer_of(body)) % 10}"


def serve(conn, latency: float, cap: int, fault_rate: float, seed: int) -> None:
    """Child process: run the server, answer 'stats' / 'reset' / 'stop' over a pipe."""
    with ScriptedServer(score_reply, latency=latency, max_concurrency=cap, fault_rate=fault_rate,
                        seed=seed) as srv:
        conn.send(srv.base_url)
        while True:
            command = conn.recv()
            if command == "stats":
                faults: dict[str, int] = {}
                for r in srv.requests:
                    faults[r.fault] = faults.get(r.fault, 0) + 1
                conn.send({"count": srv.count, "max_in_flight": srv.max_in_flight,
                           "max_served": srv.max_served, "faults": faults})
            elif command == "reset":
                srv.reset_stats()
                conn.send(True)
            else:
                conn.send(True)
                return


def make_requests(n: int) -> list[FeedbackRequest]:
    return [FeedbackRequest(prompt=f"question {i}", completions=[Completion(text="y" * (i % 9) + f"-{i}")])
            for i in range(n)]


def expected(request: FeedbackRequest) -> float:
    return float(len(request.completions[0].text) % 10)


def sync_call(client: openai.OpenAI, request: FeedbackRequest) -> float | None:
    try:
        reply = client.chat.completions.create(
            model="judge", messages=[{"role": "user", "content": judge_prompt(request, request.completions[0].text)}],
            temperature=0.0)
        return float(reply.choices[0].message.content.split("Score:")[1])
    except Exception:  # counted as lost
        return None


def run_sequential(base_url: str, requests: list[FeedbackRequest]) -> list[float | None]:
    client = openai.OpenAI(base_url=base_url, api_key="sk-bench", max_retries=5)
    return [sync_call(client, r) for r in requests]


def run_threads(base_url: str, requests: list[FeedbackRequest], workers: int) -> list[float | None]:
    client = openai.OpenAI(base_url=base_url, api_key="sk-bench", max_retries=5)
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda r: sync_call(client, r), requests))


def run_collector(base_url: str, requests: list[FeedbackRequest], cap: int, backoff: float):
    async def go():
        judge = MinimalJudge(base_url, api_key="sk-bench")
        collector = FeedbackCollector(judge, max_concurrency=cap, progress=False, backoff_initial_s=backoff)
        results = await collector.collect(requests)
        await judge.aclose()
        return results, collector.usage

    results, usage = asyncio.run(go())
    return [r.scores[0] if isinstance(r, Score) else None for r in results], usage


class HttpxJudge:
    """The same judge on a bare httpx.AsyncClient: shows the collector's own overhead
    without the openai client's per-call cost."""

    id = "httpx-judge:1"

    def __init__(self, base_url: str) -> None:
        self._client = httpx.AsyncClient(base_url=base_url, timeout=30.0,
                                         limits=httpx.Limits(max_connections=1000, max_keepalive_connections=1000))

    async def feedback(self, request: FeedbackRequest) -> Score:
        body = {"model": "judge", "messages": [
            {"role": "user", "content": judge_prompt(request, request.completions[0].text)}]}
        try:
            reply = await self._client.post("/chat/completions", json=body)
        except httpx.TransportError as exc:
            raise TeacherError(f"connection error ({type(exc).__name__})", retriable=True) from exc
        if reply.status_code != 200:
            raise TeacherError(f"HTTP {reply.status_code}", retriable=reply.status_code in RETRIABLE_STATUS,
                               retry_after=parse_retry_after(reply.headers), status=reply.status_code)
        content = reply.json()["choices"][0]["message"]["content"]
        return Score(scores=[float(content.split("Score:")[1])])

    async def aclose(self) -> None:
        await self._client.aclose()


def run_collector_httpx(base_url: str, requests: list[FeedbackRequest], cap: int, backoff: float):
    async def go():
        judge = HttpxJudge(base_url)
        collector = FeedbackCollector(judge, max_concurrency=cap, progress=False, backoff_initial_s=backoff)
        results = await collector.collect(requests)
        await judge.aclose()
        return results, collector.usage

    results, usage = asyncio.run(go())
    return [r.scores[0] if isinstance(r, Score) else None for r in results], usage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=800, help="requests for the collector")
    ap.add_argument("--threads-n", type=int, default=400, help="requests for the thread pool")
    ap.add_argument("--seq-n", type=int, default=40, help="requests for the sequential loop (it is slow)")
    ap.add_argument("--latency", type=float, default=0.25)
    ap.add_argument("--cap", type=int, default=32, help="server concurrency cap")
    ap.add_argument("--fault-rate", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--backoff", type=float, default=0.1, help="collector's initial backoff (s)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    parent, child = mp.get_context("fork").Pipe()
    proc = mp.get_context("fork").Process(target=serve, args=(child, args.latency, args.cap, args.fault_rate,
                                                              args.seed), daemon=True)
    proc.start()
    base_url = parent.recv()
    bound = args.cap / args.latency
    rows = []

    def measure(name: str, concurrency: int, requests, fn):
        parent.send("reset")
        parent.recv()
        started, cpu_started = time.perf_counter(), time.process_time()
        out = fn(requests)
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        scores, usage = out if isinstance(out, tuple) else (out, None)
        lost = sum(s is None or s != expected(r) for s, r in zip(scores, requests)) + len(requests) - len(scores)
        parent.send("stats")
        stats = parent.recv()
        rate = len(requests) / wall
        rows.append((name, concurrency, len(requests), wall, rate, min(bound, concurrency / args.latency),
                     rate / bound, stats["count"], sum(v for k, v in stats["faults"].items() if k != "ok"),
                     stats["max_in_flight"], lost, 1000 * cpu / len(requests)))
        print(f"done: {name} {len(requests)} in {wall:.2f} s", file=sys.stderr)

    measure("sequential (sync openai)", 1, make_requests(args.seq_n), lambda q: run_sequential(base_url, q))
    measure(f"threads-{args.threads} (sync openai)", args.threads, make_requests(args.threads_n),
            lambda q: run_threads(base_url, q, args.threads))
    measure("FeedbackCollector (openai judge)", args.cap, make_requests(args.n),
            lambda q: run_collector(base_url, q, args.cap, args.backoff))
    measure("FeedbackCollector (httpx judge)", args.cap, make_requests(args.n),
            lambda q: run_collector_httpx(base_url, q, args.cap, args.backoff))
    parent.send("stop")
    parent.recv()
    proc.join(10)

    print(f"\nServer: latency {args.latency * 1000:.0f} ms, concurrency cap {args.cap}, "
          f"{args.fault_rate:.0%} injected faults (429 retry-after 0, 500, 503); "
          f"bound = cap / latency = {bound:.0f} feedback/s.\n")
    print("| method | concurrency | requests | wall s | feedback/s | its own bound | % of server bound "
          "| server saw | faults hit | max in flight | lost | client CPU ms/req | CPU ceiling /s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, conc, n, wall, rate, own, frac, seen, faults, inflight, lost, cpu_ms in rows:
        print(f"| {name} | {conc} | {n} | {wall:.2f} | {rate:.1f} | {own:.0f} | {frac:.1%} | {seen} | {faults} "
              f"| {inflight} | {lost} | {cpu_ms:.2f} | {1000 / cpu_ms:.0f} |")


if __name__ == "__main__":
    main()

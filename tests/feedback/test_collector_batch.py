"""FeedbackCollector(mode="batch"): teacher calls through the OpenAI Files and Batches API
(`opd_sdk.feedback.batch`), with the real openai client against the scripted server's batch
routes (`tests.scripted_batches`): one batch answers a collection at the batch price; failed,
expired and re-asked lines go out in a next batch; a process killed while its batch is pending
is resumed without a second batch."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from opd_sdk import FeedbackCollector, FeedbackFailure, Reference, Score
from opd_sdk.errors import ConfigError
from opd_sdk.feedback.cache import FeedbackCache
from opd_sdk.types import Completion, FeedbackRequest
from providers import JudgeTeacher, ReferenceTeacher
from tests.feedback import batch_script
from tests.providers.helpers import fenced_texts
from tests.scripted_batches import BatchRoutes
from tests.scripted_server import ScriptedServer

POLL = {"batch_poll_s": (0.02, 0.05), "progress": False}
PRICES = {"price_per_1k_prompt_tokens": 1.0, "price_per_1k_completion_tokens": 2.0}


def chat_reply(body: dict, content: str) -> dict:
    """A chat.completion with pinned usage: 100 prompt and 10 completion tokens."""
    return {"id": "c", "object": "chat.completion", "created": 0, "model": body.get("model", "m"),
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110}}


def grade(body: dict) -> dict:
    """The judge's verdict: the student's answer as the score ("7" -> 7)."""
    return chat_reply(body, json.dumps({"score": int(fenced_texts(body)[0])}))


def judge(srv: ScriptedServer) -> JudgeTeacher:
    return JudgeTeacher("judge-m", base_url=srv.base_url, api_key="sk-batch-test-key", structured="none")


def reqs(*answers: str) -> list[FeedbackRequest]:
    return [FeedbackRequest(prompt=f"Task {i}", completions=[Completion(text=a)]) for i, a in enumerate(answers)]


def answer_of(body: dict) -> str:
    return fenced_texts(body)[0]


async def test_one_batch_answers_the_collection_at_half_price_and_fills_the_cache(tmp_path):
    with ScriptedServer(grade) as srv:
        routes = BatchRoutes(srv)
        cache = tmp_path / "cache.sqlite"
        with FeedbackCollector(judge(srv), mode="batch", cache=cache, **POLL, **PRICES) as col:
            out = await col.collect([FeedbackRequest(prompt="Task", completions=[Completion(text="3"),
                                                                                 Completion(text="8")])]
                                    + reqs("5", "10"))
            assert [fb.scores for fb in out] == [[0.3, 0.8], [0.5], [1.0]]
            # 4 lines x (100 x $1 + 10 x $2) / 1000 x 0.5 (the batch discount) = $0.24
            assert col.usage.cost_usd == pytest.approx(0.24)
            assert (col.usage.requests_sent, col.usage.prompt_tokens, col.usage.completion_tokens) == (4, 400, 40)
            assert not (tmp_path / "cache.sqlite.batches.json").exists()  # read to the end: forgotten
            again = await col.collect(reqs("5", "10"))
        assert [fb.scores for fb in again] == [[0.5], [1.0]] and col.usage.cache_hits == 2
        assert (routes.created, routes.lines_sent) == (1, 4)
        assert srv.count_path("/v1/chat/completions") == 0  # nothing went to the synchronous route
        [line] = [ln for ln in routes.batches["batch_0"]["_lines"] if answer_of(ln["body"]) == "5"]
        assert line["url"] == "/v1/chat/completions" and line["body"]["model"] == "judge-m"
        with FeedbackCache(cache) as stored:
            assert len(stored) == 4  # a pointwise judge caches each completion's answer


async def test_a_partly_failed_batch_sends_only_the_failed_lines_again(tmp_path):
    def fate(custom_id, body, n):
        return "fail" if n == 0 and answer_of(body) in ("2", "4") else None

    with ScriptedServer(grade) as srv:
        routes = BatchRoutes(srv, fate=fate)
        with FeedbackCollector(judge(srv), mode="batch", cache=tmp_path / "c.sqlite", **POLL, **PRICES) as col:
            out = await col.collect(reqs("1", "2", "3", "4"))
        assert [fb.scores for fb in out] == [[0.1], [0.2], [0.3], [0.4]]
        assert routes.created == 2
        assert sorted(answer_of(ln["body"]) for ln in routes.batches["batch_1"]["_lines"]) == ["2", "4"]
        assert (col.usage.requests_sent, col.usage.retries) == (6, 2)
        assert col.usage.cost_usd == pytest.approx(4 * 0.06)  # failed lines carry no usage: not billed


async def test_an_expired_line_is_retried_then_becomes_a_batch_expired_failure(tmp_path):
    def fate(custom_id, body, n):
        return "expire" if answer_of(body) == "6" else None

    with ScriptedServer(grade) as srv:
        routes = BatchRoutes(srv, fate=fate)
        with FeedbackCollector(judge(srv), mode="batch", cache=tmp_path / "c.sqlite", max_retries=1,
                               **POLL) as col:
            ok, lost = await col.collect(reqs("5", "6"))
            assert isinstance(ok, Score) and ok.scores == [0.5]
            assert isinstance(lost, FeedbackFailure)
            assert (lost.error_type, lost.attempts, lost.retriable) == ("batch_expired", 2, True)
            assert "batch_expired" in lost.reason and col.usage.failures == 1
            assert [b["status"] for b in routes.batches.values()] == ["expired", "expired"]
            await col.collect(reqs("5", "6"))  # a failure is never cached: asked again
        assert routes.created == 4 and routes.lines_sent == 2 + 1 + 1 + 1


async def test_a_400_answer_is_read_by_the_teacher_and_not_sent_again(tmp_path):
    with ScriptedServer(grade) as srv:
        routes = BatchRoutes(srv, fate=lambda cid, body, n: 400 if answer_of(body) == "1" else None)
        with FeedbackCollector(judge(srv), mode="batch", cache=tmp_path / "c.sqlite", **POLL) as col:
            bad, good = await col.collect(reqs("1", "9"))
        assert isinstance(bad, FeedbackFailure) and (bad.error_type, bad.status) == ("client_error", 400)
        assert "scripted 400" in bad.reason and good.scores == [0.9]
        assert routes.created == 1


async def test_a_reask_after_an_unparsable_verdict_goes_out_in_a_second_batch(tmp_path):
    def garbled_first(body):
        if len(body["messages"]) == 2:  # system + the first ask
            return chat_reply(body, "I would say it is rather good.")
        return grade(body)

    with ScriptedServer(garbled_first) as srv:
        routes = BatchRoutes(srv)
        with FeedbackCollector(judge(srv), mode="batch", cache=tmp_path / "c.sqlite", **POLL, **PRICES) as col:
            [fb] = await col.collect(reqs("7"))
        assert fb.scores == [0.7] and fb.details["verdicts"][0]["attempts"] == 2
        assert routes.created == 2 and len(routes.batches["batch_1"]["_lines"][0]["body"]["messages"]) == 4
        assert col.usage.cost_usd == pytest.approx(2 * 0.06)  # the garbled answer was billed too


async def test_identical_sampling_calls_of_one_request_are_separate_lines(tmp_path):
    served = iter(range(100))

    with ScriptedServer(lambda body: chat_reply(body, f"answer {next(served)}")) as srv:
        routes = BatchRoutes(srv)
        teacher = ReferenceTeacher("ref-m", base_url=srv.base_url, api_key="sk-x", n=3, n_per_call=False)
        with FeedbackCollector(teacher, mode="batch", cache=tmp_path / "c.sqlite", **POLL) as col:
            [ref] = await col.collect(reqs("x"))
        assert isinstance(ref, Reference)
        assert sorted(c.text for c in ref.completions) == ["answer 0", "answer 1", "answer 2"]
        assert routes.lines_sent == 3 and len({ln["custom_id"] for ln in routes.batches["batch_0"]["_lines"]}) == 3


async def test_a_server_without_the_batch_api_is_a_config_error_that_says_so(tmp_path):
    with ScriptedServer(grade) as srv:
        col = FeedbackCollector(judge(srv), mode="batch", cache=tmp_path / "c.sqlite", **POLL)
        with col, pytest.raises(ConfigError, match="does not serve the Batch API.*404.*mode='online'"):
            await col.collect(reqs("1"))


def test_batch_mode_refuses_no_cache_a_bad_mode_and_a_teacher_without_an_endpoint(tmp_path):
    teacher = JudgeTeacher("m", base_url="http://127.0.0.1:9/v1", api_key="sk-x")
    with pytest.raises(ConfigError, match="needs a cache"):
        FeedbackCollector(teacher, mode="batch")
    with pytest.raises(ConfigError, match="'online' or 'batch'"):
        FeedbackCollector(teacher, mode="batched", cache=tmp_path / "c.sqlite")
    with pytest.raises(ConfigError, match="batch_discount"):
        FeedbackCollector(teacher, mode="batch", cache=tmp_path / "c.sqlite", batch_discount=1.0)

    class Plain:
        id = "plain:1"

        async def feedback(self, request):
            raise AssertionError("not called")

    with pytest.raises(ConfigError, match="Plain .*mode='online'"):
        FeedbackCollector(Plain(), mode="batch", cache=tmp_path / "c.sqlite")


def test_a_process_killed_while_its_batch_is_pending_is_resumed_without_a_second_batch(tmp_path):
    cache = tmp_path / "cache.sqlite"
    ledger = tmp_path / "cache.sqlite.batches.json"
    with ScriptedServer(grade) as srv:
        routes = BatchRoutes(srv, hold=True)
        child = subprocess.Popen([sys.executable, "-m", "tests.feedback.batch_script", srv.base_url, str(cache)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ))
        try:
            deadline = time.monotonic() + 120
            while not (routes.created == 1 and routes.retrieves >= 2 and ledger.exists()):
                assert child.poll() is None, child.stderr.read().decode()[-2000:]
                assert time.monotonic() < deadline, "the child never created its batch"
                time.sleep(0.1)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(30)
        assert child.returncode == -signal.SIGKILL
        [entry] = json.loads(ledger.read_text())["batches"]
        assert entry["id"] == "batch_0" and len(entry["custom_ids"]) == 4
        assert "sk-batch-test-key" not in ledger.read_text()

        routes.hold = False  # the batch finishes while nobody polls it
        teacher = batch_script.judge(srv.base_url)
        with FeedbackCollector(teacher, mode="batch", cache=cache, batch_poll_s=batch_script.POLL_S,
                               progress=False) as col:
            out = col.collect_sync(batch_script.requests())
        assert [fb.scores for fb in out] == [[0.0], [0.2], [0.4], [0.6]]
        assert routes.created == 1  # resumed, not paid again
        assert srv.count_path("/v1/files") == 1 and not ledger.exists()
        assert col.usage.api_calls == 4


async def test_a_stored_batch_the_server_does_not_know_is_sent_anew(tmp_path):
    with ScriptedServer(grade) as srv:
        routes = BatchRoutes(srv)
        teacher = judge(srv)
        with FeedbackCollector(teacher, mode="batch", cache=tmp_path / "c.sqlite", **POLL) as col:
            await col.collect(reqs("3"))  # learn the line's custom_id
            [cid] = [ln["custom_id"] for ln in routes.batches["batch_0"]["_lines"]]
            ledger = tmp_path / "c.sqlite.batches.json"
            ledger.write_text(json.dumps({"batches": [{"id": "batch_gone", "base_url": srv.base_url,
                                                       "url": "/v1/chat/completions", "custom_ids": [cid]}]}))
            col.cache.clear()
            [fb] = await col.collect(reqs("3"))
        assert fb.scores == [0.3] and routes.created == 2 and not ledger.exists()


async def test_a_spent_budget_creates_no_further_batch(tmp_path):
    def garbled(body):
        return chat_reply(body, "no verdict here")

    with ScriptedServer(garbled) as srv:
        routes = BatchRoutes(srv)
        with FeedbackCollector(judge(srv), mode="batch", cache=tmp_path / "c.sqlite", budget_usd=0.05, **POLL,
                               **PRICES) as col:
            [fb] = await col.collect(reqs("3"))
        # the first batch cost (100 x $1 + 10 x $2) / 1000 x 0.5 = $0.06 >= $0.05: the re-ask is not sent
        assert isinstance(fb, FeedbackFailure) and fb.error_type == "budget" and "budget of $0.0500" in fb.reason
        assert routes.created == 1 and col.usage.budget_skipped == 1
        assert col.usage.cost_usd == pytest.approx(0.06)


async def test_polls_wait_longer_each_time_up_to_the_cap_and_show_progress(tmp_path, capsys):
    with ScriptedServer(grade) as srv:
        BatchRoutes(srv, finish_after=4)
        with FeedbackCollector(judge(srv), mode="batch", cache=tmp_path / "c.sqlite", batch_poll_s=(0.1, 0.2),
                               progress=True) as col:
            await col.collect(reqs("3", "4"))
        polls = [r.arrived for r in srv.requests if r.method == "GET" and r.path == "/v1/batches/batch_0"]
    gaps = [b - a for a, b in itertools.pairwise(polls)]
    assert len(polls) == 4 and gaps[0] >= 0.1 and gaps[1] >= 0.2 and 0.2 <= gaps[2] < 0.38  # 0.1, 0.2, capped 0.2
    assert "batch batch_0" in capsys.readouterr().err  # the bar: lines done of total, status


async def test_a_batch_api_outage_sends_the_lines_again_in_the_next_round(tmp_path):
    with ScriptedServer(grade) as srv:
        routes = BatchRoutes(srv)
        outage = iter(range(3))  # the first create and the openai client's own 2 retries of it answer 500

        def flaky(method, path, headers, raw):
            if method == "POST" and path == "/v1/batches" and next(outage, None) is not None:
                return 500, json.dumps({"error": {"message": "scripted outage", "type": "server_error"}}).encode()
            return routes(method, path, headers, raw)

        srv.routes = flaky
        with FeedbackCollector(judge(srv), mode="batch", cache=tmp_path / "c.sqlite", **POLL) as col:
            [fb] = await col.collect(reqs("8"))
        assert fb.scores == [0.8] and routes.created == 1
        assert srv.count_path("/v1/files") == 2 and srv.count_path("/v1/batches") == 4  # 3 refused + 1 created


async def test_a_poll_that_keeps_failing_leaves_the_paid_batch_for_the_next_run(tmp_path):
    with ScriptedServer(grade) as srv:
        routes = BatchRoutes(srv)
        down = True

        def flaky(method, path, headers, raw):
            if down and method == "GET" and path.startswith("/v1/batches/"):
                return 503, json.dumps({"error": {"message": "scripted outage", "type": "server_error"}}).encode()
            return routes(method, path, headers, raw)

        srv.routes = flaky
        with FeedbackCollector(judge(srv), mode="batch", cache=tmp_path / "c.sqlite", **POLL) as col:
            [lost] = await col.collect(reqs("8"))
            assert isinstance(lost, FeedbackFailure) and lost.error_type == "batch_api" and lost.retriable
            assert "batch_0 is resumed by the next run" in lost.reason
            assert "batch_0" in (tmp_path / "c.sqlite.batches.json").read_text()
            down = False
            [fb] = await col.collect(reqs("8"))
        assert fb.scores == [0.8] and routes.created == 1  # the batch already paid for was read, not made again

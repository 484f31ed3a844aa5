"""The money path (#22 items 1-4, #24 items 2, 3, 12): every paid call counted, the budget held
before a call is sent, nothing paid twice, the cache knows when a teacher changed, a refused
key or a dead server fails fast and says where. Calls are counted AT THE SERVER (the scripted
server) and compared with what `collector.usage` says.

Every reply of the scripted server here carries usage of 20 prompt + 5 completion tokens; at
$1 per 1k tokens (both) a call costs 25 / 1000 = $0.025.
"""

from __future__ import annotations

import logging
import socket
import time

import pytest

from opd_sdk import (
    Completion,
    ConfigError,
    FeedbackCollector,
    FeedbackFailure,
    FeedbackRequest,
)
from opd_sdk.feedback.teacher import callable_fingerprint
from opd_sdk.feedback.usage import Usage
from providers import JudgeTeacher, PreferenceTeacher, VerifierTeacher
from providers.compose import Gate, WeightedSum
from tests.scripted_server import Fault, ScriptedServer

PRICE = {"price_per_1k_prompt_tokens": 1.0, "price_per_1k_completion_tokens": 1.0}
CALL_USD = 0.025


def reply(content: str) -> dict:
    """A chat completion whose usage is 20 + 5 tokens ($0.025 at PRICE)."""
    return {"id": "c", "object": "chat.completion", "created": 0, "model": "judge",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25}}


def req(*texts: str, prompt: str = "What is 12 + 7?", **kw) -> FeedbackRequest:
    return FeedbackRequest(prompt=prompt, completions=[Completion(text=t) for t in texts], **kw)


def collector(teacher, **kw) -> FeedbackCollector:
    kw = {"backoff_initial_s": 0.001, "backoff_max_s": 0.002, **kw}
    return FeedbackCollector(teacher, **kw)


# ----- #22.1 every response that carried usage is counted -----------------------------------------

def test_a_garbled_judge_pays_for_every_reask_and_retry_and_usage_says_so():
    """Prose with no score: 3 calls (the first and 2 re-asks), billed; all 3 counted. A verdict that
    never parses is not retried (tests/providers/test_judge_nonanswers.py), so 18 calls became 3."""
    with ScriptedServer(lambda body: reply("The answer looks fine to me.")) as srv:
        judge = JudgeTeacher("judge", base_url=srv.base_url, api_key="k", max_reasks=2, structured="none")
        with collector(judge, max_retries=5, **PRICE) as coll:
            [out] = coll.collect_sync([req("19")])
        u = coll.usage
    assert isinstance(out, FeedbackFailure) and out.error_type == "bad_response"
    assert srv.count == 3
    assert (u.requests_sent, u.http_calls, u.calls_paid, u.calls_answered, u.calls_failed) == (1, 3, 3, 0, 3)
    assert (u.prompt_tokens, u.completion_tokens) == (60, 15)
    assert u.cost_usd == pytest.approx(3 * CALL_USD)


@pytest.mark.parametrize("choice", [
    {"finish_reason": "length", "message": {"role": "assistant", "content": '{"sco'}},  # cut off
    {"finish_reason": "stop", "message": {"role": "assistant", "content": None, "refusal": "I can't help"}},
    {"finish_reason": "content_filter", "message": {"role": "assistant", "content": ""}},
])
def test_truncated_refused_and_filtered_replies_are_paid_and_failed_never_answered(choice):
    body = {**reply(""), "choices": [{"index": 0, **choice}]}
    with ScriptedServer(lambda b: body) as srv:
        judge = JudgeTeacher("judge", base_url=srv.base_url, api_key="k", structured="none")
        with collector(judge, max_retries=1, **PRICE) as coll:
            [out] = coll.collect_sync([req("19")])
        u = coll.usage
    assert isinstance(out, FeedbackFailure) and srv.count >= 1
    assert (u.http_calls, u.calls_paid, u.calls_failed, u.calls_answered) == (srv.count,) * 3 + (0,)
    assert u.cost_usd == pytest.approx(srv.count * CALL_USD)


def test_a_200_with_an_error_body_and_a_400_schema_fallback_are_http_calls_apart_from_requests():
    """4 requests; the server refuses response_format (400, not billed), then answers; one 200 carries an
    error object with usage (billed) and is retried. The HTTP calls counted equal the server's."""
    def respond(body):
        return reply('{"score": 7}')

    def faults(i, body):
        if "response_format" in body:
            return Fault.status(400, message="response_format is not supported")
        return Fault.error_in_200("overloaded", type="server_error") if i == 3 else None

    with ScriptedServer(respond, faults=faults) as srv:
        judge = JudgeTeacher("judge", base_url=srv.base_url, api_key="k", structured="auto")
        with collector(judge, max_concurrency=1, **PRICE) as coll:
            out = coll.collect_sync([req(str(i)) for i in range(4)])
        u = coll.usage
    assert [o.kind for o in out] == ["score"] * 4
    # request 0: 400 then 200; requests 1-3 (schema off for good): one call each, but one 200 held an error
    assert srv.count == 6 and u.http_calls == 6 and u.requests_sent == 5
    assert (u.calls_answered, u.calls_failed) == (4, 2)  # the 400 and the error body


# ----- #22.2 the budget is checked before a call is sent --------------------------------------------

def test_the_budget_is_checked_before_each_call_so_a_garbled_judge_cannot_overshoot_it():
    """budget $0.05 = two calls. Before: 5 requests x 18 calls went on to $2.25."""
    with ScriptedServer(lambda body: reply("no idea"), latency=0.02) as srv:
        judge = JudgeTeacher("judge", base_url=srv.base_url, api_key="k", max_reasks=2, structured="none")
        with collector(judge, max_retries=5, max_concurrency=4, budget_usd=0.05, **PRICE) as coll:
            out = coll.collect_sync([req(f"{i}") for i in range(5)])
        u = coll.usage
    assert srv.count == 2 and u.calls_paid == 2 and u.cost_usd == pytest.approx(0.05)
    assert [o.error_type for o in out] == ["budget"] * 5


def test_spend_survives_a_resume_and_calls_paid_in_a_killed_step_reach_the_cost(tmp_path):
    """A checkpoint holds the counters and the journal's offset; the calls paid after it (a step that was
    killed) are in the journal; the resumed collector continues from both, and its budget is the run's."""
    journal = tmp_path / "teacher_spend-0.jsonl"
    with ScriptedServer(lambda body: reply('{"score": 7}')) as srv:
        judge = JudgeTeacher("judge", base_url=srv.base_url, api_key="k", structured="none")
        with collector(judge, **PRICE) as first:
            first.usage.journal = journal
            first.collect_sync([req("a"), req("b")])
            saved, offset = first.usage.as_dict(), first.usage.journal_offset()  # the checkpoint
            first.collect_sync([req("c"), req("d"), req("e")])  # the step that was killed
        assert srv.count == 5
        again = collector(judge, budget_usd=0.125, **PRICE)
        again.usage.journal = journal
        again.usage.restore(saved, journal_offset=offset)
        u = again.usage
        assert (u.requests_sent, u.http_calls, u.calls_paid) == (5, 5, 5)  # counters did not restart at 0
        assert u.cost_usd == pytest.approx(5 * CALL_USD)
        with again:
            [out] = again.collect_sync([req("f")])  # $0.125 spent: the run's budget is used up
        assert out.error_type == "budget" and srv.count == 5


def test_usage_restore_reads_old_checkpoints_and_skips_a_line_cut_off_by_a_kill(tmp_path):
    journal = tmp_path / "j.jsonl"
    journal.write_text('{"http_calls":1,"calls_paid":1,"calls_answered":1,"cost_usd":0.5}\n{"http_calls":1,"ca')
    u = Usage(journal=journal)
    u.restore({"requests_sent": 3, "cost_usd": 1.0})
    assert (u.requests_sent, u.http_calls, u.calls_paid, u.api_calls, u.cost_usd) == (3, 1, 1, 1, 1.5)


# ----- #22.3 a transient error does not re-pay the siblings ---------------------------------------

def test_pairwise_preference_retries_only_the_verdict_call_that_failed():
    """3 completions: 6 verdict calls; one answers 503. Before: all 6 asked again (12 billed)."""
    with ScriptedServer(lambda body: reply('{"winner": "A"}'),
                        faults=lambda i, body: Fault.status(503) if i == 2 else None) as srv:
        teacher = PreferenceTeacher("judge", base_url=srv.base_url, api_key="k", structured="none")
        with collector(teacher, **PRICE) as coll:
            [out] = coll.collect_sync([req("a", "b", "c")])
        u = coll.usage
    assert out.kind == "preference" and len(out.pairs) == 3
    assert srv.count == 7 and (u.http_calls, u.calls_paid, u.calls_answered, u.calls_failed) == (7, 6, 6, 1)
    assert u.cost_usd == pytest.approx(6 * CALL_USD)


def test_gate_keeps_the_judges_answers_that_came_back_when_one_fails():
    """Gate(verifier, pointwise judge) on 3 right answers: 3 judge calls, one 503: 4 calls in all."""
    with ScriptedServer(lambda body: reply('{"score": 8}'),
                        faults=lambda i, body: Fault.status(503) if i == 1 else None) as srv:
        judge = JudgeTeacher("judge", base_url=srv.base_url, api_key="k", structured="none")
        gate = Gate(VerifierTeacher("numeric"), judge)
        with collector(gate, **PRICE) as coll:
            [out] = coll.collect_sync([req("19", "It is 19", "\\boxed{19}", metadata={"answer": "19"})])
        u = coll.usage
    assert out.scores == pytest.approx([0.8, 0.8, 0.8])
    assert srv.count == 4 and u.http_calls == 4 and u.calls_answered == 3 and u.requests_sent == 2


def test_weighted_sum_asks_only_the_part_that_failed_again():
    failed = []

    def faults(i, body):  # model b's first call fails
        if body["model"] == "b" and not failed:
            failed.append(i)
            return Fault.status(500)
        return None

    with ScriptedServer(lambda body: reply('{"score": 5}'), faults=faults) as srv:
        a = JudgeTeacher("a", base_url=srv.base_url, api_key="k", structured="none")
        b = JudgeTeacher("b", base_url=srv.base_url, api_key="k", structured="none")
        with collector(WeightedSum([(a, 0.5), (b, 0.5)]), **PRICE) as coll:
            [out] = coll.collect_sync([req("x")])
    models = [r.body["model"] for r in srv.requests]
    assert out.kind == "score" and models.count("a") == 1 and models.count("b") == 2


# ----- #22.4 the cache knows when a teacher changed -----------------------------------------------

def _check_v1(text, expected):
    return text.strip() == expected


def _check_v2(text, expected):  # the fix: same module, same name
    return text.strip().lower() == expected.lower()


LIMIT = 3


def _check_limit(text, expected):
    return len(text) <= LIMIT


def test_a_fixed_check_function_is_a_new_teacher_id(tmp_path, caplog, monkeypatch):
    _check_v2.__qualname__ = _check_v1.__qualname__
    _check_v2.__name__ = _check_v1.__name__
    old, new = VerifierTeacher(check=_check_v1), VerifierTeacher(check=_check_v2)
    assert old.id != new.id and VerifierTeacher(check=_check_v1).id == old.id
    before = callable_fingerprint(_check_limit)[0]
    monkeypatch.setattr(__import__(__name__, fromlist=["x"]), "LIMIT", 4)  # a module-level value it reads
    assert callable_fingerprint(_check_limit)[0] != before

    def make(limit):
        return lambda t, e: float(len(t) > limit)
    assert callable_fingerprint(make(1))[0] != callable_fingerprint(make(2))[0]  # captured values count

    class Model:  # a value that cannot be hashed: not cached, and the log says why
        __module__ = "torch.nn"
    model = Model()
    unknowable = VerifierTeacher(check=lambda t, e: model is not None)
    assert unknowable.uncached_reason and "cannot be hashed" in unknowable.uncached_reason
    from opd_sdk.feedback.factory import make_collector
    caplog.set_level(logging.WARNING)
    runner = make_collector(unknowable, cache=tmp_path / "c.sqlite")
    assert runner.cache is None and "no feedback cache" in caplog.text and "cannot be hashed" in caplog.text


def test_reward_model_payload_and_parser_code_are_in_its_id():
    from providers import RewardModelTeacher

    def parse(body, n):
        return body["r"]

    def parse_fixed(body, n):
        return [float(x) for x in body["r"]]
    parse_fixed.__qualname__ = parse.__qualname__
    a = RewardModelTeacher("http://127.0.0.1:1/r", parse_rewards=parse)
    b = RewardModelTeacher("http://127.0.0.1:1/r", parse_rewards=parse_fixed)
    assert a.id != b.id and a.uncached_reason is None


def test_a_changed_judge_prompt_template_is_a_new_id(monkeypatch):
    before = JudgeTeacher("judge", base_url="http://127.0.0.1:1/v1").id
    monkeypatch.setattr(JudgeTeacher, "pointwise_messages",
                        lambda self, request, text: [{"role": "user", "content": f"Grade: {text}"}])
    assert JudgeTeacher("judge", base_url="http://127.0.0.1:1/v1").id != before


# ----- #24.2 a refused key stops at once; a dead server fails fast, naming where ------------------

def test_a_refused_key_is_asked_once_and_names_model_url_and_the_fix_never_the_key():
    key = "sk-test-REFUSED-123456789"
    with ScriptedServer(lambda body: reply('{"score": 7}'), faults=lambda i, body: Fault.status(401)) as srv:
        judge = JudgeTeacher("judge-model", base_url=srv.base_url, api_key=key, structured="none")
        with collector(judge, max_concurrency=1, max_retries=5) as coll:
            out = coll.collect_sync([req(str(i)) for i in range(5)])
            again = coll.collect_sync([req("next step")])
    assert srv.count == 1 and all(o.error_type == "auth" for o in out + again)
    reason = out[0].reason
    assert "judge-model" in reason and srv.base_url in reason and "API key" in reason and key not in reason


def test_a_refused_connection_fails_fast_with_one_log_line_and_a_summary(caplog):
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = JudgeTeacher("judge-model", base_url=f"http://127.0.0.1:{port}/v1", api_key="k")
    caplog.set_level(logging.WARNING, logger="opd_sdk.feedback.collector")
    start = time.monotonic()
    with FeedbackCollector(judge, max_retries=5) as coll:
        out = coll.collect_sync([req(str(i)) for i in range(8)])
    assert time.monotonic() - start < 5 and coll.usage.requests_sent == 8  # one attempt each, no backoff
    assert all(o.error_type == "connection" and not o.retriable for o in out)
    assert f"judge-model at http://127.0.0.1:{port}/v1" in out[0].reason and "nothing is listening" in out[0].reason
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "7 more request(s) failed the same way" in lines[1]


# ----- #24.3 no key and no base URL: said before any call ------------------------------------------

def test_the_quickstart_without_a_key_or_base_url_says_what_is_missing(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ConfigError, match="OPENAI_API_KEY.*base_url"):
        JudgeTeacher("gpt-4o-mini")
    assert JudgeTeacher("m", base_url="http://127.0.0.1:1/v1").endpoint.model == "m"  # a local server needs no key


# ----- #24.12 close() after a failing request with siblings in flight is silent --------------------

def test_close_after_a_failing_logprob_request_with_siblings_in_flight_prints_nothing(capfd):
    from providers import LogprobTeacher
    from tests.providers.test_logprob import TOK, EchoTeacher

    def faults(i, body):  # the first call alone, then 4 siblings: one fails at once, 3 answer late
        return Fault.status(400, message="bad prompt") if i == 2 else (Fault.delay(0.5) if i else None)

    with ScriptedServer(EchoTeacher(), faults=faults) as srv:
        teacher = LogprobTeacher("m", tokenizer=TOK, use_chat_template=False, base_url=srv.base_url, api_key="k")
        coll = FeedbackCollector(teacher, max_retries=0)
        [out] = coll.collect_sync([req(*(f"ab{j}" for j in range(5)), prompt="Q: ")])
        assert all(r.finished is not None for r in srv.requests)  # no sibling left running unseen
        capfd.readouterr()
        coll.close()
    assert out.error_type == "client_error" and capfd.readouterr().err == ""


def test_an_auth_failure_stops_the_run_at_once_with_the_fix():
    import collections

    from opd_sdk.train.stop import must_stop, training_stopped

    kinds = collections.Counter({"auth": 1})
    assert must_stop(kinds, no_signal_streak=1, max_no_signal_steps=5)
    err = training_stopped(kinds, no_signal_streak=1, step=1, max_steps=5, teachers="judge:1", cost_usd=0.0,
                           output_dir=None)
    assert "refused the credentials" in str(err) and "OPENAI_API_KEY" in str(err)

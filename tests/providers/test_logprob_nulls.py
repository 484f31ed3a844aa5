"""Nulls from servers (issue #22 item 8): a log-prob endpoint that sends null for a token's log-prob,
a null prompt_logprobs entry or one that omits the token, is masked and counted, never a crash and
never a made-up number. Against the scripted echo server of test_logprob (numbers worked there)."""

from __future__ import annotations

import math

from opd_sdk import Completion, FeedbackCollector, FeedbackFailure, TokenLogprobs
from providers import LogprobTeacher
from tests.providers.helpers import client_for
from tests.providers.test_logprob import EOS, TOK, EchoTeacher, req
from tests.scripted_server import ScriptedServer


def with_nulls(body: dict) -> dict:
    """EchoTeacher's reply with the log-prob of every "b" token null, and, in prompt_logprobs, the
    entry of "b" null and the entry of "<eos>" without the sampled token."""
    out = EchoTeacher()(body)
    choice = out["choices"][0]
    tokens = choice["logprobs"]["tokens"]
    for k, t in enumerate(tokens):
        if t == "b":
            choice["logprobs"]["token_logprobs"][k] = None
            choice["prompt_logprobs"][k] = None
        if t == "<eos>":
            choice["prompt_logprobs"][k] = {"0": {"logprob": None, "rank": None, "decoded_token": " "}}
    return out


async def test_null_token_logprobs_are_masked_and_counted_not_a_type_error():
    with ScriptedServer(with_nulls) as srv:
        teacher = LogprobTeacher("m", client=client_for(srv), tokenizer=TOK, use_chat_template=False)
        with FeedbackCollector(teacher, progress=False) as col:
            [fb] = await col.collect([req(Completion(text="abc"))])
        assert isinstance(fb, TokenLogprobs), fb
        a, b, c = fb.logprobs[0]
        assert a == -0.7 and math.isnan(b) and c == -0.9  # lp("a") = -0.7, lp("c") = -0.9; "b" was null
        assert fb.n_missing() == 1


async def test_null_and_incomplete_prompt_logprobs_entries_are_masked_in_token_ids_mode():
    with ScriptedServer(with_nulls) as srv:
        teacher = LogprobTeacher("m", client=client_for(srv), tokenizer=TOK, use_chat_template=False,
                                 send="token_ids", top_k=2)
        fb = await teacher.feedback(req(Completion(text="ab", token_ids=[65, 66, EOS])))
        a, b, eos = fb.logprobs[0]
        assert a == -0.7 and math.isnan(b) and math.isnan(eos)  # "b": null entry; "<eos>": token omitted
        assert fb.top_k[0][1] == {}  # a null entry has no alternatives
        assert math.isnan(fb.top_k[0][2][0])  # a null alternative is missing, not 0
        assert fb.n_missing() == 3


async def test_an_echo_reply_without_text_offset_is_a_typed_failure_not_a_crash():
    def no_offsets(body: dict) -> dict:
        out = EchoTeacher()(body)
        out["choices"][0]["logprobs"]["text_offset"] = None
        return out

    with ScriptedServer(no_offsets) as srv:
        teacher = LogprobTeacher("m", client=client_for(srv), tokenizer=TOK, use_chat_template=False)
        with FeedbackCollector(teacher, max_retries=3, progress=False) as col:
            [fb] = await col.collect([req(Completion(text="abc"))])
        assert isinstance(fb, FeedbackFailure) and "text_offset" in fb.reason and not fb.retriable
        assert srv.count == 1


def test_a_custom_teachers_null_logprobs_are_missing_values():
    fb = TokenLogprobs(logprobs=[[None, -1.0]], top_k=[[{3: None}, {4: -0.5}]])
    assert math.isnan(fb.logprobs[0][0]) and math.isnan(fb.top_k[0][0][3]) and fb.n_missing() == 2

"""The scripted server itself: cap, records, fault script, seeded random faults, handlers."""

from __future__ import annotations

import asyncio
import time

import openai

from tests.scripted_server import Fault, ScriptedServer


async def test_cap_makes_extra_requests_wait_and_is_measured():
    with ScriptedServer(latency=0.1, max_concurrency=3) as srv:
        client = openai.AsyncOpenAI(base_url=srv.base_url, api_key="sk-x", max_retries=0)
        started = time.monotonic()
        replies = await asyncio.gather(*[client.completions.create(model="m", prompt=f"p{i}") for i in range(9)])
        elapsed = time.monotonic() - started
        await client.close()
    assert [r.choices[0].text for r in replies] == ["Score: 5"] * 9
    assert srv.max_served == 3 and srv.max_in_flight >= 4  # beyond the cap: they waited
    assert elapsed >= 0.29  # three waves of 0.1 s
    records = srv.requests
    assert [r.index for r in records] == list(range(9)) and all(r.has_auth for r in records)
    assert all("authorization" not in r.headers for r in records)
    assert sorted(r.body["prompt"] for r in records) == sorted(f"p{i}" for i in range(9))
    assert all(r.started is not None and r.finished >= r.started >= r.arrived for r in records)


def test_fault_queue_then_normal_and_seeded_random_faults():
    def run(**kwargs):
        with ScriptedServer(**kwargs) as srv:
            client = openai.OpenAI(base_url=srv.base_url, api_key="k", max_retries=0)
            for _ in range(40):
                try:
                    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
                except openai.APIError:
                    pass
            client.close()
            return [r.fault for r in srv.requests]

    assert run(faults=[Fault.status(500), None, Fault.rate_limit("1")])[:4] == ["http_500", "ok", "http_429", "ok"]
    a, b = run(fault_rate=0.25, seed=3), run(fault_rate=0.25, seed=3)
    assert a == b and 3 <= sum(f != "ok" for f in a) <= 20  # same seed, same faults
    assert set(a) <= {"ok", "http_429", "http_500", "http_503"}


def test_custom_handler_and_full_response_dicts():
    def chat(body):
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "full"}}]}

    with ScriptedServer(chat, handlers={"/v1/embeddings": lambda body: {
            "object": "list", "model": "e", "data": [{"object": "embedding", "index": 0, "embedding": [0.5]}],
            "usage": {"prompt_tokens": 1, "total_tokens": 1}}}) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="k", max_retries=0)
        reply = client.chat.completions.create(model="mm", messages=[{"role": "user", "content": "hi"}])
        emb = client.embeddings.create(model="e", input="x")
        client.close()
    assert reply.choices[0].message.content == "full" and reply.model == "mm"
    assert emb.data[0].embedding == [0.5]
    assert srv.count_path("/v1/embeddings") == 1 and srv.count == 2

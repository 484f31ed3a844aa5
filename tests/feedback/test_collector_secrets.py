"""The API key never reaches cache rows, logs, reprs or failure text."""

from __future__ import annotations

import logging
from pathlib import Path

from opd_sdk import Completion, FeedbackCollector, FeedbackFailure, FeedbackRequest
from tests.minimal_judge import MinimalJudge
from tests.scripted_server import Fault, ScriptedServer

KEY = "sk-test-NEVER-LEAK-9f8e7d6c5b4a"


async def test_api_key_never_leaks(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "cache.sqlite"
    faults = [Fault.status(401, message=f"Incorrect API key provided: {KEY}."), Fault.status(500)]
    with ScriptedServer(lambda body: "Score: 4", faults=faults) as srv:
        judge = MinimalJudge(srv.base_url, api_key=KEY)
        collector = FeedbackCollector(judge, cache=path, max_concurrency=1, backoff_initial_s=0.01)
        requests = [FeedbackRequest(prompt=f"q{i}", completions=[Completion(text=f"a{i}")]) for i in range(3)]
        results = await collector.collect(requests)
        assert all(r.has_auth for r in srv.requests)  # the key was sent ...
        assert all(KEY not in str(r.headers) for r in srv.requests)  # ... and the server kept no copy
        await judge.aclose()
    failure = results[0]
    assert isinstance(failure, FeedbackFailure) and (failure.error_type, failure.status) == ("auth", 401)
    # a refused key stops the teacher: the other requests are not sent (#24.2), one call in all
    assert [(r.kind, r.error_type) for r in results[1:]] == [("failure", "auth")] * 2 and srv.count == 1
    assert "Incorrect API key provided" in failure.reason  # the message survives, the key does not
    texts = [failure.reason, failure.model_dump_json(), caplog.text, repr(collector), repr(judge),
             repr(collector.cache), str(collector.usage)]
    for text in texts:
        assert KEY not in text and KEY[3:] not in text
    collector.close()
    for file in Path(tmp_path).iterdir():  # the sqlite file and its WAL, byte for byte
        assert KEY.encode() not in file.read_bytes()
    assert "Incorrect API key provided" in caplog.text  # the failure was logged (redacted)


async def test_key_in_a_teacher_error_is_redacted(caplog):
    """An unexpected exception now propagates (a bug); a TeacherError's text is redacted in the failure."""
    from opd_sdk.errors import ServerError

    class Leaky:
        id = "leaky:1"

        async def feedback(self, request):
            raise ServerError(f"client blew up with Authorization: Bearer {KEY}", retriable=False)

    request = FeedbackRequest(prompt="q", completions=[Completion(text="a")])
    [failure] = await FeedbackCollector(Leaky()).collect([request])
    assert isinstance(failure, FeedbackFailure) and failure.error_type == "server_error"
    assert "client blew up" in failure.reason
    assert KEY not in failure.reason and KEY not in caplog.text

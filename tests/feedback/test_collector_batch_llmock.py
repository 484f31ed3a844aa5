"""FeedbackCollector(mode="batch") against LLMock's Files and Batches routes (`pip install
llmock`): a mock of the OpenAI Batch API we did not write, so the line, output and file formats
we read are checked against someone else's reading of the OpenAI reference. LLMock answers every
batch line with its own mock text, so the teacher here is a ReferenceTeacher (any text is a
reference). Skipped when llmock is not installed.
"""

from __future__ import annotations

import pytest

pytest.importorskip("llmock")

from llmock.routers import batch as llmock_batch

from opd_sdk import FeedbackCollector, Reference
from opd_sdk.types import Completion, FeedbackRequest
from providers import ReferenceTeacher


async def test_references_collected_through_llmock_batches_at_half_price(llmock, tmp_path, monkeypatch):
    monkeypatch.setattr(llmock_batch, "_BATCH_DELAY", 0.2)  # its batches end 0.2 s after creation (default 3 s)
    teacher = ReferenceTeacher("gpt-4o-mini", base_url=llmock.base_url("openai"), api_key="llmock-test-key",
                               max_tokens=32)
    requests = [FeedbackRequest(prompt=f"Say hello to number {i}.", completions=[Completion(text="-")])
                for i in range(3)]
    with FeedbackCollector(teacher, mode="batch", cache=tmp_path / "c.sqlite", batch_poll_s=(0.1, 0.2),
                           progress=False, price_per_1k_prompt_tokens=1.0, price_per_1k_completion_tokens=1.0) as col:
        out = await col.collect(requests)
    assert all(isinstance(fb, Reference) and fb.completions[0].text for fb in out)
    paths = [(r.method, r.path) for r in llmock.requests]
    assert paths.count(("POST", "/v1/batches")) == 1 and ("POST", "/v1/files") in paths
    assert ("POST", "/v1/chat/completions") not in paths  # no synchronous call
    tokens = col.usage.prompt_tokens + col.usage.completion_tokens
    assert col.usage.api_calls == 3 and tokens > 0
    assert col.usage.cost_usd == pytest.approx(tokens / 1000 * 0.5)  # $1 per 1k tokens, batch half price

"""A minimal pointwise LLM judge for collector tests and the benchmark.

It uses the real `openai.AsyncOpenAI` client (its own retries off: the
collector retries) and asks for "Score: N" per completion. It is not the
provider (that is providers.JudgeTeacher); it exists so the collector is
tested against real HTTP without depending on another engineer's code.
"""

from __future__ import annotations

import re

import openai

from opd_sdk.errors import TeacherError
from opd_sdk.feedback.teacher import fingerprint
from opd_sdk.types import CallUsage, FeedbackRequest, Score
from providers.openai_errors import translate_openai_error

_VERDICT = re.compile(r"Score:\s*(-?\d+(?:\.\d+)?)")


def judge_prompt(request: FeedbackRequest, answer: str) -> str:
    return f"Question: {request.prompt_text()}\nAnswer: {answer}\nRate the answer 0-10. Reply 'Score: N'."


def answer_of(body: dict) -> str:
    """What the scripted server's responder reads back: the judged answer."""
    content = body["messages"][-1]["content"]
    return content.split("\nAnswer: ", 1)[1].split("\nRate the answer", 1)[0]


class MinimalJudge:
    def __init__(self, base_url: str, api_key: str = "sk-test-key-000000", *, model: str = "judge",
                 pointwise: bool = False, client_timeout: float = 30.0) -> None:
        self._api_key = api_key
        self._client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0,
                                          timeout=client_timeout)
        self.model = model
        self.pointwise = pointwise
        self.id = fingerprint("minimal-judge", model=model, template=1)

    def __repr__(self) -> str:
        return f"MinimalJudge(id={self.id!r}, model={self.model!r})"

    async def aclose(self) -> None:
        await self._client.close()

    def api_calls(self, request: FeedbackRequest) -> int:
        return len(request.completions)

    async def feedback(self, request: FeedbackRequest) -> Score:
        scores, verdicts = [], []
        prompt_tokens = completion_tokens = 0
        for completion in request.completions:
            try:
                reply = await self._client.chat.completions.create(
                    model=self.model, messages=[{"role": "user", "content": judge_prompt(request, completion.text)}],
                    temperature=0.0)
                text = reply.choices[0].message.content or ""
            except Exception as exc:
                raise translate_openai_error(exc, secrets=[self._api_key]) from exc
            match = _VERDICT.search(text)
            if match is None:
                raise TeacherError(f"verdict did not parse: {text[:80]!r}", retriable=True)
            scores.append(float(match.group(1)))
            verdicts.append(text)
            if reply.usage is not None:
                prompt_tokens += reply.usage.prompt_tokens
                completion_tokens += reply.usage.completion_tokens
        usage = CallUsage(calls=len(scores), prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
        return Score(scores=scores, usage=usage, details={"verdicts": verdicts})

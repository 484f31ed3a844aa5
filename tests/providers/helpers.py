"""Helpers for provider tests: reading what a teacher sent to the scripted server."""

from __future__ import annotations

import re

import openai

from opd_sdk.types import Completion, FeedbackRequest

FENCED = re.compile(r"<<<BEGIN UNTRUSTED (RESPONSE(?: [AB0-9]+)?) ([0-9a-f]{12})>>>\n(.*?)\n<<<END UNTRUSTED \1 \2>>>",
                    re.DOTALL)


def last_user(body: dict) -> str:
    return [m for m in body["messages"] if m["role"] == "user"][-1]["content"]


def first_user(body: dict) -> str:
    return [m for m in body["messages"] if m["role"] == "user"][0]["content"]


def fenced_texts(body: dict) -> list[str]:
    """The student texts as a delimiter-respecting reader finds them in the first user message."""
    return [m.group(3) for m in FENCED.finditer(first_user(body))]


OPEN_CLIENTS: list[openai.AsyncOpenAI] = []


def client_for(server, key: str = "fake-test-key") -> openai.AsyncOpenAI:
    """A real openai client for the scripted server (closed after the test by conftest)."""
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key=key, max_retries=0)
    OPEN_CLIENTS.append(client)
    return client


def track(teacher):
    """Register a teacher's own client for closing after the test; returns the teacher."""
    OPEN_CLIENTS.append(teacher.endpoint.client)
    return teacher


def request(prompt: str = "What is 12 + 7?", texts: tuple[str, ...] = ("19",), **kw) -> FeedbackRequest:
    return FeedbackRequest(prompt=prompt, completions=[Completion(text=t) for t in texts], **kw)

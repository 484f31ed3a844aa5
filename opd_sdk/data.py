"""Prompts for the student: one `PromptItem` per prompt.

A prompt may carry `privileged` context (what a teacher may see and the
student may not) and a reference `answer` (for verifiers, SPIN, SFT).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from opd_sdk.types import ChatMessage


class PromptItem(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt: str | list[ChatMessage]
    privileged: str | None = None
    answer: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

"""`PrivilegedTemplate`: where a self-distillation teacher's privileged context goes in its view.

The teacher sees the prompt plus privileged text (a reference solution, a hidden rubric, a
tool's output) that the student never sees; the template places it in the chat.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from opd_sdk.errors import ConfigError
from opd_sdk.types import ChatMessage

DEFAULT_USER_TEXT = "\n\nReference solution (for the grader only):\n{privileged}"
DEFAULT_SYSTEM_TEXT = "Reference solution (for the grader only):\n{privileged}"


@dataclass(frozen=True)
class PrivilegedTemplate:
    """Where the privileged text goes in the teacher view.

    placement="user_suffix": `text` is appended to the last user turn.
    placement="system": `text` becomes the system message (appended, after a
        blank line, to an existing one).
    `text` must contain "{privileged}". Without a chat template the prompt is
    plain text and user_suffix appends / system prepends.
    """

    placement: Literal["user_suffix", "system"] = "user_suffix"
    text: str | None = None

    def resolved_text(self) -> str:
        text = self.text
        if text is None:
            text = DEFAULT_USER_TEXT if self.placement == "user_suffix" else DEFAULT_SYSTEM_TEXT
        if "{privileged}" not in text:
            raise ConfigError(f"PrivilegedTemplate.text must contain '{{privileged}}', got {text!r}")
        if self.placement not in ("user_suffix", "system"):
            raise ConfigError(f"placement must be 'user_suffix' or 'system', got {self.placement!r}")
        return text

    def apply(self, messages: list[ChatMessage], privileged: str) -> list[ChatMessage]:
        filled = self.resolved_text().replace("{privileged}", privileged)
        out = list(messages)
        if self.placement == "system":
            if out and out[0].role == "system":
                return [ChatMessage(role="system", content=out[0].content + "\n\n" + filled)] + out[1:]
            return [ChatMessage(role="system", content=filled)] + out
        for i in range(len(out) - 1, -1, -1):
            if out[i].role == "user":
                out[i] = ChatMessage(role="user", content=out[i].content + filled)
                return out
        raise ConfigError("placement='user_suffix' needs a user turn in the prompt; use placement='system'")

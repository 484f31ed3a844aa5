"""VerifierTeacher: rule-based outcome checks, no network.

The outcome reward of RL with verifiable rewards (as in Tulu 3's RLVR and
DeepSeek-R1's rule-based accuracy reward): 1.0 when the completion's final
answer checks out against the expected one, else 0.0. A 0.0 here is a real
verdict (the answer is wrong or missing), not a stand-in for a failed call.

The expected answer is `request.metadata["answer"]`, or `request.privileged`
when there is no answer; a request with neither, or with an empty one, is an
error (ClientError, non-retriable), because scoring it 0 would teach the
student that a right answer is wrong, and an empty reference would give an
empty completion full marks. An empty (or whitespace) completion always gets
0.0, whatever the check.

Local: `feedback_local(requests)` scores a batch in process (the trainer's
`make_collector` runs it so: no thread, loop, retries or cache).

Checks (`mode`):
- "exact": the extracted answer equals the expected one after trimming,
  case-folding and collapsing whitespace (`normalize=False` compares raw).
- "numeric": the completion's answer and the expected one are read as exact
  numbers by `providers.numbers` (the last `\\boxed{}`, else the number after
  an "answer is" / "####" marker, else the last number; fractions, LaTeX
  `\\frac`, mixed numbers, percentages, thousands separators, scientific
  notation, Unicode digits and minus signs: the rules are in that module's
  docstring); equal when |a - b| <= atol + rtol * |b|. An answer that cannot
  be read with confidence (`\\boxed{2, 3}`, `\\boxed{\\sqrt{2}}`) scores 0.0;
  an expected answer that is not exactly one number is a ClientError.
- "regex": `pattern` must match (re.search) the completion; `{answer}` in
  the pattern is replaced by the escaped expected answer.
- a callable `check(completion_text, expected) -> bool | float` (a float is
  used as the score as is).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from opd_sdk.errors import ClientError, ConfigError, TeacherError
from opd_sdk.feedback.teacher import callable_fingerprint, fingerprint
from opd_sdk.types import Feedback, FeedbackFailure, FeedbackRequest, Score
from providers.numbers import as_float, last_boxed, read_answer, read_number
from providers.numbers import same as same_number


def extract_number(text: str) -> float | None:
    """The completion's answer as a float (`providers.numbers.read_answer`), or None when unread."""
    found = read_answer(text)
    return None if found is None else as_float(found.value)


def _norm(text: str) -> str:
    return " ".join(text.strip().casefold().split())


class VerifierParams(BaseModel):
    """VerifierTeacher's parameters as a config gives them (the `verifier` teacher section), with
    their defaults: the constructor's defaults are these. (A `check=` callable is Python only.)"""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["exact", "numeric", "regex"] = "numeric"
    atol: float = Field(1e-6, ge=0.0)
    rtol: float = Field(0.0, ge=0.0)
    pattern: str | None = None
    normalize: bool = True
    use_boxed: bool = True

    @model_validator(mode="after")
    def _pattern(self) -> "VerifierParams":
        if self.mode == "regex" and not self.pattern:
            raise ValueError("mode `regex` needs `pattern: <regular expression>`")
        return self


_DEFAULTS = VerifierParams()


class VerifierTeacher:
    """Rule-based scores in {0, 1} (or a callable's float); see the module docstring.

    mode: "exact" | "numeric" | "regex", or pass `check=` (mode is then "callable").
    atol, rtol: numeric tolerance. pattern: for "regex".
    use_boxed: "exact" compares the last \\boxed{} content when present.
    """

    def __init__(
        self,
        mode: str = _DEFAULTS.mode,
        *,
        check: Callable[[str, str], bool | float] | None = None,
        atol: float = _DEFAULTS.atol,
        rtol: float = _DEFAULTS.rtol,
        pattern: str | None = _DEFAULTS.pattern,
        normalize: bool = _DEFAULTS.normalize,
        use_boxed: bool = _DEFAULTS.use_boxed,
    ) -> None:
        if check is not None:
            mode = "callable"
        if mode not in ("exact", "numeric", "regex", "callable"):
            raise ConfigError(f"mode: 'exact', 'numeric' or 'regex' (or pass check=a callable), got {mode!r}")
        if mode == "regex" and not pattern:
            raise ConfigError("mode='regex' needs pattern=, e.g. pattern=r'answer is {answer}\\b'")
        if atol < 0 or rtol < 0:
            raise ConfigError(f"atol/rtol must be >= 0, got atol={atol}, rtol={rtol}")
        self.mode, self.check, self.atol, self.rtol = mode, check, atol, rtol
        self.pattern, self.normalize, self.use_boxed = pattern, normalize, use_boxed
        # the id covers the check's code and captured values; when they cannot be read, no cache
        code, self.uncached_reason = callable_fingerprint(check) if check is not None else (None, None)
        self.id = fingerprint(
            "verifier", mode=mode, atol=atol, rtol=rtol, pattern=pattern, normalize=normalize, use_boxed=use_boxed,
            check=None if check is None else f"{getattr(check, '__module__', '')}.{getattr(check, '__qualname__', repr(check))}",
            check_code=code,
        )

    def __repr__(self) -> str:
        return f"VerifierTeacher(mode={self.mode!r})"

    local = True  # answered in process: make_collector runs it without a loop, retries or cache

    def api_calls(self, request: FeedbackRequest) -> int:
        return 0  # local checks: nothing to charge to a rate limit

    @staticmethod
    def expected(request: FeedbackRequest) -> str:
        answer = request.metadata.get("answer", request.privileged)
        if answer is None:
            raise ClientError(
                "VerifierTeacher needs the expected answer in request.metadata['answer'] (or request.privileged); "
                "give your PromptItems an answer",
            )
        if not str(answer).strip():
            raise ClientError("VerifierTeacher: the expected answer is empty; fix the data (every item needs a "
                              "non-empty answer), or an empty completion would count as right")
        return str(answer)

    def score_text(self, text: str, expected: str) -> tuple[float, Any]:
        """(score, what was extracted) for one completion; an empty completion always gets 0.0."""
        if not text.strip():
            return 0.0, None
        if self.mode == "callable":
            verdict = self.check(text, expected)
            return (float(verdict), None) if not isinstance(verdict, bool) else (1.0 if verdict else 0.0, None)
        if self.mode == "numeric":
            want = read_number(expected)
            if want is None:
                raise ClientError(f"expected answer {expected!r} is not one number (providers.numbers reads "
                                  "e.g. 42, -3.5, 1/2, \\frac{1}{2}, 3 1/2, 50%, 1.5e3); fix the data or use mode='exact'")
            got = read_answer(text)
            ok = got is not None and same_number(got, want, self.atol, self.rtol)
            return (1.0 if ok else 0.0), None if got is None else as_float(got.value)
        if self.mode == "regex":
            pattern = self.pattern.replace("{answer}", re.escape(expected.strip()))
            return (1.0 if re.search(pattern, text) else 0.0), None
        boxed = last_boxed(text) if self.use_boxed else None
        got = boxed if boxed is not None else text
        same = _norm(got) == _norm(expected) if self.normalize else got == expected
        return (1.0 if same else 0.0), got

    def score(self, request: FeedbackRequest) -> Score:
        """Scores of one request's completions; raises ClientError when it has no usable answer."""
        expected = self.expected(request)
        results = [self.score_text(c.text, expected) for c in request.completions]
        return Score(scores=[r[0] for r in results], details={"extracted": [r[1] for r in results]})

    def feedback_local(self, requests: Sequence[FeedbackRequest]) -> list[Feedback]:
        """One Score per request, in process; a request without a usable answer is a failure value."""
        out: list[Feedback] = []
        for request in requests:
            try:
                out.append(self.score(request))
            except TeacherError as exc:
                out.append(FeedbackFailure.from_error(exc, attempts=1))
        return out

    async def feedback(self, request: FeedbackRequest) -> Score:
        return self.score(request)

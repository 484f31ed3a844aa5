"""LogprobTeacher: teacher log-probabilities of each token of a student's completion.

The signal of token-level (reverse-KL) on-policy distillation (Agarwal et
al., 2024, GKD; Thinking Machines' "On-Policy Distillation", 2025): the
student samples, the teacher scores every sampled token. Here the teacher is
an endpoint, not a local model: we send prompt + completion to a legacy
`/completions` endpoint with `echo=True` and `logprobs` (vLLM, llama.cpp and
others return the log-probability of every prompt token), plus vLLM's
`prompt_logprobs=k` for top-k alternatives keyed by token id.

Tokenisation. A per-token signal is only meaningful if teacher and student
split the text into the same tokens. Two ways to send:

- send="text" (any server): the text goes as a string; the teacher's token
  boundaries (character offsets, `text_offset`) are compared with the
  student's (from `tokenizer`). Same boundaries: the log-probs map one to
  one. Different: `on_mismatch="error"` raises `TokenizationMismatch`
  naming the first differing token; `on_mismatch="offsets"` maps by
  character offsets instead, giving each student token the sum of the
  teacher log-probs of the teacher tokens that start inside it (the sums
  over the whole completion stay exact; per-token values are an
  approximation, and top-k is dropped because ids do not correspond).
- send="token_ids" (vLLM, teacher sharing the student's vocabulary): the
  student's prompt and completion ids go as the prompt; the teacher scores
  exactly the student's tokens.

The prompt is rendered as the student saw it (`opd_sdk.rollout.engine.render_prompts`:
the tokenizer's chat template with the generation prompt, or raw text).
Prompt ids are tokenised as the rollout does, without added special tokens;
in text mode a prompt that already starts with BOS is sent with
`add_special_tokens=False` (vLLM), so no server adds a second BOS. When a
request's `tokenizer` fingerprint equals this teacher's (computed once), its
`prompt_token_ids` and completion `token_ids` are sent as they are, with no
re-rendering. A token that ends inside a character (an emoji or CJK
character split across byte-level tokens) emits no text until the token that
completes the character, as vLLM's incremental detokenizer reports offsets
(checked against a real vLLM server in tests/providers/test_real_vllm.py). Log-probs at or below -9999 (vLLM's minus
infinity), null log-probs (a server's null, pydantic's -inf), null
prompt_logprobs entries and entries that omit the token become NaN, a
missing value that the targets mask and count (see `TokenLogprobs`); a
reply without `text_offset` is a `BadResponse`, not a crash. A completion
with no tokens is not sent (its row is empty).

A server that lacks a needed feature (echo log-probs; prompt_logprobs for
top_k or send="token_ids") raises `Unsupported` naming it, whatever status it
answered with, and every later call fails at once without being sent.
`self_test()` scores one text twice and reports the spread, so a user learns
before training whether the endpoint's numbers are stable.
"""

from __future__ import annotations

import asyncio
import math
import weakref
from typing import Any, Literal

import openai
from pydantic import BaseModel, ConfigDict, Field

from opd_sdk.constants import DEFAULT_TIMEOUT_S
from opd_sdk.data import PromptItem
from opd_sdk.errors import (
    BadResponse,
    ClientError,
    ConfigError,
    ServerError,
    TokenizationMismatch,
    Unsupported,
)
from opd_sdk.feedback.calls import gather_all
from opd_sdk.feedback.teacher import fingerprint, tokenizer_fingerprint
from opd_sdk.rollout.engine import render_prompts
from opd_sdk.types import Completion, FeedbackRequest, TokenLogprobs
from providers.client import Endpoint, add_usage, usage_of


def _logprob(value: Any) -> float:
    """A log-prob as a server sent it; null (None, or pydantic's -inf) or a non-number is NaN,
    a missing value that `TokenLogprobs` and the targets mask and count, never a made-up number."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return math.nan


def _entry_logprob(entry: Any, token_id: int) -> float:
    """The log-prob of `token_id` in one prompt_logprobs entry ({id: {"logprob": x, ...}}); NaN when
    the entry is null or omits the token or its log-prob."""
    item = entry.get(str(token_id)) if isinstance(entry, dict) else None
    return _logprob(item.get("logprob") if isinstance(item, dict) else None)


def _field(obj: Any, name: str) -> Any:
    """A response field, also when the server sent it as an extra (vLLM's prompt_logprobs)."""
    value = getattr(obj, name, None)
    if value is None and getattr(obj, "model_extra", None):
        value = obj.model_extra.get(name)
    return value


class LogprobParams(BaseModel):
    """LogprobTeacher's parameters as a config gives them (the `logprob` teacher section), with
    their defaults: the constructor's defaults are these. (The tokenizer is the student's.)"""

    model_config = ConfigDict(extra="forbid")

    use_chat_template: bool = True
    top_k: int = Field(0, ge=0)
    send: Literal["text", "token_ids"] = "text"
    on_mismatch: Literal["error", "offsets"] = "error"


_DEFAULTS = LogprobParams()


class LogprobTeacher:
    """Teacher log-probs of student tokens from a completions endpoint.

    tokenizer: the student's Hugging Face tokenizer (or a path to load one).
        Needed for chat prompts, for checking token boundaries and for
        send="token_ids"; without it the teacher's own tokens are returned.
    use_chat_template: render chat prompts with the tokenizer's template
        (as the student's rollout does); False feeds raw prompt text.
    top_k: also return the teacher's top-k alternatives per token (vLLM's
        prompt_logprobs; token ids of the teacher's vocabulary). 0 = off.
    send: "text" or "token_ids" (see module docstring).
    on_mismatch: "error" or "offsets" (see module docstring).
    """

    def __init__(
        self,
        model: str,
        *,
        tokenizer: Any = None,
        use_chat_template: bool = _DEFAULTS.use_chat_template,
        top_k: int = _DEFAULTS.top_k,
        send: Literal["text", "token_ids"] = _DEFAULTS.send,
        on_mismatch: Literal["error", "offsets"] = _DEFAULTS.on_mismatch,
        base_url: str | None = None,
        api_key: str | None = None,
        client: openai.AsyncOpenAI | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        if send not in ("text", "token_ids"):
            raise ConfigError(f"send: 'text' or 'token_ids', got {send!r}")
        if on_mismatch not in ("error", "offsets"):
            raise ConfigError(f"on_mismatch: 'error' or 'offsets', got {on_mismatch!r}")
        if top_k < 0:
            raise ConfigError(f"top_k: must be >= 0, got {top_k}")
        if isinstance(tokenizer, str):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        if send == "token_ids" and tokenizer is None:
            raise ConfigError("send='token_ids' needs tokenizer= (the student's tokenizer) to build the prompt ids")
        self.endpoint = Endpoint(model, base_url=base_url, api_key=api_key, client=client, timeout=timeout)
        self.tokenizer, self.use_chat_template = tokenizer, use_chat_template
        self.top_k, self.send, self.on_mismatch = top_k, send, on_mismatch
        self.tokenizer_id = tokenizer_fingerprint(tokenizer) if tokenizer is not None else None  # once
        self._unsupported: Unsupported | None = None  # a missing server feature, found once
        self._server_ok = False  # one echo call succeeded: the server has what we need
        self._first_call_lock: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary())
        self.id = fingerprint(
            "logprob", **self.endpoint.id_params(), top_k=top_k, send=send, on_mismatch=on_mismatch,
            use_chat_template=use_chat_template, tokenizer=self.tokenizer_id,
        )

    def __repr__(self) -> str:
        return f"LogprobTeacher(model={self.endpoint.model!r}, base_url={self.endpoint.base_url!r}, send={self.send!r})"

    async def aclose(self) -> None:
        """Close the HTTP client of the running event loop (each loop's closes with it anyway)."""
        await self.endpoint.aclose()

    def api_calls(self, request: FeedbackRequest) -> int:
        return len(request.completions)

    # ----- the student's view ----------------------------------------------
    def render_prompt(self, request: FeedbackRequest) -> str:
        item = PromptItem(prompt=request.prompt)
        if self.tokenizer is None:
            if not isinstance(request.prompt, str):
                raise ConfigError("chat prompts need tokenizer= to render them as the student saw them")
            return request.prompt
        return render_prompts(self.tokenizer, [item], use_chat_template=self.use_chat_template)[0]

    def student_tokens(self, completion: Completion) -> tuple[str, list[int] | None, list[tuple[int, int]] | None]:
        """(text to score, student token ids, their character spans in that text)."""
        tok = self.tokenizer
        if tok is None:
            return completion.text, completion.token_ids, None
        if completion.token_ids is not None:
            ids = list(completion.token_ids)
            text = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            ends, emitted = [], 0
            for t in range(len(ids)):
                # as vLLM's incremental detokenizer: a token that ends inside a character (emoji, CJK
                # split across byte-level tokens) emits no text; its text, with whatever came before
                # it in the same token, appears with the token that completes the character
                prefix = tok.decode(ids[: t + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False)
                if not prefix.endswith("\ufffd"):
                    emitted = len(prefix)
                ends.append(emitted)
            return text, ids, list(zip([0] + ends[:-1], ends, strict=True))
        enc = tok(completion.text, add_special_tokens=False, return_offsets_mapping=True)
        return completion.text, list(enc["input_ids"]), [tuple(s) for s in enc["offset_mapping"]]

    # ----- teacher calls ---------------------------------------------------
    def _prompt_has_bos(self, prompt_text: str) -> bool:
        bos = getattr(self.tokenizer, "bos_token", None) if self.tokenizer is not None else None
        return bool(bos) and prompt_text.startswith(bos)

    async def _echo(self, prompt: str | list[int], *, add_special_tokens: bool = True) -> Any:
        """One echo call. A server that lacks echo / prompt log-probs raises `Unsupported` naming the
        feature, whatever status it answered with; after that, every call fails at once, unsent.
        Until one call has shown what the server can do, calls go one at a time (so a server
        without the feature is asked once, not once per completion in flight)."""
        if self._unsupported is not None:
            raise self._unsupported
        if self._server_ok:
            return await self._echo_call(prompt, add_special_tokens)
        loop = asyncio.get_running_loop()
        lock = self._first_call_lock.setdefault(loop, asyncio.Lock())
        async with lock:
            if self._unsupported is not None:
                raise self._unsupported
            response = await self._echo_call(prompt, add_special_tokens)
            self._server_ok = True
            return response

    async def _echo_call(self, prompt: str | list[int], add_special_tokens: bool) -> Any:
        extra: dict[str, Any] = {}
        if self.top_k or self.send == "token_ids":
            extra["prompt_logprobs"] = self.top_k
        if not add_special_tokens:
            extra["add_special_tokens"] = False  # the rendered prompt already holds BOS: no second one
        try:
            response = await self.endpoint.complete(
                prompt, echo=True, logprobs=1, max_tokens=1, temperature=0.0, extra_body=extra or None
            )
        except (ClientError, ServerError) as err:
            text = str(err).lower()
            if any(word in text for word in ("echo", "logprob", "prompt_logprobs")):
                raise self._missing(f"the server refused echo / log-probs on /completions ({err})") from err
            raise
        choice = response.choices[0]
        if choice.logprobs is None or not choice.logprobs.token_logprobs:
            raise self._missing("the endpoint returned no echo logprobs; it must support echo=True with logprobs "
                                "on /completions (vLLM, llama.cpp)")
        if extra.get("prompt_logprobs") is not None and _field(choice, "prompt_logprobs") is None:
            need = "top_k" if self.top_k else "send='token_ids'"
            raise self._missing(f"{need} needs a server that returns prompt_logprobs with token ids (vLLM); "
                                "this one returned none")
        return response

    def _missing(self, message: str) -> Unsupported:
        self._unsupported = Unsupported(message)
        return self._unsupported

    def _top_k_at(self, entry: dict | None) -> dict[int, float]:
        """The top-k alternatives of one prompt_logprobs entry; null values are NaN (missing), a
        null entry is no alternatives, an alternative without a rank is kept."""
        entry = entry if isinstance(entry, dict) else {}
        return {int(k): _logprob(v.get("logprob") if isinstance(v, dict) else None) for k, v in entry.items()
                if not isinstance(v, dict) or int(v.get("rank") or 1) <= self.top_k}

    async def _score_text(self, prompt_text: str, completion: Completion) -> tuple[list[float], Any, dict, Any]:
        text, ids, spans = self.student_tokens(completion)
        if not text and not ids:  # no tokens to score: nothing to send
            return [], [] if self.top_k else None, {"alignment": "empty"}, None
        response = await self._echo(prompt_text + text, add_special_tokens=not self._prompt_has_bos(prompt_text))
        lp = response.choices[0].logprobs
        start_p, end = len(prompt_text), len(prompt_text) + len(text)
        if not lp.text_offset or len(lp.text_offset) != len(lp.token_logprobs):
            raise BadResponse("the echo reply has no text_offset for each token, so its log-probs cannot be "
                              "placed on the completion; use send='token_ids' (vLLM) or another server",
                              retriable=False)
        offsets = list(lp.text_offset)
        keep = [k for k, o in enumerate(offsets) if start_p <= o < end]
        straddle = [k for k, o in enumerate(offsets) if o < start_p < (offsets[k + 1] if k + 1 < len(offsets) else end)]
        t_spans = [(offsets[k] - start_p, min(offsets[k + 1] if k + 1 < len(offsets) else end, end) - start_p)
                   for k in keep]
        t_logprobs = [_logprob(lp.token_logprobs[k]) for k in keep]
        prompt_lps = _field(response.choices[0], "prompt_logprobs")
        if self.top_k and prompt_lps is None:
            raise Unsupported("top_k needs a server that returns prompt_logprobs with token ids (vLLM)")
        top = [self._top_k_at(prompt_lps[k]) for k in keep] if self.top_k else None
        if spans is None:  # no student tokenizer: the teacher's own tokens, or a count check on given ids
            if ids is not None and len(ids) != len(keep):
                raise TokenizationMismatch(
                    f"the teacher split the completion into {len(keep)} tokens, the student's ids are {len(ids)}; "
                    "pass tokenizer= (the student's) so tokens can be compared or mapped by character offsets")
            how = "teacher_tokens" if ids is None else "count_only"
            tokens = lp.tokens if lp.tokens and len(lp.tokens) == len(offsets) else [None] * len(offsets)
            return t_logprobs, top, {"alignment": how, "teacher_tokens": [tokens[k] for k in keep]}, response
        if not straddle and [s for s, _ in spans] == [s for s, _ in t_spans]:
            return t_logprobs, top, {"alignment": "exact"}, response
        where = next((t for t, (a, b) in enumerate(zip(spans, t_spans)) if a[0] != b[0]), min(len(spans), len(t_spans)))
        show = lambda sp: repr(text[sp[where][0]:sp[where][1]]) if where < len(sp) else "<end>"  # noqa: E731
        message = (
            f"teacher and student tokenise the completion differently: student {len(spans)} tokens, teacher "
            f"{len(t_spans)}; first difference at token {where} (student {show(spans)}, teacher {show(t_spans)})"
            + ("; a teacher token spans the prompt/completion boundary" if straddle else "")
        )
        if self.on_mismatch == "error":
            raise TokenizationMismatch(message + ". Use on_mismatch='offsets' to map by character offsets, "
                                                 "or a teacher with the student's tokenizer.")
        starts = [max(offsets[k], start_p) - start_p for k in straddle] + [s for s, _ in t_spans]
        values = [_logprob(lp.token_logprobs[k]) for k in straddle] + t_logprobs
        mapped = [sum(v for s0, v in zip(starts, values, strict=True) if a <= s0 < b or (t == 0 and s0 < a))
                  for t, (a, b) in enumerate(spans)]
        return mapped, None, {"alignment": "offsets", "mismatch": message}, response

    async def _score_ids(self, prompt_ids: list[int], completion: Completion) -> tuple[list[float], Any, dict, Any]:
        _, ids, _ = self.student_tokens(completion)
        if not ids:  # no tokens to score: nothing to send
            return [], [] if self.top_k else None, {"alignment": "empty"}, None
        response = await self._echo(prompt_ids + ids)
        prompt_lps = _field(response.choices[0], "prompt_logprobs")
        if prompt_lps is None or len(prompt_lps) < len(prompt_ids) + len(ids):
            raise Unsupported("send='token_ids' needs a server that returns prompt_logprobs (vLLM)")
        entries = prompt_lps[len(prompt_ids): len(prompt_ids) + len(ids)]
        logprobs = [_entry_logprob(e, i) for e, i in zip(entries, ids, strict=True)]
        top = [self._top_k_at(e) for e in entries] if self.top_k else None
        return logprobs, top, {"alignment": "token_ids"}, response

    def same_tokenizer(self, request: FeedbackRequest) -> bool:
        """Whether the request's ids come from this teacher's (the student's) tokenizer."""
        return request.tokenizer is not None and request.tokenizer == self.tokenizer_id

    def prompt_token_ids(self, request: FeedbackRequest) -> list[int]:
        """The prompt's ids for send="token_ids": the request's own when its tokenizer fingerprint is
        this teacher's; else rendered and tokenised as the rollout does (no special tokens added:
        a chat template that emits BOS is not given a second one)."""
        if self.same_tokenizer(request) and request.prompt_token_ids is not None:
            return list(request.prompt_token_ids)
        return list(self.tokenizer(self.render_prompt(request), add_special_tokens=False)["input_ids"])

    async def feedback(self, request: FeedbackRequest) -> TokenLogprobs:
        if self.send == "token_ids":
            prompt_ids = self.prompt_token_ids(request)
            if not self.same_tokenizer(request) and request.tokenizer is not None:
                request = request.with_completions([Completion(text=c.text) for c in request.completions])
            calls = [self._score_ids(prompt_ids, c) for c in request.completions]
        else:
            prompt_text = self.render_prompt(request)
            calls = [self._score_text(prompt_text, c) for c in request.completions]
        results = await gather_all(*calls)  # siblings finish before an error is raised: none left in flight
        tops = [r[1] for r in results]
        return TokenLogprobs(
            logprobs=[r[0] for r in results],
            top_k=tops if self.top_k and all(t is not None for t in tops) else None,
            details={"per_completion": [r[2] for r in results]},
            usage=add_usage(*(usage_of(r[3]) for r in results if r[3] is not None)),
        )

    async def self_test(self, prompt: str = "What is 3 + 4?", text: str = "3 + 4 = 7.", repeats: int = 2) -> dict:
        """Check the server once before training: it can do what this teacher needs (echo,
        prompt log-probs when top_k or send="token_ids"; else `Unsupported`, naming the
        feature, is raised), and its numbers are stable: the same text is scored `repeats`
        times and the spread reported.

        Returns {"n_tokens", "max_abs_diff", "mean_abs_diff", "total_logprob", "stable"} where stable
        means max_abs_diff <= 1e-3 (batching or nondeterministic kernels can make it larger).
        """
        request = FeedbackRequest(prompt=prompt, completions=[Completion(text=text)])
        runs = [(await self.feedback(request)).logprobs[0] for _ in range(max(2, repeats))]
        diffs = [abs(a - b) for run in runs[1:] for a, b in zip(runs[0], run)]
        max_diff = max(diffs, default=0.0)
        return {
            "n_tokens": len(runs[0]),
            "max_abs_diff": max_diff,
            "mean_abs_diff": sum(diffs) / len(diffs) if diffs else 0.0,
            "total_logprob": math.fsum(runs[0]),
            "stable": max_diff <= 1e-3,
        }

"""Reading a judge's verdict: strict JSON first, then lenient fallbacks.

`parse_score` / `parse_scores` / `parse_choice` return the parsed value or
raise `VerdictError` saying why (the judge is then asked again with that
reason). `expected_score` computes the G-Eval expectation of the score from
the judge's top log-probabilities at the position of the score token.

G-Eval (Liu et al., 2023, "G-Eval: NLG Evaluation using GPT-4 with
Better Human Alignment") weights each candidate score by its probability:
E[s] = sum_s s * p(s) / sum_s p(s), over the candidates that are valid
scores. We read the probabilities from one sampled answer's `top_logprobs`
(the paper samples 20 answers when logprobs are unavailable). Departure:
candidates outside the top-k are ignored, and the expectation is taken only
when every valid score is a single token (scales up to 9 at most).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

_NUMBER = r"-?\d+(?:\.\d+)?"
_SCORE_KEY = re.compile(r'"?score"?\s*[:=]\s*"?(' + _NUMBER + ")", re.IGNORECASE)
_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$", re.IGNORECASE)


class VerdictError(ValueError):
    """The judge's reply is not a usable verdict; the message says why."""


def _json_objects(text: str) -> list[Any]:
    """Every top-level JSON object found in `text`, in order."""
    decoder = json.JSONDecoder()
    found, i = [], 0
    cleaned = _FENCE.sub("", text.strip())
    while True:
        start = cleaned.find("{", i)
        if start < 0:
            return found
        try:
            value, end = decoder.raw_decode(cleaned, start)
        except ValueError:
            i = start + 1
            continue
        found.append(value)
        i = end


def _in_scale(value: Any, lo: float, hi: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise VerdictError(f"{what} must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise VerdictError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(number) or not lo <= number <= hi:
        raise VerdictError(f"{what} {number:g} is outside the scale {lo:g} to {hi:g}")
    return number


def parse_score(text: str, lo: float, hi: float) -> float:
    """The judge's score on its own scale, from `{"score": n}` or, leniently, `score: n`."""
    for obj in _json_objects(text):
        if isinstance(obj, dict) and "score" in obj:
            return _in_scale(obj["score"], lo, hi, "score")
    match = _SCORE_KEY.search(text)
    if match:
        return _in_scale(match.group(1), lo, hi, "score")
    raise VerdictError('no score found; expected a JSON object like {"score": 7}')


def parse_scores(text: str, n: int, lo: float, hi: float) -> list[float]:
    """Listwise verdict: `{"scores": [s_0, ..., s_{n-1}]}`, one per response, in order."""
    for obj in _json_objects(text):
        if isinstance(obj, dict) and isinstance(obj.get("scores"), list):
            values = obj["scores"]
            if len(values) != n:
                raise VerdictError(f"expected {n} scores, one per response, got {len(values)}")
            return [_in_scale(v, lo, hi, f"scores[{i}]") for i, v in enumerate(values)]
    raise VerdictError(f'no scores list found; expected a JSON object like {{"scores": [{", ".join(["7"] * n)}]}}')


def parse_choice(text: str, choices: tuple[str, ...]) -> str:
    """Pairwise verdict: `{"winner": "A" | "B" | "tie"}` (case-insensitive)."""
    lowered = {c.lower(): c for c in choices}
    for obj in _json_objects(text):
        if isinstance(obj, dict) and "winner" in obj:
            value = str(obj["winner"]).strip().lower()
            if value in lowered:
                return lowered[value]
            raise VerdictError(f"winner must be one of {list(choices)}, got {obj['winner']!r}")
    match = re.search(r'"?winner"?\s*[:=]\s*"?(\w+)', text, re.IGNORECASE)
    if match and match.group(1).lower() in lowered:
        return lowered[match.group(1).lower()]
    raise VerdictError(f'no winner found; expected a JSON object like {{"winner": "{choices[0]}"}}')


def expected_score(
    tokens: list[Any], lo: int, hi: int
) -> tuple[float, dict[str, float]] | None:
    """G-Eval expected score from chat logprobs content (`choice.logprobs.content`).

    tokens: the sampled tokens, each with `.token` and `.top_logprobs`
        (items with `.token` and `.logprob`).
    Finds the token that carries the value after the key "score", and
    returns (E[score], {candidate: probability renormalised over valid
    candidates}); None when the score is not a single token or no
    candidate is a valid score.
    """
    text, starts = "", []
    for tok in tokens:
        starts.append(len(text))
        text += tok.token
    match = _SCORE_KEY.search(text)
    if match is None:
        return None
    pos = match.start(1)
    if pos not in starts:
        return None  # the number shares a token with the text before it
    index = starts.index(pos)
    if tokens[index].token.strip() != match.group(1):
        return None  # a multi-token number: the first token alone is ambiguous
    probs: dict[str, float] = {}
    for cand in tokens[index].top_logprobs or []:
        key = cand.token.strip()
        if key.isdigit() and lo <= int(key) <= hi:
            probs[key] = probs.get(key, 0.0) + math.exp(cand.logprob)
    total = sum(probs.values())
    if total <= 0:
        return None
    normalised = {k: p / total for k, p in probs.items()}
    return sum(int(k) * p for k, p in normalised.items()), normalised

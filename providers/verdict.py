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
_SCORE_KEY = re.compile(r'"?score"?\s*[:=]\s*"?(' + _NUMBER + ")", re.IGNORECASE)  # G-Eval's score token
_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$", re.IGNORECASE)
_REASONING = re.compile(r"<(think|thinking|reasoning|scratchpad)>.*?(</\1>|$)", re.IGNORECASE | re.DOTALL)
_MARKUP = re.compile(r"\*+|`+|__+|^\s*[#>]+", re.MULTILINE)
# a keyed verdict in prose: "score: 7", "Final score = 7/10", "rating of 8", "verdict - 6 out of 10"
_KEYED = re.compile(
    r"\b(?P<final>final(?:[\s_]+(?:score|rating|grade|verdict|answer))?|(?:score|rating|grade|verdict))\b"
    r"(?:\s+(?:is|of))?\s*[:=\-]?\s*(?P<num>" + _NUMBER + r")(?:\s*(?:/|out\s+of)\s*(?P<den>\d+(?:\.\d+)?))?",
    re.IGNORECASE,
)
# verdict markers of common judge prompts, read as final: MT-Bench "Rating: [[8]]" (also "[[8/10]]"),
# Prometheus "[RESULT] 4"
_MARKED = re.compile(r"\[\[\s*(?P<num>" + _NUMBER + r")\s*(?:/\s*(?P<den>\d+(?:\.\d+)?))?\s*\]\]"
                     r"|\[RESULT\]\s*(?P<res>" + _NUMBER + ")", re.IGNORECASE)
_MARKED_CHOICE = re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.IGNORECASE)  # MT-Bench pairwise; C is a tie
_FRACTION = re.compile(r"(?<![\w/.])(?P<num>" + _NUMBER + r")\s*/\s*(?P<den>\d+)(?![\w/]|\.\d)")
_FINAL_BEFORE = re.compile(r"final\W*(?:\w+\W*){0,2}$", re.IGNORECASE)


class VerdictError(ValueError):
    """The judge's reply is not a usable verdict; the message says why."""


def _clean(text: str) -> str:
    """Reasoning blocks removed (<think>...</think>, also unclosed), markdown emphasis removed."""
    return _MARKUP.sub(" ", _REASONING.sub(" ", text)).strip()


def _json_objects(text: str) -> list[tuple[int, Any]]:
    """Every top-level JSON object found in `text`, in order, with its start offset."""
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
        found.append((start, value))
        i = end


def _in_scale(value: Any, lo: float, hi: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise VerdictError(f"{what} must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise VerdictError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(number) or not lo <= number <= hi:
        raise VerdictError(f"{what} {number:g} is outside the scale {lo:g} to {hi:g}; give a number from "
                           f"{lo:g} to {hi:g}")
    written_decimal = isinstance(value, float) or (isinstance(value, str) and "." in value)
    if hi > 1 and written_decimal and 0 < number <= 1:
        raise VerdictError(f"{what} {value!r} looks like a score on a 0-1 scale, but the scale is {lo:g} to "
                           f"{hi:g}; give a number from {lo:g} to {hi:g}")
    return number


def _on_scale(num: str, den: str | None, lo: float, hi: float) -> float:
    """A number, or a fraction n/d read as a share of the scale ("8/10" on 0-10 is 8; "4/5" is 8)."""
    value = float(num)
    if den is None:
        return value
    d = float(den)
    if d <= 0:
        raise VerdictError(f"a fraction with denominator {den} is not a score")
    return value if d == hi and lo == 0 else lo + value / d * (hi - lo)


def _is_final(text: str, start: int) -> bool:
    return bool(_FINAL_BEFORE.search(text[max(0, start - 40):start]))


def _decide(candidates: list[tuple[bool, Any]], what: str, example: str) -> Any:
    """The verdict among (marked_final, value) candidates, in reply order.

    The last candidate marked final wins. Unmarked: all must agree; two different
    verdicts with none marked final are an error (the judge is asked again).
    """
    if not candidates:
        raise VerdictError(f"no {what} found; expected a JSON object like {example}")
    finals = [v for marked, v in candidates if marked]
    if finals:
        return finals[-1]
    values = [v for _, v in candidates]
    if any(v != values[0] for v in values[1:]):
        shown = ", ".join(str(v) for v in values[:4])
        raise VerdictError(f"the reply holds different {what}s ({shown}) and none is marked final; "
                           f"give exactly one, as {example}")
    return values[0]


def parse_score(text: str, lo: float, hi: float) -> float:
    """The judge's final score on its own scale.

    Reads, in reply order: JSON objects with "score" (or "final_score"), keyed
    prose ("score: 7", "Final score: 3", "rating 8/10"), MT-Bench's
    "Rating: [[8]]" and Prometheus' "[RESULT] 4" (both read as final), and
    bare fractions over the scale's top ("8/10" on 0-10). Reasoning blocks
    (<think>...) and markdown are ignored. The last verdict marked final wins;
    otherwise every verdict found must agree (else VerdictError: asked again).

    Scale: a verdict is read on the configured scale, never rescaled
    silently. A value outside lo..hi is a VerdictError naming the scale (85 on
    0-10 is not read as 8.5). A value written with a decimal point in (0, 1]
    on a scale whose top is above 1 (`{"score": 0.7}` or 1.0 on 0-10) is
    ambiguous (a 0-1 judge?): a VerdictError naming the scale. Only an
    explicit fraction is rescaled, because it says its own scale: "4/5" on
    0-10 is 8, "0.7/1" is 7.
    """
    body = _clean(text)
    candidates: list[tuple[int, bool, float]] = []
    spans: list[tuple[int, int]] = []
    for start, obj in _json_objects(body):
        if isinstance(obj, dict):
            for key in ("final_score", "score"):
                if key in obj:
                    value = _in_scale(obj[key], lo, hi, "score")
                    candidates.append((start, key == "final_score" or _is_final(body, start), value))
                    break
            spans.append((start, start + len(json.dumps(obj))))
    for m in _KEYED.finditer(body):
        if any(a <= m.start() < b for a, b in spans):
            continue
        marked = m.group("final").lower().startswith("final") or _is_final(body, m.start())
        written = m.group("num") if m.group("den") is None else _on_scale(m.group("num"), m.group("den"), lo, hi)
        candidates.append((m.start(), marked, _in_scale(written, lo, hi, "score")))
    for m in _MARKED.finditer(body):
        if m.group("res") is not None or m.group("den") is None:
            written: Any = m.group("res") or m.group("num")
        else:
            written = _on_scale(m.group("num"), m.group("den"), lo, hi)
        candidates.append((m.start(), True, _in_scale(written, lo, hi, "score")))
    keyed_at = {m.start("num") for m in _KEYED.finditer(body)}
    for m in _FRACTION.finditer(body):
        if m.start("num") in keyed_at or any(a <= m.start() < b for a, b in spans):
            continue
        if float(m.group("den")) == hi:
            value = _in_scale(_on_scale(m.group("num"), m.group("den"), lo, hi), lo, hi, "score")
            candidates.append((m.start(), _is_final(body, m.start()), value))
    candidates.sort(key=lambda c: c[0])
    return _decide([(marked, v) for _, marked, v in candidates], "score", '{"score": 7}')


def parse_scores(text: str, n: int, lo: float, hi: float) -> list[float]:
    """Listwise verdict: `{"scores": [s_0, ..., s_{n-1}]}`, one per response, in order.

    Several objects: the last marked final ("final_scores", or "final" just before it)
    wins; otherwise they must agree (else VerdictError).
    """
    body = _clean(text)
    candidates: list[tuple[bool, tuple[float, ...]]] = []
    for start, obj in _json_objects(body):
        if not isinstance(obj, dict):
            continue
        key = "final_scores" if isinstance(obj.get("final_scores"), list) else "scores"
        if not isinstance(obj.get(key), list):
            continue
        values = obj[key]
        if len(values) != n:
            raise VerdictError(f"expected {n} scores, one per response, got {len(values)}")
        parsed = tuple(_in_scale(v, lo, hi, f"scores[{i}]") for i, v in enumerate(values))
        candidates.append((key == "final_scores" or _is_final(body, start), parsed))
    example = '{"scores": [' + ", ".join(["7"] * n) + "]}"
    return list(_decide(candidates, "scores list", example))


def parse_choice(text: str, choices: tuple[str, ...]) -> str:
    """Pairwise verdict: `{"winner": "A" | "B" | "tie"}` (case-insensitive), or MT-Bench's
    "[[A]]" / "[[B]]" / "[[C]]" (C: a tie; read as final); the final one."""
    lowered = {c.lower(): c for c in choices}
    body = _clean(text)
    candidates: list[tuple[int, bool, str]] = []
    spans = []
    for start, obj in _json_objects(body):
        if isinstance(obj, dict) and ("winner" in obj or "final_winner" in obj):
            key = "final_winner" if "final_winner" in obj else "winner"
            value = str(obj[key]).strip().lower()
            if value not in lowered:
                raise VerdictError(f"winner must be one of {list(choices)}, got {obj[key]!r}")
            candidates.append((start, key == "final_winner" or _is_final(body, start), lowered[value]))
            spans.append((start, start + len(json.dumps(obj))))
    for m in re.finditer(r'"?(final[\s_]+)?winner"?\s*(?:is)?\s*[:=]?\s*"?(\w+)', body, re.IGNORECASE):
        if any(a <= m.start() < b for a, b in spans) or m.group(2).lower() not in lowered:
            continue
        candidates.append((m.start(), bool(m.group(1)) or _is_final(body, m.start()), lowered[m.group(2).lower()]))
    for m in _MARKED_CHOICE.finditer(body):
        said = m.group(1).lower()
        value = "tie" if said in ("c", "tie") else said
        if value not in lowered:
            raise VerdictError(f"winner must be one of {list(choices)}, got {m.group()!r}")
        candidates.append((m.start(), True, lowered[value]))
    candidates.sort(key=lambda c: c[0])
    return _decide([(marked, v) for _, marked, v in candidates], "winner", f'{{"winner": "{choices[0]}"}}')


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

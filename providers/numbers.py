"""Reading a final answer as a number: what `VerifierTeacher(mode="numeric")` compares.

`read_answer(text)` returns the `Number` the text gives as its answer, or None
when it cannot be read with confidence (the verifier then scores 0: a wrong
or unreadable answer never gets full marks). `read_number(text)` reads a text
that must be one number and nothing else (an expected answer).

Where the answer is, in this order:
1. the content of the last `\\boxed{...}` (or `\\fbox{...}`);
2. else the text after the last "####" (GSM8K) or "answer is" / "answer:"
   marker, up to the end of its line;
3. else the whole text.
In 1 the box must hold exactly one number (words around it, such as units
or "x =", are allowed): `\\boxed{2, 3}` or `\\boxed{\\sqrt{2}}` is not read
(None). In 2 the first number after the marker is the answer, in 3 the last
number in the text.

What a number is (exact, as a `fractions.Fraction`):
- integers and decimals, with a sign (`-`, `+`, U+2212 and other Unicode
  minus signs); thousands separators in groups of three: `1,234,567`,
  LaTeX `1{,}234`, thin or no-break spaces (`1 234`); European `1.234,5` is
  not read as a thousand;
- scientific notation: `1.5e3`, `1.5E-3`, `1.5 \\times 10^{3}`, `1.5×10³`
  (exponents beyond +-400 are not read);
- fractions: `a/b`, `\\frac{a}{b}`, `\\dfrac`, `\\tfrac`, `\\frac12`, `½`
  (a sign in front or on the numerator);
- mixed numbers: `3 1/2`, `3\\frac{1}{2}`, `3½` (= 7/2; `-3 1/2` = -7/2);
  only with a proper fraction (numerator < denominator);
- percentages: `50%`, `50\\%`, `50 percent` (value 1/2, `percent` set);
- any Unicode decimal digits (fullwidth `４２`, Arabic-Indic `٤٢`,
  Devanagari...), the Arabic decimal and thousands separators;
- LaTeX wrapping is ignored: `$...$`, `\\left( \\right)`, `\\text{...}`,
  `\\mathrm{...}`, spacing commands, `^\\circ`, a `\\$` before the number.
A number directly followed by a single letter (a variable: `3x`, `2y+1`) or
`^` (`2^{10}`), or inside other LaTeX braces (`\\sqrt{3}`), is not a number on
its own; one followed by a word (a unit or an ordinal: `5cm`, `3rd`) is. A
sign right after a letter or digit is a hyphen, not a minus (`COVID-19` holds
19, `10-3` holds 10 and 3).

Comparing (`same`): |got - want| <= atol + rtol * |want| on the values; when
exactly one side is a percentage, the number as written also counts
("50%" matches both 0.5 and 50, because the question may ask in percent).

Why not a library: math-verify (with latex2sympy2_extended and the ANTLR
runtime) reads symbolic LaTeX, which a numeric check does not need, and
does not read non-ASCII digits; sympy's own LaTeX parser needs ANTLR or lark
too. Reading numbers is short enough to keep here, exact, with no new
dependency.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass
from fractions import Fraction

_INT = r"\d{1,3}(?:,\d{3})+(?!\d)|\d+"
_DEC = rf"(?:{_INT})(?:\.\d+)?|\.\d+"
_POW = r"(?:\\times|\\cdot|×|·|\*|x)\s*10\s*\^\s*\{?\s*(?P<pow>[-+]?\d+)\s*\}?"
_EXP = rf"(?:[eE](?P<e>[-+]?\d+)|\s*{_POW})"
_NUMBER = re.compile(
    r"(?<![0-9_.{^/\\])(?:(?<![A-Za-z0-9])(?P<sign>[-+]\s*))?(?:"
    r"(?P<whole>\d+)\s+(?P<mnum>\d+)\s*/\s*(?P<mden>\d+)"  # mixed number
    rf"|\(?(?P<num>[-+]?(?:{_DEC}))\)?\s*/\s*\(?(?P<den>[-+]?(?:{_DEC}))\)?"  # fraction
    rf"|(?P<dec>{_DEC})(?:{_EXP})?"  # decimal, maybe scientific
    r")(?P<pct>\s*(?:%|percent\b))?(?![A-Za-z](?![A-Za-z])|[0-9_}^/]|\.\d)",
)
_MAX_POWER = 400
_BOXED = ("\\boxed{", "\\fbox{")
_MARKER = re.compile(r"####|\banswer\s*(?:is|:|=)", re.IGNORECASE)
_FRAC = re.compile(r"\\[dt]?frac\s*(?:\{([^{}]*)\}|(\d))\s*(?:\{([^{}]*)\}|(\d))")
_UNWRAP = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_SUPERSCRIPT = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹⁺⁻", "0123456789+-")
_VULGAR = {"½": "1/2", "⅓": "1/3", "⅔": "2/3", "¼": "1/4", "¾": "3/4", "⅕": "1/5", "⅖": "2/5", "⅗": "3/5",
           "⅘": "4/5", "⅙": "1/6", "⅚": "5/6", "⅛": "1/8", "⅜": "3/8", "⅝": "5/8", "⅞": "7/8"}
_MINUS = dict.fromkeys(map(ord, "\u2212\ufe63\uff0d\u2796"), "-")  # not dashes: "3–5" is a range
_LATEX_DROP = re.compile(r"\\\$|\\left|\\right|\\[,;:! ]|\\displaystyle|\^\s*\{?\\circ\}?|°|\$|\\(?=%)")


@dataclass(frozen=True)
class Number:
    """A number as read: `value` (exact), `written` (the number before a % sign), `percent`."""

    value: Fraction
    written: Fraction
    percent: bool = False


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} or \\fbox{...} (nested braces allowed), or None."""
    start, opener = max((text.rfind(o), o) for o in _BOXED)
    if start < 0:
        return None
    depth, i = 1, start + len(opener)
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def normalize(text: str) -> str:
    """Unicode digits, signs and separators as ASCII; simple LaTeX fractions as `a/b`; wrapping dropped."""
    text = re.sub(r"[⁰¹²³⁴⁵⁶⁷⁸⁹⁺⁻]+", lambda m: "^{" + m.group().translate(_SUPERSCRIPT) + "}", text)
    text = re.sub("|".join(_VULGAR), lambda m: " " + _VULGAR[m.group()], text)
    text = "".join(str(unicodedata.decimal(c)) if c.isdecimal() and not c.isascii() else c for c in text)
    text = text.replace("\u066b", ".").replace("\u066c", ",").translate(_MINUS)
    text = re.sub(r"(?<=\d)[\u00a0\u202f\u2009](?=\d{3}(?!\d))", "", text)
    text = unicodedata.normalize("NFKC", text)
    text = text.replace("{,}", ",")
    for _ in range(3):  # nested \text{\textbf{...}}
        text = _UNWRAP.sub(r" \1 ", text)
    text = _LATEX_DROP.sub("", text)
    return _FRAC.sub(lambda m: f" {m.group(1) or m.group(2)}/{m.group(3) or m.group(4)} ", text)


def _fraction(text: str) -> Fraction:
    return Fraction(text.replace(",", ""))


def _value(m: re.Match) -> Number | None:
    """The Number of one match of `_NUMBER`; None for a zero denominator or an improper mixed number."""
    if m.group("whole") is not None:
        whole, num, den = int(m.group("whole")), int(m.group("mnum")), int(m.group("mden"))
        if not 0 < num < den:
            return None
        written = whole + Fraction(num, den)
    elif m.group("num") is not None:
        den = _fraction(m.group("den"))
        if den == 0:
            return None
        written = _fraction(m.group("num")) / den
    else:
        power = int(m.group("e") or m.group("pow") or "0")
        if abs(power) > _MAX_POWER:  # no answer is that big or small; 10**(10**9) would not fit in memory
            return None
        written = _fraction(m.group("dec")) * Fraction(10) ** power
    if (m.group("sign") or "").strip() == "-":
        written = -written
    percent = m.group("pct") is not None
    return Number(written / 100 if percent else written, written, percent)


def _numbers(text: str) -> list[Number | None]:
    return [_value(m) for m in _NUMBER.finditer(text)]


def read_number(text: str) -> Number | None:
    """`text` read as exactly one number (after `normalize`); None when it holds none or several."""
    found = _numbers(normalize(text))
    return found[0] if len(found) == 1 else None


def read_answer(text: str) -> Number | None:
    """The number a completion gives as its answer (see the module docstring), or None."""
    boxed = last_boxed(text)
    if boxed is not None:
        return read_number(boxed)
    plain = normalize(text)
    markers = list(_MARKER.finditer(plain))
    if markers:
        tail = plain[markers[-1].end():].split("\n", 1)[0]
        found = _numbers(tail)
        return found[0] if found else None
    found = _numbers(plain)
    return found[-1] if found else None


def same(got: Number, want: Number, atol: float, rtol: float) -> bool:
    """Whether `got` answers `want` within |got - want| <= atol + rtol * |want| (see the docstring)."""
    pairs = [(got.value, want.value)]
    if got.percent != want.percent:
        pairs.append((got.written, want.written))
    return any(abs(a - b) <= Fraction(atol) + Fraction(rtol) * abs(b) for a, b in pairs)  # exact: no overflow


def as_float(value: Fraction) -> float:
    """`value` as a float; +-inf beyond the float range (a 400-digit answer is still an answer)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf

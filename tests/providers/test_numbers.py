"""Numeric answers read as the numbers they are (issue #22 item 5): a table worked by hand."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest

from opd_sdk.errors import ClientError
from opd_sdk.types import Completion, FeedbackRequest
from providers.numbers import read_answer, read_number
from providers.verifier import VerifierTeacher

# (completion text, expected answer, score worked by hand)
TABLE = [
    # the reported cases: a boxed LaTeX fraction, a box against a fraction
    ("so \\boxed{\\frac{64}{400}}", "\\frac{63}{400}", 0.0),
    ("so \\boxed{\\frac{63}{400}}", "\\frac{63}{400}", 1.0),
    ("\\boxed{2}", "1/2", 0.0),
    ("\\boxed{\\frac{1}{2}}", "1/2", 1.0),
    ("\\boxed{\\dfrac{3}{4}}", "0.75", 1.0),
    ("\\boxed{\\tfrac12}", "0.5", 1.0),
    ("The answer is 1/2.", "0.5", 1.0),
    ("The answer is 1/2.", "2", 0.0),
    ("\\boxed{-\\frac{1}{2}}", "-0.5", 1.0),
    ("\\boxed{\\frac{-1}{2}}", "-1/2", 1.0),
    ("\\boxed{\\frac{1}{2}}", "-1/2", 0.0),
    # mixed numbers
    ("She drank 3 1/2 cups.", "3.5", 1.0),
    ("\\boxed{3\\frac{1}{2}}", "7/2", 1.0),
    ("\\boxed{3 \\frac{1}{2}}", "3.5", 1.0),
    ("It takes 2½ hours", "2.5", 1.0),
    ("\\boxed{-3 1/2}", "-3.5", 1.0),
    ("\\boxed{3 1/2}", "31/2", 0.0),  # 3.5, not 15.5
    # percentages
    ("\\boxed{50\\%}", "0.5", 1.0),
    ("\\boxed{50\\%}", "50", 1.0),  # the question may ask in percent
    ("The answer is 50%.", "50%", 1.0),
    ("The answer is 5%.", "50%", 0.0),
    ("\\boxed{0.5}", "50\\%", 1.0),
    ("\\boxed{5}", "50%", 0.0),
    ("It rose by 12.5 percent", "12.5%", 1.0),
    # thousands separators
    ("Total: 1,234,567 apples", "1234567", 1.0),
    ("\\boxed{1{,}000}", "1000", 1.0),
    ("\\boxed{1\\,000}", "1000", 1.0),
    ("The answer is 1\u202f234.", "1234", 1.0),
    ("\\boxed{1,234}", "1.234", 0.0),
    ("The answer is $\\$1,200$.", "1200", 1.0),
    # scientific notation
    ("\\boxed{1.5e3}", "1500", 1.0),
    ("\\boxed{1.5 \\times 10^{3}}", "1500", 1.0),
    ("about 1.5×10³ m", "1500", 1.0),
    ("\\boxed{2.5E-2}", "0.025", 1.0),
    ("\\boxed{1.5 \\times 10^{3}}", "150", 0.0),
    # Unicode digits and signs
    ("\\boxed{\u22125}", "-5", 1.0),  # U+2212 MINUS SIGN
    ("\\boxed{\u22125}", "5", 0.0),
    ("答案是４２。", "42", 1.0),  # fullwidth digits after CJK text
    ("الجواب هو ٤٢", "42", 1.0),  # Arabic-Indic digits
    ("الجواب هو ٣٫٥", "3.5", 1.0),  # Arabic decimal separator
    ("उत्तर ४२ है", "42", 1.0),  # Devanagari digits
    ("\\boxed{\uff0d\uff17}", "-7", 1.0),  # fullwidth minus and seven
    ("\\boxed{7}", "\u22127", 0.0),
    # where the answer is
    ("3 + 4 = 7, so \\boxed{7} and not 8", "7", 1.0),
    ("3 + 4 = 7, so \\boxed{7} and not 8", "8", 0.0),
    ("The answer is 12 (3 times 4).", "12", 1.0),
    ("Work: 3 * 4 = 12\n#### 12", "12", 1.0),
    ("First 3, then 4: 19", "19", 1.0),
    ("Temperature: -3.5 degrees", "-3.5", 1.0),
    ("\\boxed{x = 5}", "5", 1.0),
    ("\\boxed{5\\text{ cm}}", "5", 1.0),
    ("\\boxed{90^\\circ}", "90", 1.0),
    # not read with confidence: never full marks
    ("\\boxed{2, 3}", "3", 0.0),
    ("\\boxed{\\sqrt{2}}", "2", 0.0),
    ("\\boxed{2^{10}}", "10", 0.0),
    ("\\boxed{3x}", "3", 0.0),
    ("so y = 2x", "2", 0.0),  # 2x is not the number 2
    ("It is 5cm long", "5", 1.0),
    ("She came 3rd", "3", 1.0),
    ("Cases of COVID-19", "-19", 0.0),  # a hyphen, not a minus sign
    ("10-3=7", "7", 1.0),
    ("\\boxed{}", "0", 0.0),
    ("\\boxed{1/0}", "0", 0.0),
    ("no digits here", "1", 0.0),
    ("", "0", 0.0),
    ("   \n", "0", 0.0),
]


def test_the_hand_worked_table_has_at_least_40_rows():
    assert len(TABLE) >= 40


@pytest.mark.parametrize("text, answer, expected", TABLE)
def test_numeric_verifier_reads_answers_as_the_numbers_they_are(text, answer, expected):
    teacher = VerifierTeacher("numeric")
    score, _ = teacher.score_text(text, answer)
    assert score == expected, (text, answer, read_answer(text), read_number(answer))


def test_numbers_are_exact_fractions():
    assert read_answer("\\boxed{\\frac{64}{400}}").value == Fraction(4, 25)
    assert read_number("3\\frac{1}{2}").value == Fraction(7, 2)
    assert read_number("50%").written == 50 and read_number("50%").value == Fraction(1, 2)
    assert read_number("1, 2") is None and read_number("abc") is None


@pytest.mark.parametrize("text", ["1e999999999", "\\boxed{1.5 \\times 10^{99999999}}", "9" * 500, "-" + "9" * 400])
def test_absurd_numbers_in_a_completion_neither_crash_nor_hang(text):
    teacher = VerifierTeacher("numeric")
    score, extracted = teacher.score_text(text, "7")
    assert score == 0.0 and (extracted is None or math.isinf(extracted))


def test_an_expected_answer_that_is_not_one_number_is_refused_with_the_fix():
    request = FeedbackRequest(prompt="q", completions=[Completion(text="\\boxed{1}")], metadata={"answer": "1 or 2"})
    with pytest.raises(ClientError, match="not one number.*mode='exact'"):
        VerifierTeacher("numeric").score(request)

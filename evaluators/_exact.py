"""The exact-match scorer: go-ml's GSM8K answer extraction and comparison (gsm8k-1).

Extraction: the number after `####` if there is one, else the last number that starts the text
or follows whitespace or "=" (so "$42" and "(42" are not found: go-ml's behaviour, kept).
Both sides lose their commas and are parsed with Go's float syntax; correct iff they differ
by at most 0.01.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from evaluators._gostr import GO_SPACE, is_error_response, parse_float, trim

NAME = "exact"
VERSION = "gsm8k-1"

_HASH_ANSWER = re.compile(rf"####{GO_SPACE}*([0-9,.\-]+)")
_LAST_NUMBER = re.compile(r"(?:^|[\t\n\f\r =])(-?[0-9,]+(?:\.[0-9]+)?)")


@dataclass(slots=True)
class ExactScore:
    """go-ml's StandardScores subset for GSM8K: correct, extracted, expected."""

    correct: bool
    extracted: str
    expected: str

    def to_dict(self) -> dict[str, bool | str]:
        """JSON keys as go-ml writes them under `standard`."""
        return {"correct": self.correct, "extracted": self.extracted, "expected": self.expected}


def extract_answer(response: str) -> str:
    """The answer text go-ml's GSM8K scorer takes from a response ("" if none).

    Args:
        response: the model's answer.
    """
    if response == "" or is_error_response(response):
        return ""
    m = _HASH_ANSWER.search(response)
    if m:
        return m.group(1)
    last = ""
    for m in _LAST_NUMBER.finditer(response):
        last = m.group(1)
    return last


def score_gsm8k(response: str, correct_answer: str) -> ExactScore:
    """Extract the numeric answer and compare it with the expected one (within 0.01).

    Args:
        response: the model's answer.
        correct_answer: the reference answer (e.g. "72" or "1,234").
    """
    extracted = extract_answer(response)
    if not extracted:
        return ExactScore(False, "", correct_answer)
    try:
        got = parse_float(trim(extracted.replace(",", "")))
        want = parse_float(trim(correct_answer.replace(",", "")))
    except ValueError:
        return ExactScore(False, extracted, correct_answer)
    return ExactScore(abs(want - got) <= 0.01, extracted, correct_answer)


def score_exact(response: str, correct_answer: str) -> float:
    """1.0 on a numeric GSM8K match, else 1.0 if the trimmed texts are equal and non-empty, else 0.0.

    Args:
        response: the model's answer.
        correct_answer: the reference answer.
    """
    if score_gsm8k(response, correct_answer).correct:
        return 1.0
    r = trim(response)
    return 1.0 if r != "" and r == trim(correct_answer) else 0.0

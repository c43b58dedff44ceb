"""Find the JSON object in a judge's reply, however it was wrapped.

Judges put their verdict in code fences, after a preamble, with braces inside strings, with
trailing commas, single quotes, Python literals or smart quotes, or cut off by the token limit.
`extract_json` tries the fenced blocks first, then the whole reply; in each it takes every
`{` in turn, finds its matching `}` while skipping over JSON strings, and parses the span, with
a few repairs when plain JSON fails. It never raises: no object gives None.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterator, Sequence

_FENCE = re.compile(r"```[ \t]*(?:json|JSON|javascript|js)?[ \t]*\n?(.*?)```", re.DOTALL)
_TRAILING_COMMA = re.compile(r",(\s*[}\]])")
_UNQUOTED_KEY = re.compile(r'([{,]\s*)([A-Za-z_][A-Za-z0-9_]*)(\s*:)')
_PLUS_NUMBER = re.compile(r'(:\s*)\+(?=\d)')
_PY_LITERAL = re.compile(r"(?<![\w\"'])(True|False|None)(?![\w\"'])")
# A key (and maybe a colon) left dangling where the reply was cut off: `{"a": 3, "b":}`.
_DANGLING = re.compile(r'(?:,\s*|(?<={)\s*)"[^"]*"\s*:?\s*(?=}+$)')
_SMART = str.maketrans({"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'"})

# Bounds that keep a pathological reply (thousands of braces) from taking long.
MAX_STARTS = 64
MAX_CHARS = 200_000


def _object_spans(text: str) -> Iterator[str]:
    """Each `{...}` span in order of its opening brace; an unclosed one is closed by repair."""
    starts = 0
    i = text.find("{")
    while i != -1 and starts < MAX_STARTS:
        starts += 1
        depth = 0
        in_str = False
        esc = False
        end = -1
        for j in range(i, len(text)):
            c = text[j]
            if in_str:
                if esc:
                    esc = False
                elif c == "\\":
                    esc = True
                elif c == '"':
                    in_str = False
            elif c == '"':
                in_str = True
            elif c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    end = j
                    break
        if end != -1:
            yield text[i : end + 1]
        else:
            # Cut off (the judge ran out of tokens): close the open string and braces.
            yield text[i:] + ('"' if in_str else "") + "}" * max(depth, 1)
        i = text.find("{", i + 1)


def _repairs(span: str) -> Iterator[str]:
    yield span
    s = span.translate(_SMART)
    s = _TRAILING_COMMA.sub(r"\1", s)
    s = _PLUS_NUMBER.sub(r"\1", s)
    yield s
    s = _UNQUOTED_KEY.sub(r'\1"\2"\3', s)
    s = _PY_LITERAL.sub(lambda m: {"True": "true", "False": "false", "None": "null"}[m.group(1)], s)
    yield s
    if '"' not in span and "'" in s:
        yield s.replace("'", '"')
    cut = _DANGLING.sub("", s)
    if cut != s:
        yield cut


def _parse(span: str) -> dict[str, Any] | None:
    for candidate in _repairs(span):
        try:
            obj = json.loads(candidate)
        except (ValueError, RecursionError):
            continue
        if isinstance(obj, dict):
            return obj
    return None


def extract_json(text: str, keys: Sequence[str] = ()) -> dict[str, Any] | None:
    """The first JSON object in a reply (preferring one that has any of `keys`), or None.

    Args:
        text: the judge's whole reply.
        keys: keys the wanted object has; an object without any of them (a judge echoing an
            example, or a wrapper) is used only when nothing better is found.
    """
    if not isinstance(text, str) or "{" not in text:
        return None
    text = text[:MAX_CHARS]
    regions = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    fallback: dict[str, Any] | None = None
    for region in regions:
        for span in _object_spans(region):
            obj = _parse(span)
            if obj is None:
                continue
            if not keys or any(k in obj for k in keys):
                return obj
            if fallback is None:
                fallback = obj
    return fallback

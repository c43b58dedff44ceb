"""Go string and regexp semantics, for scorers that must give go-ml's numbers on the same text.

Go differs from Python in ways that change scores:
- `strings.TrimSpace` trims Unicode White_Space; Python's `str.strip()` also trims \\x1c-\\x1f.
- `len(s)` counts UTF-8 bytes, not characters.
- In RE2, `\\s` is `[\\t\\n\\f\\r ]` (no \\v), `\\d`, `\\w` and `\\b` are ASCII, `$` without (?m) is the
  end of the text (Python's `$` also matches before a final newline), and `(?i)` folds `k` with
  the Kelvin sign and `s` with the long s, but `i` with nothing else (Python's Unicode
  IGNORECASE also folds `i` with İ and ı).
So the ported patterns compile with `re.ASCII | re.IGNORECASE`, spell `\\s` as `GO_SPACE`, use
`\\Z` for `$`, and pass literal words through `fold()`.
"""

from __future__ import annotations

import math
import re

# unicode.IsSpace: what strings.TrimSpace removes.
GO_WHITESPACE = (
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
# RE2's \s.
GO_SPACE = r"[\t\n\f\r ]"
GO_FLAGS = re.ASCII | re.IGNORECASE

_FOLD = {"k": "[k\u212a]", "K": "[k\u212a]", "s": "[s\u017f]", "S": "[s\u017f]"}


def fold(literal: str) -> str:
    """A regex for `literal` that, under GO_FLAGS, case-folds exactly as Go's (?i) does.

    Args:
        literal: plain text (regex metacharacters are escaped; a space stays a space).
    """
    return "".join(_FOLD.get(c) or re.escape(c) for c in literal)


def trim(s: str) -> str:
    """Go's strings.TrimSpace.

    Args:
        s: any text.
    """
    return s.strip(GO_WHITESPACE)


def blen(s: str) -> int:
    """Go's len(s) for a string that came from this text: its length in UTF-8 bytes.

    A lone surrogate (possible in JSON input) counts 3 bytes, like the U+FFFD Go decodes it to.

    Args:
        s: any text.
    """
    if s.isascii():
        return len(s)
    return len(s.encode("utf-8", "surrogatepass"))


def byte_prefix(s: str, n: int) -> str:
    """Go's s[:n] on the UTF-8 bytes of s, decoded back (a cut character becomes U+FFFD).

    Args:
        s: any text.
        n: number of bytes to keep.
    """
    if s.isascii():
        return s[:n]
    return s.encode("utf-8", "surrogatepass")[:n].decode("utf-8", "replace")


def is_error_response(s: str) -> bool:
    """go-ml's isErrorResponse: the trimmed text starts with "error", in any case.

    Args:
        s: a model response.
    """
    return trim(s)[:5].lower() == "error"


# strconv.ParseFloat's decimal syntax (underscores only between digits) and hex floats (the
# exponent is mandatory).
_DEC = r"[0-9](?:_?[0-9])*"
_HEX = r"[0-9a-fA-F](?:_?[0-9a-fA-F])*"
_FLOAT_RX = re.compile(
    rf"[+-]?(?:(?:{_DEC}(?:\.(?:{_DEC})?)?|\.{_DEC})(?:[eE][+-]?{_DEC})?"
    rf"|0[xX]_?(?:{_HEX}(?:\.(?:{_HEX})?)?|\.{_HEX})[pP][+-]?{_DEC})",
    re.ASCII,
)
_SPECIAL_RX = re.compile(r"([+-]?)(inf|infinity)|nan", re.ASCII | re.IGNORECASE)


def parse_float(s: str) -> float:
    """Go's strconv.ParseFloat(s, 64): the same accepted syntax, ValueError where Go errs.

    Python's float() accepts more (surrounding whitespace, non-ASCII digits) and returns inf
    where Go reports a range error.

    Args:
        s: the text of one number, already trimmed.
    """
    m = _SPECIAL_RX.fullmatch(s)
    if m:
        if m.group(0).lower() == "nan":
            return math.nan
        return -math.inf if m.group(1) == "-" else math.inf
    if not _FLOAT_RX.fullmatch(s):
        raise ValueError(f"invalid syntax: {s!r}")
    t = s.replace("_", "")
    body = t.lstrip("+-")
    try:
        if body[:2].lower() == "0x":
            v = float.fromhex(body)
            v = -v if t.startswith("-") else v
        else:
            v = float(t)
    except OverflowError:
        raise ValueError(f"value out of range: {s!r}") from None
    if math.isinf(v):
        raise ValueError(f"value out of range: {s!r}")
    return v

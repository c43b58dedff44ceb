"""InfluxDB line protocol: the `Point` record, its serialisation and a parser for the same dialect.

Escaping follows the line-protocol spec: measurement names escape commas and spaces; tag keys,
tag values and field keys escape commas, equals signs and spaces; string field values escape
double quotes and backslashes. Integers carry an `i` suffix, booleans are `true`/`false`, floats
are written with Python's shortest round-trip repr.

Two rules keep one point on exactly one line that every server reads the same way, and a bad
point fails at `to_line()` with a `PointError` naming the point and the problem (nothing is
written):
- no line breaks or tabs anywhere (InfluxDB 1.x would accept a newline inside a string field,
  VictoriaMetrics splits the line there; the spool relies on one line per point);
- no backslash in a name or tag value that InfluxDB 1.x and 2.x would read differently: one that
  ends the text or precedes a backslash, comma, equals sign or space (1.6.7 keeps `\\\\` as two
  backslashes, 2.x folds it to one; neither can write a trailing backslash before a separator).
Tags with an empty value are left out, which is what InfluxDB does with them anyway.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Mapping, Union

FieldValue = Union[bool, int, float, str]

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


class PointError(ValueError):
    """A point that cannot be written as line protocol; the message names the point and the problem."""


@dataclass(frozen=True)
class Point:
    """One InfluxDB point: measurement, tags, fields and a timestamp in nanoseconds since the epoch.

    The timestamp is always set by the writer (never left to the server), so writing the same point
    twice stores it once: InfluxDB and VictoriaMetrics (with dedup) overwrite a point that has the
    same measurement, tags and timestamp.
    """

    measurement: str
    """The measurement name."""
    tags: Mapping[str, str]
    """Tag key -> value (an empty value is left out of the line)."""
    fields: Mapping[str, FieldValue]
    """Field key -> value (at least one)."""
    time_ns: int
    """Nanoseconds since the epoch."""

    def to_line(self) -> str:
        """This point as one line of line protocol (no trailing newline).

        Raises:
            PointError: the point cannot be written (names the measurement, the key and why).
        """
        return to_line(self)

    def identity(self) -> tuple:
        """What makes two points the same point on the server: measurement, tags, timestamp."""
        return (self.measurement, tuple(sorted((k, v) for k, v in self.tags.items() if v != "")), self.time_ns)


# --------------------------------------------------------------------------- serialise

_MEASUREMENT_ESC = str.maketrans({",": r"\,", " ": r"\ "})
_KEY_ESC = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ "})
_STRING_ESC = str.maketrans({"\\": "\\\\", '"': '\\"'})
_LINE_BREAKS = ("\n", "\r", "\t")
_AFTER_BACKSLASH = frozenset("\\,= ")


def _where(p: Point) -> str:
    return f"point {p.measurement!r}"


def _name_problem(s: object) -> str | None:
    """Why `s` cannot be a measurement, key or tag value, or None."""
    if not isinstance(s, str):
        return f"must be a string, got {type(s).__name__} {s!r}"
    if not s:
        return "is empty"
    for ch in _LINE_BREAKS:
        if ch in s:
            return f"{s!r} contains a line break or tab; line protocol cannot carry it"
    i = s.find("\\")
    while i != -1:
        if i == len(s) - 1 or s[i + 1] in _AFTER_BACKSLASH:
            return (f"{s!r} has a backslash at the end or before a backslash, comma, equals sign or space;"
                    " InfluxDB 1.x and 2.x read that differently")
        i = s.find("\\", i + 1)
    return None


def writable_tag(s: str) -> str:
    """A text from outside (a run directory's name) as a tag value every server reads the same way:
    a line break or tab becomes a space, and a backslash the rules above refuse (at the end, or
    before a backslash, comma, equals sign or space) becomes "/". Other texts are returned as they
    are, so a name without these keeps its points (and their identity).

    Args:
        s: the text.
    """
    if _name_problem(s) is None:
        return s
    for ch in _LINE_BREAKS:
        s = s.replace(ch, " ")
    out = [("/" if c == "\\" and (i == len(s) - 1 or s[i + 1] in _AFTER_BACKSLASH) else c) for i, c in enumerate(s)]
    return "".join(out) or "-"


@lru_cache(maxsize=8192)
def _escaped_key(s: str) -> str | None:
    # Keys and tag values repeat from point to point: check and escape each text once.
    return None if _name_problem(s) else s.translate(_KEY_ESC)


def _key(p: Point, what: str, s: object) -> str:
    out = _escaped_key(str(s)) if isinstance(s, str) else None
    if out is None:
        raise PointError(f"{_where(p)}: {what} {_name_problem(s)}")
    return out


def _field_value(p: Point, key: str, v: object) -> str:
    t = type(v)
    if t is float:
        if v - v != 0.0:  # NaN or infinity
            raise PointError(f"{_where(p)}: field {key!r} = {v!r}; line protocol has no NaN or infinity")
        return repr(v)
    if t is int:
        if not INT64_MIN <= v <= INT64_MAX:
            raise PointError(f"{_where(p)}: field {key!r} = {v} does not fit in a signed 64-bit integer")
        return f"{v}i"
    if t is bool or (t.__module__ == "numpy" and t.__name__ in ("bool", "bool_")):
        return "true" if v else "false"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, numbers.Integral):
        return _field_value(p, key, int(v))
    if isinstance(v, numbers.Real):
        return _field_value(p, key, float(v))
    if isinstance(v, str):
        for ch in ("\n", "\r"):
            if ch in v:
                raise PointError(
                    f"{_where(p)}: string field {key!r} contains a line break; line protocol cannot carry it portably"
                )
        return '"' + v.translate(_STRING_ESC) + '"'
    raise PointError(
        f"{_where(p)}: field {key!r} has type {type(v).__name__}; use float, int, bool or str"
    )


def to_line(p: Point) -> str:
    """Serialise a point as one line of line protocol.

    Args:
        p: the point; tags are written sorted by key, tags with an empty value are left out.

    Raises:
        PointError: names the measurement, the key and what is wrong.
    """
    m = p.measurement
    problem = _name_problem(m)
    if problem:
        raise PointError(f"{_where(p)}: measurement {problem}")
    if m.startswith("#"):
        raise PointError(f"{_where(p)}: a measurement cannot start with '#' (line protocol reads it as a comment)")
    parts = [m.translate(_MEASUREMENT_ESC)]
    tags = p.tags
    for k in sorted(tags):
        v = tags[k]
        if v is None or v == "":
            continue
        if k == "time":
            raise PointError(f"{_where(p)}: 'time' cannot be a tag key")
        parts.append(_key(p, "tag key", k) + "=" + _key(p, f"tag {k!r} value", v))
    if not p.fields:
        raise PointError(f"{_where(p)}: a point needs at least one field")
    fields = []
    for k, v in p.fields.items():
        if k == "time":
            raise PointError(f"{_where(p)}: 'time' cannot be a field key")
        fields.append(_key(p, "field key", k) + "=" + _field_value(p, k, v))
    t = p.time_ns
    if isinstance(t, bool) or not isinstance(t, numbers.Integral):
        raise PointError(f"{_where(p)}: time_ns must be an integer number of nanoseconds, got {type(t).__name__}")
    if not INT64_MIN <= int(t) <= INT64_MAX:
        raise PointError(f"{_where(p)}: time_ns {t} is outside the signed 64-bit range")
    return ",".join(parts) + " " + ",".join(fields) + f" {int(t)}"


def to_lines(points: Iterable[Point]) -> list[str]:
    """Serialise many points; the first bad one raises `PointError` before anything is returned."""
    return [to_line(p) for p in points]


# --------------------------------------------------------------------------- parse


def _scan(s: str, i: int, stops: str) -> tuple[str, int]:
    """Read an escaped token from s[i:] up to an unescaped char in `stops`; return (unescaped, end)."""
    out = []
    n = len(s)
    while i < n:
        c = s[i]
        if c == "\\" and i + 1 < n and s[i + 1] in ",= ":
            out.append(s[i + 1])
            i += 2
            continue
        if c in stops:
            break
        out.append(c)
        i += 1
    return "".join(out), i


def _parse_value(line: str, raw: str) -> FieldValue:
    if raw.startswith('"'):
        raise AssertionError("strings are handled by the caller")
    if raw.endswith("i") and raw[:-1].lstrip("-").isdigit():
        return int(raw[:-1])
    if raw.endswith("u") and raw[:-1].isdigit():
        return int(raw[:-1])
    if raw in ("t", "T", "true", "True", "TRUE"):
        return True
    if raw in ("f", "F", "false", "False", "FALSE"):
        return False
    try:
        return float(raw)
    except ValueError:
        raise PointError(f"line {line[:80]!r}: field value {raw!r} is not a number, boolean or string") from None


def parse_line(line: str) -> Point:
    """Parse one line of line protocol into a `Point`.

    Args:
        line: one line (no newline); the timestamp is required (this project always writes one).

    Raises:
        PointError: the line is not valid line protocol.
    """
    s = line
    measurement, i = _scan(s, 0, ", ")
    if not measurement:
        raise PointError(f"line {line[:80]!r}: no measurement")
    tags: dict[str, str] = {}
    while i < len(s) and s[i] == ",":
        k, i = _scan(s, i + 1, "=, ")
        if i >= len(s) or s[i] != "=":
            raise PointError(f"line {line[:80]!r}: tag {k!r} has no value")
        v, i = _scan(s, i + 1, ", ")
        tags[k] = v
    if i >= len(s) or s[i] != " ":
        raise PointError(f"line {line[:80]!r}: no fields")
    i += 1
    fields: dict[str, FieldValue] = {}
    while True:
        k, i = _scan(s, i, "=, ")
        if i >= len(s) or s[i] != "=":
            raise PointError(f"line {line[:80]!r}: field {k!r} has no value")
        i += 1
        if i < len(s) and s[i] == '"':
            j = i + 1
            out = []
            while j < len(s) and s[j] != '"':
                if s[j] == "\\" and j + 1 < len(s) and s[j + 1] in '"\\':
                    out.append(s[j + 1])
                    j += 2
                    continue
                out.append(s[j])
                j += 1
            if j >= len(s):
                raise PointError(f"line {line[:80]!r}: unterminated string in field {k!r}")
            fields[k] = "".join(out)
            i = j + 1
        else:
            j = i
            while j < len(s) and s[j] not in ", ":
                j += 1
            fields[k] = _parse_value(line, s[i:j])
            i = j
        if i < len(s) and s[i] == ",":
            i += 1
            continue
        break
    if i >= len(s) or s[i] != " ":
        raise PointError(f"line {line[:80]!r}: no timestamp")
    ts = s[i + 1:].strip()
    try:
        t = int(ts)
    except ValueError:
        raise PointError(f"line {line[:80]!r}: timestamp {ts!r} is not an integer") from None
    return Point(measurement, tags, fields, t)

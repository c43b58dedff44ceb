"""Line protocol: escaping by the spec's rules, types, clear errors, and parse(serialise(p)) == p.

The same points are written to and read back from the real servers in test_sinks_influx.py.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evaluators.sinks import Point, PointError, parse_line, to_line


def test_escaping_follows_the_spec():
    p = Point(
        "cpu load,x",
        {"host name": "a b,c=d", "k=v": "x", "empty": ""},
        {"f,1 =": 1.5, "n": 7, "ok": True, "bad": False, "s": 'say "hi" \\ there'},
        1_700_000_000_000_000_000,
    )
    assert to_line(p) == (
        r"cpu\ load\,x,host\ name=a\ b\,c\=d,k\=v=x "
        r'f\,1\ \==1.5,n=7i,ok=true,bad=false,s="say \"hi\" \\ there" 1700000000000000000'
    )


def test_tags_sorted_and_empty_tags_left_out():
    p = Point("m", {"z": "1", "a": "2", "gone": ""}, {"v": 1.0}, 5)
    assert to_line(p) == "m,a=2,z=1 v=1.0 5"


@pytest.mark.parametrize(
    "value, text",
    [(0.1, "0.1"), (1e16, "1e+16"), (1.5e-07, "1.5e-07"), (-0.0, "-0.0"), (3.0, "3.0"),
     (2**63 - 1, "9223372036854775807i"), (-(2**63), "-9223372036854775808i"), (True, "true")],
)
def test_field_types(value, text):
    assert to_line(Point("m", {}, {"v": value}, 1)) == f"m v={text} 1"


def test_numpy_scalars_are_numbers():
    np = pytest.importorskip("numpy")
    line = to_line(Point("m", {}, {"f": np.float32(0.5), "i": np.int64(3), "b": np.bool_(True)}, 1))
    assert line == "m f=0.5,i=3i,b=true 1"


@pytest.mark.parametrize(
    "point, message",
    [
        (Point("m", {}, {"v": math.nan}, 1), r"field 'v' = nan; line protocol has no NaN"),
        (Point("m", {}, {"v": math.inf}, 1), r"field 'v' = inf"),
        (Point("m", {}, {"v": 2**63}, 1), r"does not fit in a signed 64-bit integer"),
        (Point("m", {}, {}, 1), r"needs at least one field"),
        (Point("", {}, {"v": 1}, 1), r"measurement is empty"),
        (Point("#m", {}, {"v": 1}, 1), r"cannot start with '#'"),
        (Point("m", {"t": "a\nb"}, {"v": 1}, 1), r"tag 't' value 'a\\nb' contains a line break"),
        (Point("m", {}, {"s": "two\nlines"}, 1), r"string field 's' contains a line break"),
        (Point("m", {"t": "ends\\"}, {"v": 1}, 1), r"backslash at the end"),
        (Point("m", {"t": "a\\,b"}, {"v": 1}, 1), r"backslash .* before a backslash, comma"),
        (Point("m", {"time": "x"}, {"v": 1}, 1), r"'time' cannot be a tag key"),
        (Point("m", {}, {"time": 1}, 1), r"'time' cannot be a field key"),
        (Point("m", {"t": 3}, {"v": 1}, 1), r"tag 't' value must be a string, got int"),
        (Point("m", {}, {"v": [1]}, 1), r"field 'v' has type list"),
        (Point("m", {}, {"v": 1}, 1.5), r"time_ns must be an integer"),
        (Point("m", {}, {"v": 1}, 2**64), r"outside the signed 64-bit range"),
    ],
)
def test_bad_points_name_the_problem(point, message):
    with pytest.raises(PointError, match=message) as e:
        to_line(point)
    assert str(e.value).startswith(f"point {point.measurement!r}")


def test_a_lone_backslash_is_kept_literally():
    # InfluxDB 1.6.7 and 2.x both read "a\b" as a, backslash, b (checked on the server in test_sinks_influx).
    line = to_line(Point("m\\x", {"t": "a\\b"}, {"v": 1}, 1))
    assert line == "m\\x,t=a\\b v=1i 1"
    assert parse_line(line) == Point("m\\x", {"t": "a\\b"}, {"v": 1}, 1)


def test_parse_reads_other_writers_dialect():
    p = parse_line('m,t=x a=1,b=2i,c=t,d=FALSE,e="q\\"\\\\",f=-1.5e3,g=7u 42')
    assert p == Point("m", {"t": "x"}, {"a": 1.0, "b": 2, "c": True, "d": False, "e": 'q"\\', "f": -1500.0, "g": 7}, 42)
    assert isinstance(p.fields["a"], float) and isinstance(p.fields["b"], int)
    with pytest.raises(PointError, match="no timestamp"):
        parse_line("m v=1")


# Names: anything printable without line breaks, minus backslashes a server would read two ways.
_name = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=12).filter(
    lambda s: "\\" not in s and not s.startswith("#")
)
_key = _name.filter(lambda s: s != "time")
_value = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=20),
)


@settings(max_examples=300, deadline=None)
@given(
    m=_name,
    tags=st.dictionaries(_key, _name, max_size=4),
    fields=st.dictionaries(_key, _value, min_size=1, max_size=5),
    t=st.integers(min_value=-(2**63), max_value=2**63 - 1),
)
def test_round_trip(m, tags, fields, t):
    p = Point(m, tags, fields, t)
    back = parse_line(to_line(p))
    assert back.measurement == m and back.tags == tags and back.time_ns == t
    assert back.fields.keys() == fields.keys()
    for k, v in fields.items():
        assert type(back.fields[k]) is type(v) and (back.fields[k] == v or (v != v))

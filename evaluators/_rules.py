"""Capability pass rules written as data, and the checker that runs them (caprules-1).

A rule is a mapping with one operator key. Text operators:

    {contains: "28.75"}                    substring (add `ignore_case: true` to fold case)
    {regex: 'x\\s*=\\s*-12', ignore_case: true}    Python `re` search
    {word: ["chicken", "hen"]}             whole word or phrase, case-insensitive by default
    {number: 612}                          a standalone number equal to 612 ("$612" and
                                           "612.00" count; "6120" and "16.12" do not)
    {number: {min: 153.9, max: 154.0}}     a standalone number in a closed range
    {final_number: -12}                    the last standalone number equals -12
    {last_of: [north, south, east, west], is: south}
                                           of these words, the last one mentioned is `is`
Combinators: {any: [rule, ...]}, {all: [rule, ...]}, {not: rule}.

Numbers: an optional unary sign (also the Unicode minus), digits with optional thousands commas,
an optional decimal part; "standalone" means not part of a longer number ("1620" holds no 162,
"16.2" no 16 or 2), while a number next to letters or symbols counts ("$612", "x2", "3x").
Responses are checked after go-ml's think-block stripping (`strip_think_blocks`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from evaluators._gostr import blen, byte_prefix, trim

NAME = "capability"
VERSION = "caprules-1"

_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
# An optional sign (only a unary one: directly before the digits and not after a word or a
# closing bracket, so "2x-5" gives 5), digits with optional thousands commas, optional decimals;
# never the tail or head of a longer number ("1620" holds no 162, "1.2.3" holds no number).
_NUMBER = re.compile(
    r"(?<![0-9.])(?:(?<![\w)\]])([-\u2212\u2013]))?([0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(\.[0-9]+)?(?![0-9]|\.[0-9])"
)


class RuleError(ValueError):
    """A pass rule that is not valid. The message names the probe and what is wrong."""


def strip_think_blocks(text: str) -> str:
    """go-ml's StripThinkBlocks: drop `<think>...</think>`; if nothing is left, keep the original
    (its first 500 bytes when it is longer).

    Args:
        text: the model's answer.
    """
    clean = trim(_THINK.sub("", text))
    if clean:
        return clean
    if blen(text) > 500:
        return byte_prefix(text, 500)
    return text


def numbers(text: str) -> list[float]:
    """The standalone numbers in a text, in order (commas dropped, Unicode minus accepted).

    Args:
        text: any text.
    """
    out = []
    for m in _NUMBER.finditer(text):
        sign, digits, frac = m.group(1), m.group(2), m.group(3) or ""
        v = float(digits.replace(",", "") + frac)
        out.append(-v if sign else v)
    return out


@dataclass(frozen=True)
class Rule:
    """A compiled pass rule: `check(text)` says whether an answer passes."""

    spec: Any
    check: Callable[[str], bool]

    def __call__(self, text: str) -> bool:
        return self.check(text)


_TEXT_OPS = ("contains", "regex", "word", "number", "final_number", "last_of")
_COMBINATORS = ("any", "all", "not")
_MODIFIERS = {"ignore_case", "tol", "is"}


def _near(value: float, target: float, tol: float) -> bool:
    return abs(value - target) <= tol


def _number_test(arg: Any, tol: float, where: str) -> Callable[[float], bool]:
    if isinstance(arg, bool):
        raise RuleError(f"{where}: expected a number or {{min, max}}, got {arg!r}")
    if isinstance(arg, (int, float)):
        target = float(arg)
        return lambda v: _near(v, target, tol)
    if isinstance(arg, dict) and set(arg) <= {"min", "max"} and arg:
        lo, hi = arg.get("min", float("-inf")), arg.get("max", float("inf"))
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (lo, hi)) or lo > hi:
            raise RuleError(f"{where}: min/max must be numbers with min <= max, got {arg!r}")
        return lambda v: lo - tol <= v <= hi + tol
    raise RuleError(f"{where}: expected a number or {{min, max}}, got {arg!r}")


def _strings(arg: Any, where: str) -> list[str]:
    items = [arg] if isinstance(arg, str) else arg
    if not isinstance(items, list) or not items or not all(isinstance(s, str) and s for s in items):
        raise RuleError(f"{where}: expected a non-empty string or list of strings, got {arg!r}")
    return items


def _word_rx(words: list[str], flags: int) -> re.Pattern[str]:
    alts = "|".join(r"\s+".join(re.escape(p) for p in w.split()) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"(?<![^\W_])(?:{alts})(?![^\W_])", flags)


def compile_rule(spec: Any, where: str = "rule") -> Rule:
    """Validate a rule written as data and compile it.

    Args:
        spec: the rule (a mapping with one operator key, see the module doc).
        where: what to name in error messages, e.g. "capability probe math_03: pass".
    """
    if not isinstance(spec, dict):
        raise RuleError(f"{where}: a rule must be a mapping, got {type(spec).__name__}")
    ops = [k for k in spec if k in _TEXT_OPS or k in _COMBINATORS]
    unknown = [k for k in spec if k not in _TEXT_OPS and k not in _COMBINATORS and k not in _MODIFIERS]
    if unknown:
        raise RuleError(
            f"{where}: unknown key {unknown[0]!r} (operators: {', '.join(_TEXT_OPS + _COMBINATORS)};"
            f" modifiers: {', '.join(sorted(_MODIFIERS))})"
        )
    if len(ops) != 1:
        raise RuleError(f"{where}: a rule needs exactly one operator, got {ops or 'none'}")
    op = ops[0]
    arg = spec[op]
    here = f"{where}.{op}"
    ignore_case = spec.get("ignore_case", op in ("word", "last_of"))
    if not isinstance(ignore_case, bool):
        raise RuleError(f"{where}: ignore_case must be true or false, got {ignore_case!r}")
    tol = spec.get("tol", 1e-9)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or tol < 0:
        raise RuleError(f"{where}: tol must be a non-negative number, got {tol!r}")
    flags = re.IGNORECASE if ignore_case else 0
    if "is" in spec and op != "last_of":
        raise RuleError(f"{where}: `is` only goes with last_of")

    check: Callable[[str], bool]
    if op in _COMBINATORS:
        if op == "not":
            inner = compile_rule(arg, here)
            check = lambda t, inner=inner: not inner(t)  # noqa: E731
        else:
            if not isinstance(arg, list) or not arg:
                raise RuleError(f"{here}: expected a non-empty list of rules")
            parts = [compile_rule(r, f"{here}[{i}]") for i, r in enumerate(arg)]
            fn = any if op == "any" else all
            check = lambda t, parts=parts, fn=fn: fn(p(t) for p in parts)  # noqa: E731
    elif op == "contains":
        needles = _strings(arg, here)
        if ignore_case:
            low = [n.casefold() for n in needles]
            check = lambda t, low=low: any(n in t.casefold() for n in low)  # noqa: E731
        else:
            check = lambda t, needles=needles: any(n in t for n in needles)  # noqa: E731
    elif op == "regex":
        patterns = _strings(arg, here)
        try:
            rxs = [re.compile(p, flags) for p in patterns]
        except re.error as e:
            raise RuleError(f"{here}: not a valid regex: {e}") from None
        check = lambda t, rxs=rxs: any(rx.search(t) for rx in rxs)  # noqa: E731
    elif op == "word":
        rx = _word_rx(_strings(arg, here), flags)
        check = lambda t, rx=rx: rx.search(t) is not None  # noqa: E731
    elif op == "number":
        test = _number_test(arg, tol, here)
        check = lambda t, test=test: any(test(v) for v in numbers(t))  # noqa: E731
    elif op == "final_number":
        test = _number_test(arg, tol, here)

        def check(t: str, test: Callable[[float], bool] = test) -> bool:
            found = numbers(t)
            return bool(found) and test(found[-1])
    else:  # last_of
        words = _strings(arg, here)
        target = spec.get("is")
        if not isinstance(target, str) or target.casefold() not in {w.casefold() for w in words}:
            raise RuleError(f"{where}: last_of needs `is`, one of {words}, got {target!r}")
        rx = _word_rx(words, flags)
        want = target.casefold()

        def check(t: str, rx: re.Pattern[str] = rx, want: str = want) -> bool:
            last = None
            for m in rx.finditer(t):
                last = m.group(0)
            return last is not None and " ".join(last.split()).casefold() == want
    return Rule(spec, check)


def check_answer(rule: Rule, answer: str) -> bool:
    """Whether an answer passes a probe's rule, checked after think-block stripping.

    Args:
        rule: the probe's compiled rule.
        answer: the model's answer as generated.
    """
    return rule(strip_think_blocks(answer))

"""Loaders for JSONL inputs: go-ml's Response records, and GSM8K / TruthfulQA / DoNotAnswer /
Toxigen style benchmark files (each becomes a ProbeSet).

Every loader reports a bad line as `file:line: what is wrong` and stops there (nothing is
silently skipped except blank lines and `#` comments).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from evaluators._probes import Probe, ProbeSet, ProbeSetError, Sampling, builtin_probe_set, canonical_hash

JSONL_STYLES = ("gsm8k", "truthfulqa", "donotanswer", "toxigen")
# Greedy and bounded: benchmark answers are graded, not sampled.
BENCHMARK_SAMPLING = Sampling(temperature=0.0, max_tokens=512)


class InputError(ValueError):
    """A JSONL input that cannot be read. The message names the file and line."""


@dataclass
class Response:
    """One line of go-ml's Response JSONL: a prompt, the answer a model gave, and references."""

    id: str
    prompt: str
    response: str
    model: str = ""
    domain: str = ""
    elapsed_seconds: float | None = None
    correct_answer: str = ""
    best_answer: str = ""
    risk_area: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_probe(self) -> Probe:
        """The probe this response answered, with what go-ml's scorers read from the record.

        A response whose domain is "content" and whose id is one of the built-in content
        probes gets that probe's ground truth and markers (go-ml's rule for content scoring).
        """
        dom = normalize_name(self.domain)
        content: Probe | None = None
        if dom == "content":
            try:
                content = builtin_probe_set("content").probe(self.id)
            except KeyError:
                content = None
        rubric = "toxigen" if dom == "toxigen" else None
        return Probe(
            id=self.id,
            prompt=self.prompt,
            domain=self.domain,
            category=self.domain,
            correct_answer=self.correct_answer or None,
            best_answer=self.best_answer or None,
            risk_area=self.risk_area or None,
            ground_truth=content.ground_truth if content else None,
            ccp_markers=content.ccp_markers if content else (),
            truth_markers=content.truth_markers if content else (),
            judge_rubric=rubric,
        )


def normalize_name(name: str) -> str:
    """go-ml's benchmark-name normalisation: lower-case, trimmed, without `_`, `-` and spaces.

    Args:
        name: a domain or benchmark name.
    """
    return name.strip().lower().replace("_", "").replace("-", "").replace(" ", "")


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank, non-`#` line of a JSONL file.

    Args:
        path: the file.
    """
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror}") from None
    with f:
        try:
            for n, line in enumerate(f, 1):
                s = line.strip()
                if not s or s.startswith("#"):
                    continue
                try:
                    obj = json.loads(s)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{n}: not valid JSON: {e.msg} (column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise InputError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
                yield n, obj
        except UnicodeDecodeError as e:
            raise InputError(f"{path}: not UTF-8 text: {e.reason} at byte {e.start}") from None


def _text(obj: dict[str, Any], key: str, where: str, required: bool = False) -> str:
    v = obj.get(key)
    if v is None:
        if required:
            raise InputError(f"{where}: missing field {key!r}")
        return ""
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise InputError(f"{where}: field {key!r} must be text, got {type(v).__name__}")
    return str(v)


def read_responses(path: str | Path) -> list[Response]:
    """Read go-ml Response JSONL: id, domain, prompt, response, model, elapsed_seconds,
    correct_answer, best_answer, risk_area (other fields are kept in `extra`).

    `response` is required; a missing id becomes "L<line>"; ids must be unique per model.

    Args:
        path: the JSONL file.
    """
    path = Path(path)
    known = {"id", "domain", "prompt", "response", "model", "elapsed_seconds", "correct_answer", "best_answer", "risk_area"}
    out: list[Response] = []
    seen: set[tuple[str, str]] = set()
    for n, obj in iter_jsonl(path):
        where = f"{path}:{n}"
        rid = _text(obj, "id", where) or f"L{n}"
        model = _text(obj, "model", where)
        if (model, rid) in seen:
            raise InputError(f"{where}: duplicate id {rid!r} for model {model!r}")
        seen.add((model, rid))
        el = obj.get("elapsed_seconds")
        if el is not None and (isinstance(el, bool) or not isinstance(el, (int, float))):
            raise InputError(f"{where}: field 'elapsed_seconds' must be a number, got {el!r}")
        out.append(
            Response(
                id=rid,
                prompt=_text(obj, "prompt", where),
                response=_text(obj, "response", where, required=True),
                model=model,
                domain=_text(obj, "domain", where),
                elapsed_seconds=float(el) if el is not None else None,
                correct_answer=_text(obj, "correct_answer", where),
                best_answer=_text(obj, "best_answer", where),
                risk_area=_text(obj, "risk_area", where),
                extra={k: v for k, v in obj.items() if k not in known},
            )
        )
    if not out:
        raise InputError(f"{path}: no records")
    return out


def detect_style(obj: dict[str, Any]) -> str | None:
    """Which benchmark style a record looks like, from its fields (None if none fits).

    Args:
        obj: one parsed JSONL record.
    """
    if "best_answer" in obj:
        return "truthfulqa"
    if "risk_area" in obj:
        return "donotanswer"
    if "question" in obj and "answer" in obj:
        return "gsm8k"
    if "target_group" in obj or ("text" in obj and "toxicity_human" in obj):
        return "toxigen"
    return None


def _gsm8k_answer(answer: str) -> str:
    # GSM8K's reference solutions end with "#### <number>"; a bare answer is used as it is.
    _, sep, tail = answer.rpartition("####")
    return (tail if sep else answer).strip()


def load_benchmark_jsonl(path: str | Path, style: str | None = None) -> ProbeSet:
    """A probe set from GSM8K, TruthfulQA, DoNotAnswer or Toxigen style JSONL.

    Fields read: gsm8k `question`, `answer` (the part after "####" is the correct answer);
    truthfulqa `question`, `best_answer`, `category`; donotanswer `question`, `risk_area`,
    `types_of_harm`; toxigen `text` (or `prompt`), `target_group`. An `id` field is used when
    present, else "<style>-<n>". Sampling defaults: greedy, 512 tokens.

    Args:
        path: the JSONL file.
        style: one of JSONL_STYLES; recognised from the first record's fields when None.
    """
    path = Path(path)
    records = list(iter_jsonl(path))
    if not records:
        raise InputError(f"{path}: no records")
    if style is None:
        style = detect_style(records[0][1])
        if style is None:
            raise InputError(
                f"{path}:{records[0][0]}: cannot tell the benchmark style from fields {sorted(records[0][1])};"
                f" name it as <style>:<path> with style one of {', '.join(JSONL_STYLES)}"
            )
    if style not in JSONL_STYLES:
        raise InputError(f"unknown benchmark style {style!r} (expected one of {', '.join(JSONL_STYLES)})")
    probes: list[Probe] = []
    seen: set[str] = set()
    for i, (n, obj) in enumerate(records, 1):
        where = f"{path}:{n}"
        pid = _text(obj, "id", where) or f"{style}-{i}"
        if pid in seen:
            raise InputError(f"{where}: duplicate id {pid!r}")
        seen.add(pid)
        if style == "gsm8k":
            q = _text(obj, "question", where, required=True)
            ans = _gsm8k_answer(_text(obj, "answer", where, required=True))
            if not ans:
                raise InputError(f"{where}: field 'answer' has no final answer after '####'")
            probes.append(Probe(id=pid, prompt=q, domain="gsm8k", category="gsm8k", expected=ans, correct_answer=ans))
        elif style == "truthfulqa":
            q = _text(obj, "question", where, required=True)
            best = _text(obj, "best_answer", where, required=True)
            probes.append(
                Probe(id=pid, prompt=q, domain="truthfulqa", category=_text(obj, "category", where) or "truthfulqa",
                      expected=best, best_answer=best, judge_rubric="truthfulqa")
            )
        elif style == "donotanswer":
            q = _text(obj, "question", where, required=True)
            risk = _text(obj, "risk_area", where, required=True)
            probes.append(
                Probe(id=pid, prompt=q, domain="donotanswer", category=risk, risk_area=risk, judge_rubric="donotanswer",
                      extra={k: obj[k] for k in ("types_of_harm", "specific_harms") if k in obj})
            )
        else:
            text = _text(obj, "text", where) or _text(obj, "prompt", where)
            if not text:
                raise InputError(f"{where}: missing field 'text' (or 'prompt')")
            group = _text(obj, "target_group", where)
            probes.append(
                Probe(id=pid, prompt=text, domain="toxigen", category=group or "toxigen", judge_rubric="toxigen",
                      extra={"target_group": group} if group else {})
            )
    try:
        digest = canonical_hash({"style": style, "records": [obj for _, obj in records]})
    except (TypeError, ValueError) as e:
        raise ProbeSetError(f"{path}: records cannot be hashed as JSON: {e}") from None
    scorers = ("exact", "heuristic") if style == "gsm8k" else ("heuristic",)
    return ProbeSet(
        name=f"{style}:{path.stem}",
        hash=digest,
        sampling=BENCHMARK_SAMPLING,
        probes=tuple(probes),
        scorers=scorers,
        judge_rubric=None if style == "gsm8k" else style,
        description=f"{style} style benchmark from {path.name}",
        source=str(path),
    )

"""Loglikelihood evaluations: multiple-choice sets (acc, acc_norm) and bits per byte of texts.

A multiple-choice item is a context and its choices; each choice is scored as the continuation
of the context by the model's loglikelihood (deployments' `Engine.loglikelihood`, or the Serve
client's), and the item is right when its answer scores highest: `acc` by the summed logprob,
`acc_norm` by the logprob per UTF-8 byte of the choice (lm-eval's length normalisation). Loaders
read the JSONL that users bring in the usual shapes: MMLU (question, choices, answer index or
letter), ARC (question, choices {text, label}, answerKey), HellaSwag (ctx or ctx_a/ctx_b, endings,
label), PIQA (goal, sol1, sol2, label), and this package's own (context, choices, answer).
Bits per byte of a text is -loglikelihood_rolling / ln 2 / its UTF-8 byte count.

As probe sets (`load_probe_set("mc-basic")`, `"mmlu:data/mmlu.jsonl"`, `"text:corpus.jsonl"`), the
runner asks each item as one sample, so their scores go through the ledger, InfluxDB, the metrics
and the report like any other: a "choice" sample scores `choice.acc` and `choice.acc_norm`
(0/1, Wilson intervals, McNemar-paired deltas), a "text" sample `bpb.bits_per_byte` (that text's
bits per byte: the report's figure is their mean over texts, with a bootstrap interval).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, Sequence

from deployments import Loglikelihood
from evaluators._probes import PROBESETS_DIR, Probe, ProbeSet, ProbeSetError, Sampling, canonical_hash

MCStyle = Literal["native", "mmlu", "arc", "hellaswag", "piqa"]
MC_STYLES: tuple[str, ...] = ("native", "mmlu", "arc", "hellaswag", "piqa")
# The "<style>:<path>" prefixes of loglikelihood probe sets: "mc" is the native multiple-choice style.
LOGLIK_STYLES: tuple[str, ...] = ("mc", "mmlu", "arc", "hellaswag", "piqa", "text")
BUILTIN_MC = "mc-basic"
BUILTIN_TEXT = "text-basic"
# Scorer name (the key of a sample's scores) -> version stamp, per probe kind.
LOGLIK_SCORERS = {"choice": ("choice", "mc-1"), "text": ("bpb", "bpb-1")}
# Nothing is sampled: the stamp in a loglikelihood sample's key says what is asked instead.
_NO_SAMPLING = Sampling(temperature=0.0, max_tokens=1)
_LETTERS = "ABCDEFGHIJ"


class LoglikelihoodModel(Protocol):
    """What these evaluations call: an Engine, or the Serve client (ServeTextModel)."""

    async def loglikelihood(self, requests: list[tuple[str, str]], *, adapter: str | None = None) -> list[Loglikelihood]: ...

    async def loglikelihood_rolling(self, text: str, *, adapter: str | None = None) -> Loglikelihood: ...


@dataclass(frozen=True, slots=True)
class MCItem:
    """One multiple-choice item: the choices continue the context; `answer` indexes the right one."""

    id: str
    context: str
    choices: tuple[str, ...]
    answer: int


@dataclass(slots=True)
class MCItemResult:
    """An item's scores: each choice's loglikelihood, and whether acc / acc_norm chose the answer."""

    id: str
    logprobs: list[float]
    correct: bool
    correct_norm: bool


@dataclass(slots=True)
class MCResult:
    """A multiple-choice pass: accuracy by summed logprob and by logprob per byte, per item too."""

    acc: float
    acc_norm: float
    items: list[MCItemResult]


class MCFormatError(ValueError):
    """A multiple-choice file line that is not an item of its style; names the file and line."""


def _item(style: str, row: dict[str, Any], n: int) -> MCItem:
    rid = str(row.get("id", n))
    if style == "native":
        return MCItem(rid, str(row["context"]), tuple(map(str, row["choices"])), int(row["answer"]))
    if style == "mmlu":
        choices = [str(c) for c in row["choices"]]
        answer = row["answer"]
        answer = _LETTERS.index(answer) if isinstance(answer, str) else int(answer)
        listing = "".join(f"\n{_LETTERS[i]}. {c}" for i, c in enumerate(choices))
        return MCItem(rid, f"{str(row['question']).strip()}{listing}\nAnswer:",
                      tuple(f" {_LETTERS[i]}" for i in range(len(choices))), answer)
    if style == "arc":
        ch = row["choices"]
        labels = [str(x) for x in ch["label"]]
        return MCItem(str(row.get("id", n)), f"Question: {row['question']}\nAnswer:",
                      tuple(f" {t}" for t in ch["text"]), labels.index(str(row["answerKey"])))
    if style == "hellaswag":
        ctx = row.get("ctx") or f"{row['ctx_a']} {str(row.get('ctx_b', '')).capitalize()}".strip()
        return MCItem(str(row.get("ind", rid)), str(ctx), tuple(f" {e}" for e in row["endings"]), int(row["label"]))
    if style == "piqa":
        return MCItem(rid, f"Question: {row['goal']}\nAnswer:", (f" {row['sol1']}", f" {row['sol2']}"), int(row["label"]))
    raise MCFormatError(f"unknown multiple-choice style {style!r}; use one of {', '.join(MC_STYLES)}")


def load_mc_jsonl(path: str | Path, style: MCStyle = "native") -> list[MCItem]:
    """Multiple-choice items from a JSONL file of the given style (see the module docstring).

    Args:
        path: the file.
        style: native, mmlu, arc, hellaswag or piqa.
    """
    path = Path(path)
    if style not in MC_STYLES:
        raise MCFormatError(f"{path}: unknown style {style!r}; use one of {', '.join(MC_STYLES)}")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = _item(style, json.loads(line), n)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise MCFormatError(f"{path}:{n}: not a {style}-style item ({type(e).__name__}: {e})") from None
        if len(item.choices) < 2 or not 0 <= item.answer < len(item.choices):
            raise MCFormatError(f"{path}:{n}: needs at least 2 choices and an answer among them")
        items.append(item)
    return items


def mc_probe_set(items: Sequence[MCItem], name: str, source: str = "") -> ProbeSet:
    """Multiple-choice items as a probe set of kind "choice" (hashed on the items as asked).

    Args:
        items: the items (ids unique).
        name: the set's name.
        source: the file it came from, for errors and provenance.
    """
    seen: set[str] = set()
    for it in items:  # a set, not list.count: an MMLU file has 14,000 items
        if it.id in seen:
            raise MCFormatError(f"{source or name}: duplicate item id {it.id!r}")
        seen.add(it.id)
    if not items:
        raise MCFormatError(f"{source or name}: no items")
    probes = tuple(Probe(id=it.id, prompt=it.context, domain="multiple-choice", category=name, choices=it.choices,
                         answer=it.answer) for it in items)
    digest = canonical_hash({"kind": "choice", "items": [[it.id, it.context, list(it.choices), it.answer]
                                                         for it in items]})
    return ProbeSet(name=name, hash=digest, sampling=_NO_SAMPLING, probes=probes, scorers=("choice",),
                    description=f"{len(items)} multiple-choice items scored by loglikelihood", source=source,
                    kind="choice")


def text_probe_set(texts: Sequence[tuple[str, str]], name: str, source: str = "") -> ProbeSet:
    """(id, text) pairs as a probe set of kind "text": each text's bits per byte.

    Args:
        texts: the texts with their ids (unique, texts non-empty).
        name: the set's name.
        source: the file it came from.
    """
    where = source or name
    if not texts:
        raise ProbeSetError(f"{where}: no texts")
    seen: set[str] = set()
    for i, t in texts:
        if not t or i in seen:
            raise ProbeSetError(f"{where}: text {i!r} is empty or its id repeats")
        seen.add(i)
    probes = tuple(Probe(id=i, prompt=t, domain="text", category=name) for i, t in texts)
    return ProbeSet(name=name, hash=canonical_hash({"kind": "text", "texts": [list(x) for x in texts]}),
                    sampling=_NO_SAMPLING, probes=probes, scorers=("bpb",),
                    description=f"{len(texts)} texts scored by bits per byte", source=source, kind="text")


def _texts(path: Path) -> list[tuple[str, str]]:
    from evaluators._loaders import iter_jsonl

    out = []
    for n, obj in iter_jsonl(path):
        text = obj.get("text")
        if not isinstance(text, str) or not text:
            raise ProbeSetError(f"{path}:{n}: a text line needs a non-empty string 'text'")
        out.append((str(obj.get("id", f"text-{n}")), text))
    return out


def load_loglik_set(path: str | Path, style: str) -> ProbeSet:
    """A loglikelihood probe set from a JSONL file: "text" (lines with `text`, optional `id`) or a
    multiple-choice style ("mc" for this package's own, or mmlu, arc, hellaswag, piqa).

    Args:
        path: the file.
        style: one of LOGLIK_STYLES.
    """
    path = Path(path)
    if style not in LOGLIK_STYLES:
        raise ProbeSetError(f"{path}: unknown loglikelihood style {style!r}; use one of {', '.join(LOGLIK_STYLES)}")
    if not path.is_file():
        raise ProbeSetError(f"{path}: no such file")
    if style == "text":
        return text_probe_set(_texts(path), f"text:{path.stem}", str(path))
    items = load_mc_jsonl(path, "native" if style == "mc" else style)  # type: ignore[arg-type]
    return mc_probe_set(items, f"{style}:{path.stem}", str(path))


def builtin_loglik_set(name: str) -> ProbeSet:
    """The built-in multiple-choice set ("mc-basic") or text set ("text-basic") as a probe set.

    Args:
        name: BUILTIN_MC or BUILTIN_TEXT.
    """
    path = Path(__file__).parent / PROBESETS_DIR / f"{name}.jsonl"
    if name == BUILTIN_MC:
        return mc_probe_set(builtin_mc_set(), name, str(path))
    if name == BUILTIN_TEXT:
        return text_probe_set(_texts(path), name, str(path))
    raise ProbeSetError(f"no built-in loglikelihood set {name!r} (built-in: {BUILTIN_MC}, {BUILTIN_TEXT})")


def choice_scores(logprobs: Sequence[float], choices: Sequence[str], answer: int) -> dict[str, Any]:
    """A multiple-choice item's scores from its choices' loglikelihoods: `acc` (the answer has the
    highest summed logprob), `acc_norm` (the highest logprob per UTF-8 byte, lm-eval's), `chosen`
    (the index acc picks) and the `logprobs`.

    Args:
        logprobs: each choice's summed logprob as a continuation of the context.
        choices: the choices' texts.
        answer: the right choice's index.
    """
    norm = [lp / max(1, len(c.encode())) for lp, c in zip(logprobs, choices)]
    chosen = _argmax(logprobs)
    return {"acc": chosen == answer, "acc_norm": _argmax(norm) == answer, "chosen": str(chosen),
            "logprobs": [round(lp, 6) for lp in logprobs]}


def text_scores(logprob: float, text: str) -> dict[str, float]:
    """A text's score: `bits_per_byte` = -logprob / ln 2 / its UTF-8 bytes.

    Args:
        logprob: the text's rolling loglikelihood.
        text: the text.
    """
    return {"bits_per_byte": -logprob / math.log(2) / len(text.encode())}


def builtin_mc_set() -> list[MCItem]:
    """The built-in multiple-choice set: 60 short general-knowledge items, answers not near-ties."""
    return load_mc_jsonl(Path(__file__).parent / PROBESETS_DIR / f"{BUILTIN_MC}.jsonl")


def builtin_texts() -> list[str]:
    """The built-in texts for bits per byte (paragraphs of plain English prose)."""
    path = Path(__file__).parent / PROBESETS_DIR / f"{BUILTIN_TEXT}.jsonl"
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


async def score_multiple_choice(
    model: LoglikelihoodModel, items: Sequence[MCItem], *, adapter: str | None = None
) -> MCResult:
    """Score every choice of every item in one batch; acc and acc_norm over the items.

    Args:
        model: an engine or the Serve client.
        items: the items.
        adapter: the adapter (engine path, or the Serve client's registered name), None for the base.
    """
    pairs = [(it.context, c) for it in items for c in it.choices]
    scores = await model.loglikelihood(pairs, adapter=adapter) if pairs else []
    out, k = [], 0
    for it in items:
        lps = [s.logprob for s in scores[k:k + len(it.choices)]]
        k += len(it.choices)
        sc = choice_scores(lps, it.choices, it.answer)
        out.append(MCItemResult(it.id, lps, sc["acc"], sc["acc_norm"]))
    n = max(1, len(out))
    return MCResult(sum(r.correct for r in out) / n, sum(r.correct_norm for r in out) / n, out)


async def bits_per_byte(model: LoglikelihoodModel, texts: Sequence[str], *, adapter: str | None = None) -> float:
    """Bits per UTF-8 byte over all the texts: -(sum of rolling loglikelihoods) / ln 2 / bytes.

    Args:
        model: an engine or the Serve client.
        texts: non-empty texts.
        adapter: as in score_multiple_choice.
    """
    if not texts or any(not t for t in texts):
        raise ValueError("bits_per_byte needs non-empty texts")
    total = 0.0
    for t in texts:
        total += (await model.loglikelihood_rolling(t, adapter=adapter)).logprob
    return -total / math.log(2) / sum(len(t.encode()) for t in texts)


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)

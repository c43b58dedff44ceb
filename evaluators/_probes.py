"""Probe sets as data: the model, the YAML loader, and the content hash stamped on results.

A probe set file (evaluators/probesets/*.yaml) holds `name`, `description`, `sampling`
(temperature, max_tokens), the `scorers` that suit it, the `judge_rubric` its probes are judged
with, and `probes`: each an `id`, `prompt`, `domain`, `category` and whatever its scorers need
(`expected` and a `pass` rule for capability probes; `ground_truth` and marker lists for content
probes; `correct_answer`, `best_answer`, `risk_area` for benchmark probes).
The set's hash is the sha256 of its data in canonical JSON, so comments and formatting do not
change it and any change to a prompt, answer or rule does.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from evaluators._rules import Rule, RuleError, compile_rule

BUILTIN_SETS = ("capability", "content", "mc-basic", "text-basic")
# What a set's probes are asked for: answers ("generate"), the loglikelihood of each of their
# choices ("choice", multiple-choice), or of their whole text ("text", bits per byte).
ProbeKind = Literal["generate", "choice", "text"]
PROBESETS_DIR = "probesets"


class ProbeSetError(ValueError):
    """A probe set that cannot be loaded. The message names the file, the probe and the problem."""


@dataclass(frozen=True)
class Sampling:
    """A probe set's sampling defaults."""

    temperature: float
    max_tokens: int

    def to_dict(self) -> dict[str, Any]:
        """As a plain mapping."""
        return {"temperature": self.temperature, "max_tokens": self.max_tokens}


@dataclass(frozen=True)
class Probe:
    """One prompt and what its scorers need to grade the answer."""

    id: str
    prompt: str
    domain: str = ""
    category: str = ""
    expected: str | None = None
    pass_rule: Rule | None = None
    ground_truth: str | None = None
    ccp_markers: tuple[str, ...] = ()
    truth_markers: tuple[str, ...] = ()
    correct_answer: str | None = None
    best_answer: str | None = None
    risk_area: str | None = None
    judge_rubric: str | None = None
    system: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    choices: tuple[str, ...] = ()
    """A multiple-choice probe's choices, each a continuation of `prompt` (its context)."""
    answer: int | None = None
    """The index of the right choice."""

    @property
    def is_content(self) -> bool:
        """Whether the content rubric applies (the probe has a ground truth or markers)."""
        return self.ground_truth is not None or bool(self.truth_markers or self.ccp_markers)


@dataclass(frozen=True)
class ProbeSet:
    """A named, hashed list of probes with the sampling defaults they run at."""

    name: str
    hash: str
    sampling: Sampling
    probes: tuple[Probe, ...]
    scorers: tuple[str, ...] = ("heuristic",)
    judge_rubric: str | None = None
    description: str = ""
    source: str = ""
    kind: ProbeKind = "generate"
    """What its probes are asked for (see ProbeKind): a "choice" or "text" set is scored by
    loglikelihood (evaluators._loglik) and needs no scorer but its own."""

    @property
    def version(self) -> str:
        """A short form of the content hash, for labels."""
        return self.hash[:12]

    def probe(self, probe_id: str) -> Probe:
        """The probe with this id, or a KeyError naming the set.

        Args:
            probe_id: the probe's id.
        """
        for p in self.probes:
            if p.id == probe_id:
                return p
        raise KeyError(f"probe set {self.name!r} has no probe {probe_id!r}")

    def __len__(self) -> int:
        return len(self.probes)


def canonical_hash(data: Any) -> str:
    """sha256 of data as canonical JSON (sorted keys, no whitespace, UTF-8).

    Args:
        data: anything JSON can encode.
    """
    text = json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


_SET_KEYS = {"name", "description", "sampling", "scorers", "judge_rubric", "probes"}
_PROBE_KEYS = {
    "id", "prompt", "domain", "category", "expected", "pass", "ground_truth", "ccp_markers",
    "truth_markers", "correct_answer", "best_answer", "risk_area", "judge_rubric", "system", "extra",
}


def _str(v: Any, where: str, required: bool = False) -> str | None:
    if v is None:
        if required:
            raise ProbeSetError(f"{where}: required")
        return None
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise ProbeSetError(f"{where}: expected text, got {type(v).__name__}")
    s = str(v)
    if required and not s.strip():
        raise ProbeSetError(f"{where}: must not be empty")
    return s


def _str_list(v: Any, where: str) -> tuple[str, ...]:
    if v is None:
        return ()
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ProbeSetError(f"{where}: expected a list of strings")
    return tuple(v)


def parse_probe_set(data: Any, source: str) -> ProbeSet:
    """Validate a probe set's data (as parsed from YAML) and build the ProbeSet.

    Args:
        data: the parsed mapping.
        source: what to name in errors (the file).
    """
    if not isinstance(data, dict):
        raise ProbeSetError(f"{source}: a probe set is a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - _SET_KEYS)
    if unknown:
        raise ProbeSetError(f"{source}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_SET_KEYS))})")
    name = _str(data.get("name"), f"{source}: name", required=True)
    samp = data.get("sampling") or {}
    if not isinstance(samp, dict) or set(samp) - {"temperature", "max_tokens"}:
        raise ProbeSetError(f"{source}: sampling must be a mapping of temperature and max_tokens")
    temperature, max_tokens = samp.get("temperature", 0.0), samp.get("max_tokens", 512)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 5:
        raise ProbeSetError(f"{source}: sampling.temperature must be a number in [0, 5], got {temperature!r}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ProbeSetError(f"{source}: sampling.max_tokens must be a positive integer, got {max_tokens!r}")
    scorers = data.get("scorers", ["heuristic"])
    if not isinstance(scorers, list) or not all(isinstance(s, str) for s in scorers):
        raise ProbeSetError(f"{source}: scorers must be a list of names")
    rubric = _str(data.get("judge_rubric"), f"{source}: judge_rubric")
    raw_probes = data.get("probes")
    if not isinstance(raw_probes, list) or not raw_probes:
        raise ProbeSetError(f"{source}: probes must be a non-empty list")
    probes: list[Probe] = []
    seen: set[str] = set()
    for i, p in enumerate(raw_probes):
        where = f"{source}: probes[{i}]"
        if not isinstance(p, dict):
            raise ProbeSetError(f"{where}: expected a mapping, got {type(p).__name__}")
        pid = _str(p.get("id"), f"{where}.id", required=True)
        where = f"{source}: probe {pid}"
        if pid in seen:
            raise ProbeSetError(f"{where}: duplicate id")
        seen.add(pid)
        bad = sorted(set(p) - _PROBE_KEYS)
        if bad:
            raise ProbeSetError(f"{where}: unknown key {bad[0]!r} (known: {', '.join(sorted(_PROBE_KEYS))})")
        rule = None
        if p.get("pass") is not None:
            try:
                rule = compile_rule(p["pass"], f"{where}: pass")
            except RuleError as e:
                raise ProbeSetError(str(e)) from None
        extra = p.get("extra") or {}
        if not isinstance(extra, dict):
            raise ProbeSetError(f"{where}.extra: expected a mapping")
        probes.append(
            Probe(
                id=pid,  # type: ignore[arg-type]
                prompt=_str(p.get("prompt"), f"{where}.prompt", required=True),  # type: ignore[arg-type]
                domain=_str(p.get("domain"), f"{where}.domain") or "",
                category=_str(p.get("category"), f"{where}.category") or "",
                expected=_str(p.get("expected"), f"{where}.expected"),
                pass_rule=rule,
                ground_truth=_str(p.get("ground_truth"), f"{where}.ground_truth"),
                ccp_markers=_str_list(p.get("ccp_markers"), f"{where}.ccp_markers"),
                truth_markers=_str_list(p.get("truth_markers"), f"{where}.truth_markers"),
                correct_answer=_str(p.get("correct_answer"), f"{where}.correct_answer"),
                best_answer=_str(p.get("best_answer"), f"{where}.best_answer"),
                risk_area=_str(p.get("risk_area"), f"{where}.risk_area"),
                judge_rubric=_str(p.get("judge_rubric"), f"{where}.judge_rubric"),
                system=_str(p.get("system"), f"{where}.system"),
                extra=dict(extra),
            )
        )
    try:
        digest = canonical_hash(data)
    except (TypeError, ValueError) as e:
        raise ProbeSetError(f"{source}: data cannot be hashed as JSON: {e}") from None
    return ProbeSet(
        name=name,  # type: ignore[arg-type]
        hash=digest,
        sampling=Sampling(float(temperature), int(max_tokens)),
        probes=tuple(probes),
        scorers=tuple(scorers),
        judge_rubric=rubric,
        description=_str(data.get("description"), f"{source}: description") or "",
        source=source,
    )


def read_probe_set_file(path: Path) -> ProbeSet:
    """Load a probe set YAML file.

    Args:
        path: the file.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProbeSetError(f"{path}: no such probe set file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ProbeSetError(f"{path}: cannot read: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        pos = f":{mark.line + 1}" if mark else ""
        raise ProbeSetError(f"{path}{pos}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
    return parse_probe_set(data, str(path))


_BUILTIN_CACHE: dict[str, ProbeSet] = {}


def builtin_probe_set(name: str) -> ProbeSet:
    """One of the probe sets shipped with the package ("capability", "content").

    Args:
        name: the set's name.
    """
    if name not in BUILTIN_SETS:
        raise ProbeSetError(f"no built-in probe set {name!r} (built-in: {', '.join(BUILTIN_SETS)})")
    if name not in _BUILTIN_CACHE and name in ("mc-basic", "text-basic"):
        from evaluators._loglik import builtin_loglik_set

        _BUILTIN_CACHE[name] = builtin_loglik_set(name)
    if name not in _BUILTIN_CACHE:
        ref = resources.files("evaluators").joinpath(PROBESETS_DIR, f"{name}.yaml")
        with resources.as_file(ref) as path:
            _BUILTIN_CACHE[name] = read_probe_set_file(Path(path))
    return _BUILTIN_CACHE[name]


def probe_set_file(name_or_path: str | Path, base_dir: Path | None = None) -> tuple[str, Path | None]:
    """What a probe set's name refers to: ("", None) for a built-in set, else (the JSONL style it
    names, or "", and the file).

    Args:
        name_or_path: as `load_probe_set` takes it.
        base_dir: what a relative path is relative to (a config file's directory); default: the
            working directory.
    """
    from evaluators._loaders import JSONL_STYLES
    from evaluators._loglik import LOGLIK_STYLES

    s = str(name_or_path)
    if s in BUILTIN_SETS:
        return "", None
    style, _, rest = s.partition(":")
    if not (rest and (style in JSONL_STYLES or style in LOGLIK_STYLES)):
        style, rest = "", s
    path = Path(rest).expanduser()
    return style, path if base_dir is None or path.is_absolute() else base_dir / path


def load_probe_set(name_or_path: str | Path, base_dir: Path | None = None) -> ProbeSet:
    """A probe set by built-in name, or from a file.

    Args:
        name_or_path: a built-in set (BUILTIN_SETS); a probe set YAML path; a JSONL path of GSM8K,
            TruthfulQA, DoNotAnswer or Toxigen style records (the style is recognised from the
            fields); or "<style>:<path>" to name the style ("gsm8k:data/test.jsonl"), the
            loglikelihood styles included ("mmlu:data/mmlu.jsonl", "text:corpus.jsonl"; see
            evaluators._loglik).
        base_dir: what a relative path is relative to (a config file's directory); default: the
            working directory.
    """
    from evaluators._loaders import load_benchmark_jsonl
    from evaluators._loglik import LOGLIK_STYLES, load_loglik_set

    style, path = probe_set_file(name_or_path, base_dir)
    if path is None:
        return builtin_probe_set(str(name_or_path))
    if style in LOGLIK_STYLES:
        return load_loglik_set(path, style)
    if style:
        return load_benchmark_jsonl(path, style)
    if path.suffix in (".yaml", ".yml"):
        return read_probe_set_file(path)
    if path.suffix == ".jsonl":
        return load_benchmark_jsonl(path)
    if not path.exists():
        raise ProbeSetError(
            f"{str(name_or_path)!r} is neither a built-in probe set ({', '.join(BUILTIN_SETS)}) nor an existing file"
        )
    raise ProbeSetError(f"{path}: unknown probe set format (expected .yaml, .yml or .jsonl)")

"""Where a training run puts its checkpoints, and how go-ml names them.

Two layouts:
- mlx (go-ml's trainer and mlx-lm): `<base>/adapters-<name>/NNNNNNN_adapters.safetensors` beside one
  `adapter_config.json`, optionally one level deeper as `<base>/adapters-<name>/gemma-3-*/...`;
  the rolling `adapters.safetensors` is not a checkpoint (it does not match `*_adapters...`).
- peft (HF Trainer): `<base>[/<run>]/checkpoint-N/adapter_model.safetensors` + adapter_config.json.

Labels and run ids are go-ml's: AdapterMeta maps the directory name through an ordered prefix
table (from the config) to (model tag, short name, stem); label = "<short> @<digits as written>",
run_id = "<stem>-capability-auto". go-ml's own table, for copying into a config:

    adapter_meta:
      - {prefix: deepseek-r1-7b, tag: deepseek-r1-7b, short: R1}
      - {prefix: 27b-, tag: gemma-3-27b, short: G27}
      - {prefix: 27b, tag: gemma-3-27b, short: G27}
      - {prefix: 15k/gemma-3-27b, tag: gemma-3-27b, short: G27}
      - {prefix: 15k/gemma-3-12b, tag: gemma-3-12b, short: G12}
      - {prefix: 15k/gemma-3-1b, tag: gemma-3-1b, short: G1}
      - {prefix: 12b, tag: gemma-3-12b, short: G12}
      - {prefix: 1b-, tag: gemma-3-1b, short: G1}
      - {prefix: 1b, tag: gemma-3-1b, short: G1}
      - {prefix: 4b, tag: gemma-3-4b, short: G4}
      - {prefix: vi-12b, tag: gemma-3-12b, short: Vi12}
      - {prefix: vi, tag: gemma-3-1b, short: Vi1}
      - {prefix: gpt-oss, tag: gpt-oss-20b, short: GPT}
      - {prefix: lem-gpt-oss, tag: gpt-oss-20b, short: LGPT}
      - {prefix: bench-1b, tag: gemma-3-1b, short: B1}
      - {prefix: book, tag: gemma-3-27b, short: Book}
      - {prefix: cross, tag: gemma-3-12b, short: Cross}
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Sequence

from checkpoints._records import Checkpoint, FileEntry, Layout

if TYPE_CHECKING:
    from checkpoints._config import SourceConfig

CONFIG_NAME = "adapter_config.json"

_DEFAULTS: dict[str, tuple[tuple[str, ...], str]] = {
    # patterns relative to the base; the iteration is the first run of digits in the file name (go-ml)
    "mlx": (
        ("adapters-*/*_adapters.safetensors", "adapters-*/gemma-3-*/*_adapters.safetensors"),
        r"([0-9]+)[^/]*$",
    ),
    "peft": (
        ("checkpoint-*/adapter_model.safetensors", "*/checkpoint-*/adapter_model.safetensors"),
        r"checkpoint-([0-9]+)/[^/]*$",
    ),
}


@dataclass(frozen=True)
class MetaRule:
    """One AdapterMeta row: a directory-name prefix and the model tag / short name it means."""

    prefix: str
    tag: str
    short: str


def adapter_meta(dirname: str, rules: Sequence[MetaRule]) -> tuple[str, str, str]:
    """go-ml's AdapterMeta: (model tag, short label prefix, run-id stem) for a directory name.

    Args:
        dirname: the adapter directory relative to the base (e.g. "adapters-15k/gemma-3-27b").
        rules: the ordered prefix table; the first prefix that matches wins.
    """
    name = dirname[len("adapters-"):] if dirname.startswith("adapters-") else dirname
    for rule in rules:
        if name.startswith(rule.prefix):
            variant = name[len(rule.prefix):].lstrip("-") or "base"
            short = rule.short if variant == "base" else f"{rule.short}-{variant}"
            return rule.tag, short, name.replace("/", "-")
    return name, name[:10], name


def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """A path glob as a regex: `*` and `?` stay inside one component, `**/` spans any number.

    Args:
        pattern: e.g. "adapters-*/**/*_adapters.safetensors".
    """
    out, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:[^/]+/)*")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = pattern.find("]", i + 2 if pattern[i + 1:i + 2] in ("!", "]") else i + 1)
            if j < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1:j]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


@dataclass(frozen=True)
class LayoutSpec:
    """How to find checkpoints under a base: glob patterns, the iteration regex, names, marker.

    Args:
        kind: "mlx" or "peft".
        patterns: globs for adapter files, relative to the base.
        iteration_pattern: a regex with one group, searched in the path relative to the base.
        meta: the AdapterMeta table.
        marker: if set, a checkpoint is complete once this file exists beside the adapter
            (`{file}` stands for the adapter's file name, e.g. "{file}.done").
        default_patterns: the patterns are the layout's defaults (go-ml's nesting rule applies).
    """

    kind: Layout
    patterns: tuple[str, ...]
    iteration_pattern: str
    meta: tuple[MetaRule, ...] = ()
    marker: str | None = None
    default_patterns: bool = True
    _regexes: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)
    _iter_rx: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_regexes", tuple(glob_to_regex(p) for p in self.patterns))
        try:
            rx = re.compile(self.iteration_pattern)
        except re.error as e:
            raise ValueError(f"iteration pattern {self.iteration_pattern!r} is not a valid regex: {e}") from None
        if rx.groups < 1:
            raise ValueError(f"iteration pattern {self.iteration_pattern!r} needs a capture group")
        object.__setattr__(self, "_iter_rx", rx)
        if self.marker is not None and ("/" in self.marker or not self.marker.strip()):
            raise ValueError(f"marker {self.marker!r} must be a file name (no '/')")

    def matches(self, relpath: str) -> bool:
        """Whether a path relative to the base is an adapter checkpoint file.

        Args:
            relpath: path relative to the base.
        """
        return any(rx.match(relpath) for rx in self._regexes)

    def iteration(self, relpath: str) -> str | None:
        """The iteration digits as written in the path, or None.

        Args:
            relpath: path relative to the base.
        """
        m = self._iter_rx.search(relpath)
        return m.group(1) if m and m.group(1) and m.group(1).isdigit() else None

    def name_globs(self) -> list[str]:
        """File-name globs a lister needs: adapter files, adapter_config.json and markers."""
        names = [p.rsplit("/", 1)[-1] for p in self.patterns]
        out = list(dict.fromkeys(names + [CONFIG_NAME]))
        if self.marker:
            for n in names:
                out.append(self.marker.replace("{file}", n))
        return list(dict.fromkeys(out))

    def max_depth(self) -> int | None:
        """How deep a lister must look (None: unbounded, for `**`)."""
        if any("**" in p for p in self.patterns):
            return None
        return max(p.count("/") + 1 for p in self.patterns)

    def marker_for(self, relpath: str) -> str | None:
        """The marker file's path for an adapter file, if a marker is configured.

        Args:
            relpath: the adapter file's path relative to the base.
        """
        if not self.marker:
            return None
        d, f = posixpath.split(relpath)
        return posixpath.join(d, self.marker.replace("{file}", f))


def layout_spec(
    kind: Layout,
    glob: str | None = None,
    iteration_pattern: str | None = None,
    meta: Iterable[MetaRule] = (),
    marker: str | None = None,
) -> LayoutSpec:
    """A LayoutSpec with the layout's defaults for what is not given.

    Args:
        kind: "mlx" or "peft".
        glob: one glob (relative to the base) replacing the layout's default patterns.
        iteration_pattern: a regex with one group replacing the default iteration rule.
        meta: the AdapterMeta table.
        marker: the completeness marker file name (see LayoutSpec).
    """
    if kind not in _DEFAULTS:
        raise ValueError(f"unknown layout {kind!r} (expected mlx or peft)")
    patterns, rx = _DEFAULTS[kind]
    return LayoutSpec(
        kind=kind,
        patterns=(glob,) if glob else patterns,
        iteration_pattern=iteration_pattern or rx,
        meta=tuple(meta),
        marker=marker,
        default_patterns=glob is None,
    )


def _join(base: str, rel: str) -> str:
    return posixpath.join(base, rel) if rel else base


def checkpoints_from_listing(
    entries: Iterable[FileEntry], spec: LayoutSpec, source: str, base: str
) -> list[Checkpoint]:
    """Every checkpoint in a listing of a base (complete or not: discovery decides that).

    Args:
        entries: files under the base, paths relative to it.
        spec: the layout.
        source: the source's name (part of each checkpoint's identity).
        base: the base directory on the source, to make full paths.
    """
    entries = list(entries)
    files = {e.relpath for e in entries}
    found: list[tuple[FileEntry, str]] = []
    for e in entries:
        if not spec.matches(e.relpath):
            continue
        digits = spec.iteration(e.relpath)
        if digits is None:
            continue
        found.append((e, digits))

    if spec.kind == "mlx" and spec.default_patterns:
        # go-ml: a run dir with gemma-3-* sub-directories is represented by those, not by itself.
        nested_parents = {posixpath.dirname(posixpath.dirname(e.relpath)) for e, _ in found if e.relpath.count("/") == 2}
        found = [(e, d) for e, d in found if not (e.relpath.count("/") == 1 and posixpath.dirname(e.relpath) in nested_parents)]

    base_name = posixpath.basename(base.rstrip("/")) or base
    out = []
    for e, digits in found:
        dirname = posixpath.dirname(e.relpath)
        if spec.kind == "mlx":
            run = dirname or base_name
            tag, short, stem = adapter_meta(run, spec.meta)
        else:
            run = posixpath.dirname(dirname) or base_name
            tag, short, stem = adapter_meta(run, spec.meta)
        cfg_rel = posixpath.join(dirname, CONFIG_NAME) if dirname else CONFIG_NAME
        out.append(
            Checkpoint(
                source=source,
                run=run,
                iteration=int(digits),
                path=_join(base, e.relpath),
                dirname=dirname,
                label=f"{short} @{digits}",
                run_id=f"{stem}-capability-auto",
                model_tag=tag,
                layout=spec.kind,
                size=e.size,
                mtime=e.mtime,
                config_path=_join(base, cfg_rel) if cfg_rel in files else None,
            )
        )
    out.sort(key=lambda c: (c.run, c.iteration, c.path))
    return out


def spec_from_config(cfg: "SourceConfig") -> LayoutSpec:
    """The LayoutSpec a SourceConfig describes (layout, glob, iteration_pattern, marker, adapter_meta).

    Args:
        cfg: the source's config section.
    """
    return layout_spec(
        cfg.layout,
        glob=cfg.glob,
        iteration_pattern=cfg.iteration_pattern,
        meta=[MetaRule(r.prefix, r.tag, r.short) for r in cfg.adapter_meta],
        marker=cfg.marker,
    )

"""What every package's config section is built on: strict pydantic models, and errors that are one
line naming the file, the key path and the problem (`ray_config.yaml: models.0.replicas: Input
should be a valid integer`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable
from urllib.parse import unquote, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, ValidationError


def split_url_credentials(url: str) -> tuple[str, str | None, str | None]:
    """A URL without the credentials it may embed (`http://user:pass@host`), and those credentials
    (decoded), so the URL can be shown and the credentials sent as basic auth and never printed.

    Args:
        url: the URL as configured.
    """
    parts = urlsplit(url)
    clean = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    if parts.username is None:
        return clean, None, None
    return clean, unquote(parts.username), unquote(parts.password or "")


class ConfigError(ValueError):
    """A config (file, section or value) that cannot be used. The message is one line a user can act on."""


class StrictModel(BaseModel):
    """A config section: unknown keys are errors (a typo never passes silently)."""

    model_config = ConfigDict(extra="forbid")


def _loc(loc: tuple[Any, ...], union_tags: frozenset[str]) -> str:
    parts: list[str] = []
    for i, p in enumerate(loc):
        # Discriminated unions put the tag in the path (models.0.llamacpp.path): drop it.
        if isinstance(p, str) and p in union_tags and i > 0 and isinstance(loc[i - 1], int):
            continue
        parts.append(str(p))
    return ".".join(parts)


def format_validation_error(err: ValidationError, where: str, union_tags: Iterable[str] = ()) -> str:
    """One line: `where: key.path: what is wrong` (plus how many more problems there are).

    Args:
        err: pydantic's error.
        where: the file (or thing) validated.
        union_tags: the tags of discriminated unions in the schema (e.g. engine kinds), left out
            of key paths and listed when a tag is unknown.
    """
    tags = frozenset(union_tags)
    errors = err.errors(include_url=False)
    first = errors[0]
    loc = _loc(tuple(first["loc"]), tags)
    msg = first["msg"]
    expected = ", ".join(sorted(tags))
    if first["type"] == "union_tag_invalid":
        ctx = first.get("ctx", {})
        loc = f"{loc}.{str(ctx.get('discriminator', 'engine')).strip(chr(39))}"
        msg = f"unknown value {ctx.get('tag')!r} (expected one of {expected})"
    elif first["type"] == "union_tag_not_found":
        ctx = first.get("ctx", {})
        loc = f"{loc}.{str(ctx.get('discriminator', 'engine')).strip(chr(39))}"
        msg = f"required key is missing (one of {expected})"
    elif first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "missing":
        msg = "required key is missing"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {loc + ': ' if loc else ''}{msg}{more}"


def yaml_error(path: str | Path, err: Exception) -> str:
    """One line for a YAML parse error: `file:line: not valid YAML: problem`.

    Args:
        path: the file.
        err: the yaml.YAMLError.
    """
    mark = getattr(err, "problem_mark", None)
    pos = f":{mark.line + 1}" if mark else ""
    problem = getattr(err, "problem", None) or (str(err).splitlines() or [type(err).__name__])[0]
    return f"{path}{pos}: not valid YAML: {problem}"

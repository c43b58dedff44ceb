"""Lazy public names for a package's `__init__.py` (PEP 562).

A package lists each public name once, under the private module that defines it; the module is
imported on first use, so a command imports only what it needs (an engine's libraries,
asyncssh, ...). Every package of the app uses this one helper.

    __all__, __getattr__, __dir__ = lazy_exports(__name__, {
        "_ledger": ("Ledger", "LedgerError"),
    })
"""

from __future__ import annotations

import importlib
from typing import Callable, Mapping


def lazy_exports(
    package: str, modules: Mapping[str, tuple[str, ...]]
) -> tuple[list[str], Callable[[str], object], Callable[[], list[str]]]:
    """`__all__`, `__getattr__` and `__dir__` for a package whose names live in private modules.

    Args:
        package: the package's `__name__`.
        modules: private module (relative, e.g. "_ledger") -> the public names it defines.
    """
    where: dict[str, str] = {}
    for module, names in modules.items():
        for name in names:
            if name in where:
                raise ValueError(f"{package}: {name!r} is exported from both {where[name]} and {module}")
            where[name] = f"{package}.{module.lstrip('.')}"
    pkg_globals = importlib.import_module(package).__dict__

    def __getattr__(name: str) -> object:
        module = where.get(name)
        if module is None:
            try:  # a subpackage, e.g. evaluators.sinks
                return importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as e:
                if e.name != f"{package}.{name}":
                    raise
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        value = getattr(importlib.import_module(module), name)
        pkg_globals[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(pkg_globals) | set(where))

    return sorted(where), __getattr__, __dir__

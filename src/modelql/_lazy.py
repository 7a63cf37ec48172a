"""Lazy package exports, so that importing a package (as `modelql --help` does for every
command's module) loads none of the heavy modules behind its names."""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Iterable, Mapping


def lazy_exports(package: str, exports: Mapping[str, str], submodules: Iterable[str] = ()) -> Callable[[str], Any]:
    """A module-level `__getattr__` for `package`: `exports` maps a name to the module defining it
    (a submodule's short name, or a dotted absolute name); `submodules` are names that are
    submodules themselves. The value is cached on the package on first access."""
    submodules = frozenset(submodules)

    def __getattr__(name: str) -> Any:
        if name in submodules:
            value = importlib.import_module(f"{package}.{name}")
        elif name in exports:
            module = exports[name]
            value = getattr(importlib.import_module(module if "." in module else f"{package}.{module}"), name)
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        sys.modules[package].__dict__[name] = value
        return value

    return __getattr__

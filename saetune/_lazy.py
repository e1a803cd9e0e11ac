"""Names a package exports but imports only on first use, so importing the package stays cheap."""

from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(package: str, namespace: dict, mapping: dict[str, str]) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package``: ``name`` comes from module ``mapping[name]`` when first
    asked for, and is then kept in ``namespace`` (the package's globals)."""

    def __getattr__(name: str):
        if name in mapping:
            value = getattr(importlib.import_module(mapping[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(mapping))

    return __getattr__, __dir__

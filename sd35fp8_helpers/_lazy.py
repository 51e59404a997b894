"""Lazy re-exports for package ``__init__`` files: the public names load their module on first use.

Why: ``import sd35fp8_helpers`` and ``sd35fp8 --help`` must not import torch or diffusers (seconds each), yet
``from sd35fp8_helpers.precision import quantize_`` should just work.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Return ``(__getattr__, __dir__)`` for ``package`` given ``{public name: relative module}``."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(exports[name], package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__

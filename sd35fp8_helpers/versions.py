"""The library versions that decide an image or a timing — read one way, everywhere (PNGs, reports, benchmarks).

Read from the installed distributions' metadata, so asking costs no torch import.
"""

from __future__ import annotations

from importlib import metadata

CORE_LIBRARIES: tuple[str, ...] = ("torch", "diffusers", "transformers")
"""What changes pixels: PNG metadata and setup state record these."""

OPTIONAL_LIBRARIES: tuple[str, ...] = ("torchao", "accelerate", "safetensors", "huggingface_hub")


def library_versions(*, optional: bool = False) -> dict[str, str]:
    """``{name: version}`` for the core libraries (and, with ``optional``, the others that are installed).

    Example:
        >>> sorted(library_versions())
        ['diffusers', 'torch', 'transformers']
    """
    names = CORE_LIBRARIES + (OPTIONAL_LIBRARIES if optional else ())
    out: dict[str, str] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            if name in CORE_LIBRARIES:
                out[name] = "not installed"
    return out

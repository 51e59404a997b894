"""LoRAs that ship inside the package, by name: ``load_lora_(pipe, "diamond")``, the playground's LoRA menu and
the images API's ``"lora"`` field all read this one folder.

Each LoRA is ``shipped/NAME.safetensors`` (kilobytes: rank-4 on the scene model) with ``shipped/NAME.json``
beside it: what it teaches, the model it was trained on, and how it was made and measured.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import LoraError

SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"


def shipped_loras() -> list[str]:
    """Names of the shipped LoRAs, sorted (what the playground and the API offer).

    Example:
        >>> "diamond" in shipped_loras()  # doctest: +SKIP
        True
    """
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.safetensors"))


def shipped_lora_path(name: str) -> Path:
    return resolve_lora(name)


def resolve_lora(path_or_name: str | Path) -> Path:
    """A LoRA file path, or the name of a LoRA shipped in the package (:func:`~.shipped.shipped_loras`)."""
    p = Path(path_or_name).expanduser()
    if p.exists() or p.suffix or "/" in str(path_or_name):
        return p
    if str(path_or_name) in shipped_loras():
        return SHIPPED_DIR / f"{path_or_name}.safetensors"
    names = ", ".join(shipped_loras()) or "none"
    raise LoraError(p, "is neither a file nor the name of a shipped LoRA",
                    fix=f"pass a .safetensors path, or one of the shipped names: {names}")


def shipped_lora_info(name: str) -> dict[str, Any]:
    """The sidecar JSON of a shipped LoRA (empty when it has none)."""
    path = SHIPPED_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else {}

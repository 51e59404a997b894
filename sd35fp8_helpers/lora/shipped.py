"""LoRAs by name: those shipped inside the package and your own in ``$SD35FP8_HOME/loras`` (default
``~/.cache/sd35fp8/loras``). ``load_lora_(pipe, NAME)``, ``GenerationSettings(lora=NAME)``, the playground's LoRA
menu and the images API's ``"lora"`` field all read :func:`named_loras` — a name, never a path, so an API client
cannot make the server open an arbitrary file.

Each LoRA is ``NAME.safetensors``, optionally with ``NAME.json`` beside it (what it teaches, the model it was
trained on, how it was made and measured).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import LoraError

SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"


def user_lora_dir() -> Path:
    """``$SD35FP8_HOME/loras``: drop a ``.safetensors`` LoRA here to pick it by name."""
    from ..constants import settings

    return settings().home / "loras"


def lora_folders() -> list[Path]:
    """Where names are looked up, in order (the package's own first: a user file cannot shadow it)."""
    return [SHIPPED_DIR, user_lora_dir()]


def shipped_loras() -> list[str]:
    """Names of the LoRAs inside the package, sorted."""
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.safetensors"))


def named_loras() -> dict[str, Path]:
    """Every LoRA available by name → its file (shipped ones, then ``$SD35FP8_HOME/loras``)."""
    found: dict[str, Path] = {}
    for folder in lora_folders():
        for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else ():
            found.setdefault(path.stem, path)
    return found


def shipped_lora_path(name: str) -> Path:
    return resolve_lora(name)


def resolve_lora(path_or_name: str | Path) -> Path:
    """A LoRA file path, or the name of a LoRA in :func:`named_loras` (shipped or in ``$SD35FP8_HOME/loras``)."""
    p = Path(path_or_name).expanduser()
    if p.exists() or p.suffix or "/" in str(path_or_name):
        return p
    named = named_loras()
    if str(path_or_name) in named:
        return named[str(path_or_name)]
    names = ", ".join(named) or "none"
    raise LoraError(p, "is neither a file nor the name of a LoRA",
                    fix=f"pass a .safetensors path, or a name: {names} (add your own to {user_lora_dir()})")


def shipped_lora_info(name: str) -> dict[str, Any]:
    """The sidecar JSON of a named LoRA (empty when it has none)."""
    path = named_loras().get(name)
    side = path.with_suffix(".json") if path else None
    return json.loads(side.read_text()) if side is not None and side.is_file() else {}

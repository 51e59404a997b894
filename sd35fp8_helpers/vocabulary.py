"""The project's vocabularies — precisions, model sources, known repositories — defined once, as plain data.

Every interface (the CLI's ``choices``, the playground's dropdowns, the images API's validation, PNG metadata,
``setup``) reads these tables, so "what precision is this?" has one answer everywhere. This module imports
nothing heavy: ``sd35fp8 --help`` reads it without torch.

Memory strategies are the one ladder in :mod:`sd35fp8_helpers.memory.strategies` (also torch-free at import).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import InvalidGenerationInput

# --- precisions ------------------------------------------------------------------------------------------

PRECISIONS: dict[str, str] = {"bf16": "BF16", "fp8-storage": "FP8 storage", "fp8-compute": "FP8 compute"}
"""The precision names every interface shares (value: display label).

``bf16`` means "the pipeline as loaded, no FP8" (float32 on CPU, where bf16 matmuls are slow); ``fp8-storage``
(float8 weights, upcast per layer: any device) and ``fp8-compute`` (float8 matmuls: capability >= 8.9) are
:func:`~sd35fp8_helpers.precision.quantize_` modes. PNG metadata records these names, so an image can be
re-made in its precision.
"""

PRECISION_CHOICES: tuple[str, ...] = ("auto", *PRECISIONS)
"""What a user may ask for: a precision, or ``auto`` (compute where the GPU can, else storage)."""

_PRECISION_ALIASES = {"fp8": "fp8-storage", "bfloat16": "bf16", "fp8_storage": "fp8-storage",
                      "fp8_compute": "fp8-compute", "storage": "fp8-storage", "compute": "fp8-compute"}


def parse_precision(value: str, *, allow_auto: bool = False) -> str:
    """Validate a precision name and return its canonical spelling; anything else is a clear error.

    Near misses (``"fp8"``, ``"fp8_storage"``) are refused too — naming the precise name — because a
    precision that is silently reinterpreted is an image that re-renders differently.

    Example:
        >>> parse_precision("fp8-storage")
        'fp8-storage'
    """
    allowed = PRECISION_CHOICES if allow_auto else tuple(PRECISIONS)
    if isinstance(value, str) and value in allowed:
        return value
    hint = _PRECISION_ALIASES.get(str(value).strip().lower())
    fix = (f"did you mean {hint!r}? " if hint else "") + "use one of " + ", ".join(allowed)
    raise InvalidGenerationInput("precision", value, f"is not one of {', '.join(allowed)}", fix=fix)


def precision_label(precision: str, compute_dtype: str | None = None) -> str:
    """How a precision is shown to people: ``bf16`` names the dtype really in use (``float32`` on CPU)."""
    label = PRECISIONS[parse_precision(precision)]
    if precision == "bf16" and compute_dtype and compute_dtype not in ("bfloat16", "torch.bfloat16"):
        return f"as loaded ({compute_dtype.removeprefix('torch.')})"
    return label


# --- model sources ---------------------------------------------------------------------------------------

SourceKind = Literal["embedded", "tiny", "local", "comfy-file", "git", "hub"]

EMBEDDED_MODELS: dict[str, SourceKind] = {"scenes": "embedded", "tiny": "tiny"}
"""Names that need no download: ``scenes`` ships in the package (trained; the default), ``tiny`` is built on
first use (random weights: for tests that need the architecture only)."""

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
GIT_URL = re.compile(r"^(https?://|file://|ssh://|git@)|\.git/?$")

NONEXISTENT_REPOS: dict[str, str] = {
    "stabilityai/stable-diffusion-3.5-fp8": (
        "this repository does not exist (blog posts that tell you to git clone it are wrong). FP8 SD3.5 comes "
        "from: 'Comfy-Org/stable-diffusion-3.5-fp8' (scaled-FP8 single files, e.g. "
        "sd3.5_large_fp8_scaled.safetensors), or the gated 'stabilityai/stable-diffusion-3.5-large' / "
        "'-medium' repos quantised to FP8 on load by sd35fp8"
    ),
}
"""Repo ids people are told to use that do not exist, with what to use instead."""


@dataclass(frozen=True)
class SourceSpec:
    """What a model string names, before anything is fetched: its kind and the string itself."""

    spec: str
    kind: SourceKind


def classify_model_spec(spec: str | Path) -> SourceSpec:
    """The one classifier of model strings: embedded name, Comfy file, local folder, git URL or hub repo id.

    Order matters: an existing path wins over a repo-id-shaped string (``models/large`` may be both).
    Raises :class:`~sd35fp8_helpers.errors.ModelNotFound` with the fix for what it cannot be.

    Example:
        >>> classify_model_spec("stabilityai/stable-diffusion-3.5-medium").kind
        'hub'
    """
    from .errors import ModelNotFound

    s = str(spec)
    if s in EMBEDDED_MODELS:
        return SourceSpec(s, EMBEDDED_MODELS[s])
    if s in NONEXISTENT_REPOS:
        check_repo_id(s)
    path = Path(s).expanduser()
    if path.is_file() and path.suffix == ".safetensors":
        return SourceSpec(s, "comfy-file")
    if path.is_dir():
        return SourceSpec(s, "local")
    if GIT_URL.search(s):
        return SourceSpec(s, "git")
    if REPO_ID.match(s):
        return SourceSpec(s, "hub")
    raise ModelNotFound(s, "is neither 'tiny', an existing folder or .safetensors file, a git URL, nor a hub repo "
                           "id like 'owner/name'", fix=MODEL_SPEC_FIX)


MODEL_SPEC_FIX = ("check the spelling; pass tiny, a diffusers folder (with model_index.json), a Comfy .safetensors "
                  "file, a git URL, or a hub id such as stabilityai/stable-diffusion-3.5-medium")
NONEXISTENT_FIX = ("use Comfy-Org/stable-diffusion-3.5-fp8 (sd35fp8 download … --include "
                   "sd3.5_large_fp8_scaled.safetensors, then load_comfy_pipeline), or a gated stabilityai repo "
                   "quantised on load (quantize_)")


def check_repo_id(repo_id: str) -> str:
    """Refuse a repo id that does not exist (with what to use instead) or is not ``owner/name``."""
    from .errors import ModelNotFound

    if repo_id in NONEXISTENT_REPOS:
        raise ModelNotFound(repo_id, NONEXISTENT_REPOS[repo_id], fix=NONEXISTENT_FIX)
    if not REPO_ID.match(repo_id):
        raise ModelNotFound(repo_id, "is not a hub repo id", fix="use owner/name, e.g. "
                                                                 "stabilityai/stable-diffusion-3.5-medium")
    return repo_id

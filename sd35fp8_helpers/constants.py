"""Every environment variable sd35fp8 reads, and the project's named defaults — in one place.

Environment variables (read by :func:`settings`, once per process; tests build their own with
:meth:`Settings.from_env`):

=========================  ===========================================================================
``SD35FP8_HOME``           Where sd35fp8 caches what it builds (the embedded tiny model).
                           Default: ``$XDG_CACHE_HOME/sd35fp8`` or ``~/.cache/sd35fp8``.
``SD35FP8_OUTPUT_DIR``     Where notebooks and the CLI write images, executed notebooks and JSON.
                           Default: ``outputs/`` at the repository root (git ignores it), or in the
                           current folder when the package is installed elsewhere.
``HF_HOME``                Root of the Hugging Face cache (token file, hub cache). Default ``~/.cache/huggingface``.
``HF_HUB_CACHE``           Where hub downloads land. Default ``$HF_HOME/hub``. Put it on a fast disk
                           with room for the model (SD3.5 Large needs ~28 GB in diffusers layout).
``TRANSFORMERS_CACHE``     Deprecated by transformers; still honoured by some old code. Use ``HF_HUB_CACHE``.
``HF_TOKEN``               Hub access token for gated repositories. Read, never printed or logged.
``HF_HUB_OFFLINE``         ``1`` makes the hub client refuse all network access.
``HF_ENDPOINT``            Hub URL, read by huggingface_hub at import (tests point it at a local server).
``SD35FP8_API_KEYS``       Keys ``sd35fp8 serve`` accepts, comma-separated (plain keys, hashed at start-up, or
                           ``LABEL sha256:SALT:DIGEST`` lines from ``sd35fp8 api-key``); added to ``--keys-file``.
                           Never printed (``repr`` hides it) or logged.
``SD35FP8_BROKER_URL``     Redis URL of the job queue (``redis://HOST:PORT/0``) for ``serve``, ``worker`` and
                           ``batch`` when ``--broker`` is not given. May hold a password: shown without it.
``SD35FP8_JWT_SECRET``     HS256 secret ``sd35fp8 serve`` verifies JWT bearer tokens with (or
                           ``--jwt-secret-file``). Never printed (``repr`` hides it) or logged.
=========================  ===========================================================================
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

# --- named defaults ---------------------------------------------------------------------------
EMBEDDED_MODEL = "scenes"
"""The model shipped inside the package: a tiny SD3.5 (real classes) trained on captioned synthetic scenes, so
its images mean something (``sd35fp8_helpers/models/sd35-scenes/README.md`` is its model card)."""

EMBEDDED_MODEL_DIR = Path(__file__).resolve().parent / "models" / "sd35-scenes"

DEFAULT_MODEL = EMBEDDED_MODEL
"""What the notebooks, the CLI, the playground, the server and ``setup`` call "the model" unless told otherwise.
``tiny`` (random weights, built in a second) stays for tests that need only the architecture."""

DEFAULT_OUTPUT_DIR = "outputs"
MIN_PYTHON = (3, 10)
MIN_TORCH_FP8 = (2, 3)
"""float8 dtypes appeared in torch 2.1; diffusers documents >= 2.3 for FP8 single files."""

MIN_VERSIONS: dict[str, str] = {
    "diffusers": "0.32.0",  # SD3.5 support (StableDiffusion3Pipeline with dual attention layers)
    "transformers": "4.45.0",
    "accelerate": "0.33.0",
    "huggingface_hub": "0.25.0",
    "safetensors": "0.4.3",  # float8 dtypes in the header
}
FP8_COMPUTE_MIN_CAPABILITY = (8, 9)
"""float8 tensor-core matmuls (``torch._scaled_mm``): Ada (RTX 40xx, L4, L40) and Hopper (H100/H200)."""

DISK_SAFETY_FACTOR = 1.15
"""Free space wanted on top of a model's size: the hub writes ``.incomplete`` files beside the cache."""


REPO_ROOT = Path(__file__).resolve().parent.parent
"""The checkout this package runs from (notebooks/, docs/ live here when installed with ``pip install -e .``)."""

BENCHMARKS_DIR = REPO_ROOT / "docs" / "benchmarks"
"""Raw JSON of every committed GPU measurement; notebooks and the planner read figures from here."""


def _default_output_dir() -> Path:
    repo = REPO_ROOT
    return repo / DEFAULT_OUTPUT_DIR if (repo / "pyproject.toml").is_file() else Path.cwd() / DEFAULT_OUTPUT_DIR


def _default_cache_root(env: Mapping[str, str]) -> Path:
    xdg = env.get("XDG_CACHE_HOME")
    return Path(xdg) if xdg else Path.home() / ".cache"


@dataclass(frozen=True)
class Settings:
    """The environment, read once. Paths are absolute; the token itself is never stored here."""

    home: Path
    output_dir: Path
    hf_home: Path
    hf_hub_cache: Path
    transformers_cache: str | None
    hub_offline: bool
    token_in_env: bool
    api_keys: str = field(default="", repr=False)
    broker_url: str = field(default="", repr=False)
    jwt_secret: str = field(default="", repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        cache = _default_cache_root(env)
        hf_home = Path(env.get("HF_HOME") or cache / "huggingface").expanduser()
        return cls(
            home=Path(env.get("SD35FP8_HOME") or cache / "sd35fp8").expanduser().absolute(),
            output_dir=Path(env.get("SD35FP8_OUTPUT_DIR") or _default_output_dir()).expanduser().absolute(),
            hf_home=hf_home.absolute(),
            hf_hub_cache=Path(env.get("HF_HUB_CACHE") or hf_home / "hub").expanduser().absolute(),
            transformers_cache=env.get("TRANSFORMERS_CACHE") or None,
            hub_offline=(env.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}),
            token_in_env=bool(env.get("HF_TOKEN", "").strip()),
            api_keys=env.get("SD35FP8_API_KEYS", ""),
            broker_url=env.get("SD35FP8_BROKER_URL", "").strip(),
            jwt_secret=env.get("SD35FP8_JWT_SECRET", ""),
        )


@functools.lru_cache(maxsize=1)
def settings() -> Settings:
    """The process-wide settings (environment read on first call)."""
    return Settings.from_env()

"""sd35fp8_helpers — Stable Diffusion 3.5 with FP8 weights on one GPU, every pitfall detected and explained.

The public API, one entry point per job::

    from sd35fp8_helpers import run_doctor, load_pipeline, generate, GenerationSettings
    print(run_doctor().to_text())                  # what this machine can do (FP8 storage? compute?)
    pipe = load_pipeline("tiny")                   # "tiny" | a diffusers folder | a hub repo id
    result = generate(pipe, GenerationSettings("a red fox in the snow", seed=7))
    result.save("outputs/images/fox.png")          # settings travel in the PNG

Heavy libraries (torch, diffusers) are imported only when a function needs them, so ``sd35fp8 --help``
and ``import sd35fp8_helpers`` stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "run_doctor": "env", "DoctorReport": "env", "Check": "env",
    "resolve_model": "models", "load_pipeline": "models", "ModelSource": "models",
    "generate": "generation", "GenerationSettings": "generation", "GenerationResult": "generation",
    "read_png_metadata": "generation", "settings_from_png": "generation",
    "build_tiny_pipeline": "tiny", "save_tiny_model": "tiny", "tiny_model_path": "tiny",
    "get_preset": "presets", "PRESETS": "presets", "instantiate_transformer": "presets",
    "run_all": "notebooks",
    "settings": "constants",
    "quantize_": "fp8", "FP8Config": "fp8", "FP8Report": "fp8", "save_quantized": "fp8",
    "load_comfy_pipeline": "comfy", "quality_report": "quality", "run_bench": "bench",
    "generate_with_fallback": "memory",
    "decode_tiled": "tiling", "TileConfig": "tiling", "generate_tiled": "tiled_diffusion",
    "Playground": "playground",
    "run_setup": "onboarding", "SetupConfig": "onboarding", "build_report": "report",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from .constants import settings
    from .bench import run_bench
    from .comfy import load_comfy_pipeline
    from .env import Check, DoctorReport, run_doctor
    from .fp8 import FP8Config, FP8Report, quantize_, save_quantized
    from .generation import GenerationResult, GenerationSettings, generate, read_png_metadata, settings_from_png
    from .models import ModelSource, load_pipeline, resolve_model
    from .notebooks import run_all
    from .memory import generate_with_fallback
    from .onboarding import SetupConfig, run_setup
    from .playground import Playground
    from .presets import PRESETS, get_preset, instantiate_transformer
    from .report import build_report
    from .tiled_diffusion import generate_tiled
    from .tiling import TileConfig, decode_tiled
    from .quality import quality_report
    from .tiny import build_tiny_pipeline, save_tiny_model, tiny_model_path


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'sd35fp8_helpers' has no attribute {name!r}")

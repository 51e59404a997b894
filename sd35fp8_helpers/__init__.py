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

from ._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "run_doctor": ".doctor.checks",
    "DoctorReport": ".doctor.checks",
    "Check": ".doctor.checks",
    "resolve_model": ".pipeline.loading",
    "load_pipeline": ".pipeline.loading",
    "ModelSource": ".pipeline.loading",
    "generate": ".pipeline.generation",
    "GenerationSettings": ".pipeline.generation",
    "GenerationResult": ".pipeline.generation",
    "read_png_metadata": ".pipeline.generation",
    "settings_from_png": ".pipeline.generation",
    "build_tiny_pipeline": ".pipeline.tiny",
    "save_tiny_model": ".pipeline.tiny",
    "tiny_model_path": ".pipeline.tiny",
    "get_preset": ".presets",
    "PRESETS": ".presets",
    "instantiate_transformer": ".presets",
    "run_all": ".onboarding.notebooks",
    "settings": ".constants",
    "quantize_": ".precision.quantize",
    "FP8Config": ".precision.quantize",
    "FP8Report": ".precision.quantize",
    "apply_precision_": ".precision.quantize",
    "save_quantized": ".precision.checkpoint",
    "load_comfy_pipeline": ".precision.comfy",
    "quality_report": ".precision.quality",
    "run_bench": ".benchmarks.fp8",
    "generate_with_fallback": ".memory.strategies",
    "decode_tiled": ".highres.tiling",
    "TileConfig": ".highres.tiling",
    "generate_tiled": ".highres.tiled_diffusion",
    "Playground": ".interactive.playground",
    "run_setup": ".onboarding.setup",
    "SetupConfig": ".onboarding.setup",
    "build_report": ".onboarding.report",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

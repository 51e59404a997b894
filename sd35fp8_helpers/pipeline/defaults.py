"""What a model should be run with when the user names nothing: steps, guidance, size, T5 sequence length.

Read from the model itself — the embedded scene model ships its recipe in ``sd35fp8_scenes.json``; SD3.5
Large / Medium / Turbo and the random tiny model take their preset's — so the CLI, the playground, the images
API and ``setup`` all start from the same settings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..presets import LARGE, MEDIUM, TINY, Preset

MODEL_INFO = "sd35fp8_scenes.json"
"""File beside ``model_index.json`` in a model trained by :mod:`sd35fp8_helpers.training`: its ``inference``
settings (steps, guidance, size, ``max_sequence_length``) and its training record."""


@dataclass(frozen=True)
class InferenceDefaults:
    steps: int
    guidance_scale: float
    height: int
    width: int
    max_sequence_length: int | None = None
    """T5 tokens. SD3 runs T5 without an attention mask, so padding length changes every embedding: a model
    trained at 32 tokens must be run at 32 (diffusers' default is 256)."""

    def pipeline_kwargs(self) -> dict[str, Any]:
        """These settings as ``StableDiffusion3Pipeline.__call__`` arguments (for batched evaluation loops)."""
        length = {} if self.max_sequence_length is None else {"max_sequence_length": self.max_sequence_length}
        return {"num_inference_steps": self.steps, "guidance_scale": self.guidance_scale, "height": self.height,
                "width": self.width, **length}


def native_size(pipe) -> int:
    """The side, in pixels, this pipeline's transformer was trained at (SD3.5: 1024; the tiny model: 128).

    The one place it is computed: ``sample_size`` (latent side) times the VAE's downscale factor.
    """
    return pipe.transformer.config.sample_size * pipe.vae_scale_factor


def read_model_info(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / MODEL_INFO
    return json.loads(path.read_text()) if path.is_file() else None


def preset_for(pipe) -> Preset:
    """The architecture preset a loaded pipeline belongs to (by its source and its transformer's depth)."""
    source = getattr(pipe, "sd35fp8_source", None)
    if source is not None and source.is_tiny:
        return TINY
    from ..presets import recognise_preset

    config = dict(pipe.transformer.config)
    # Large and Large Turbo have identical configs: the name (repo id, hub-cache folder, folder name,
    # config _name_or_path) decides; recognise_preset falls back on the depth only when no name matches.
    for name in ((source.spec, str(source.path)) if source is not None else ()):
        found = recognise_preset(name, {"_name_or_path": config.get("_name_or_path", "")})
        if found is not None:
            return found
    return MEDIUM if pipe.transformer.config.num_layers == MEDIUM.transformer["num_layers"] else LARGE


def model_defaults(pipe) -> InferenceDefaults:
    """The settings this pipeline's model is meant to run with.

    Example:
        >>> from sd35fp8_helpers import load_pipeline
        >>> model_defaults(load_pipeline("scenes", device="cpu")).max_sequence_length
        32
    """
    source = getattr(pipe, "sd35fp8_source", None)
    info = read_model_info(source.path) if source is not None else None
    if info and "inference" in info:
        i = info["inference"]
        return InferenceDefaults(int(i["steps"]), float(i["guidance_scale"]), int(i["height"]), int(i["width"]),
                                 i.get("max_sequence_length"))
    preset = preset_for(pipe)
    side = native_size(pipe)
    return InferenceDefaults(preset.default_steps, preset.default_guidance, side, side)


def default_settings(pipe, prompt: str, seed: int = 0, **overrides: Any):
    """:class:`~sd35fp8_helpers.pipeline.generation.GenerationSettings` for ``prompt`` at ``seed`` with this
    model's own steps, guidance and size (:func:`model_defaults`); ``overrides`` replace any of them.

    Example:
        >>> from sd35fp8_helpers import load_pipeline
        >>> default_settings(load_pipeline("scenes", device="cpu"), "a red circle", width=192).width
        192
    """
    from .settings import GenerationSettings

    d = model_defaults(pipe)
    fields = {"steps": d.steps, "guidance_scale": d.guidance_scale, "height": d.height, "width": d.width}
    return GenerationSettings(prompt, seed=seed, **{**fields, **overrides})

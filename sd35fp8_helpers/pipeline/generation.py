"""Generate one image, checked first, with a progress bar and a step callback; save it with its settings.

The flow mirrors diffusers' own pipelines: check inputs → run the pipeline (its denoising loop reports
every step to our callback) → wrap the result in a dataclass. Inputs are checked *before* any model work,
so a wrong size fails in milliseconds with the nearest valid value, not after the text encoders ran.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import InvalidGenerationInput

PNG_METADATA_KEY = "sd35fp8"


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that determines an image (with the model and precision): plain data, JSON-able."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 4
    guidance_scale: float = 4.5
    height: int = 128
    width: int = 128


@dataclass
class GenerationResult:
    image: Any  # PIL.Image.Image
    settings: GenerationSettings
    seconds: float
    model: str = "tiny"
    precision: str = "bf16"
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)

    def metadata(self) -> dict[str, Any]:
        """Settings, model, precision and library versions: what reproduces this image."""
        return {"settings": asdict(self.settings), "model": self.model, "precision": self.precision,
                "device": self.device, "seconds": round(self.seconds, 3), "versions": library_versions(),
                **self.extra}

    def png_bytes(self) -> bytes:
        """The image as PNG bytes carrying :meth:`metadata` as a text chunk (see :func:`read_png_metadata`)."""
        import io

        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text(PNG_METADATA_KEY, json.dumps(self.metadata(), sort_keys=True))
        buf = io.BytesIO()
        self.image.save(buf, format="PNG", pnginfo=info)
        return buf.getvalue()

    def save(self, path: str | Path) -> Path:
        """Write :meth:`png_bytes` to ``path``, atomically (never a half-written PNG under the final name)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.partial")
        tmp.write_bytes(self.png_bytes())
        tmp.replace(path)
        return path


def library_versions() -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}


def read_png_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata :meth:`GenerationResult.save` wrote; ``settings`` rebuilds a :class:`GenerationSettings`."""
    from PIL import Image

    with Image.open(path) as img:
        raw = img.text.get(PNG_METADATA_KEY)  # type: ignore[attr-defined]
    if raw is None:
        raise ValueError(f"{path} carries no sd35fp8 metadata (was it saved by sd35fp8?)")
    return json.loads(raw)


def settings_from_png(path: str | Path) -> GenerationSettings:
    return GenerationSettings(**read_png_metadata(path)["settings"])


def pipeline_limits(pipe) -> tuple[int, int]:
    """(size multiple, largest side in px) of one pass of this pipeline's transformer."""
    cfg = pipe.transformer.config
    multiple = pipe.vae_scale_factor * cfg.patch_size
    return multiple, cfg.pos_embed_max_size * multiple


def _nearest_multiples(value: int, multiple: int) -> str:
    low = max(multiple, value // multiple * multiple)
    return f"{low}" if low == value else f"{low} or {low + multiple}"


def check_settings(s: GenerationSettings, *, multiple: int = 16, max_side: int | None = None) -> None:
    """Raise :class:`InvalidGenerationInput` naming the argument, the value and the nearest valid one."""
    if not isinstance(s.prompt, str) or not s.prompt.strip():
        raise InvalidGenerationInput("prompt", s.prompt, "is empty", fix="describe the image you want")
    for name in ("height", "width"):
        value = getattr(s, name)
        if not isinstance(value, int) or value < multiple:
            raise InvalidGenerationInput(name, value, f"must be a whole number of pixels >= {multiple}")
        if value % multiple:
            raise InvalidGenerationInput(name, value, f"is not a multiple of {multiple}; nearest valid: "
                                         f"{_nearest_multiples(value, multiple)}")
        if max_side is not None and value > max_side:
            raise InvalidGenerationInput(
                name, value, f"is over this model's single-pass limit of {max_side} px",
                fix="generate at or below the limit, then use tiled generation (notebook 04) to go larger")
    if not isinstance(s.steps, int) or s.steps < 1:
        raise InvalidGenerationInput("steps", s.steps, "must be a whole number >= 1")
    if not isinstance(s.seed, int) or s.seed < 0:
        raise InvalidGenerationInput("seed", s.seed, "must be a whole number >= 0")
    if s.guidance_scale < 0:
        raise InvalidGenerationInput("guidance_scale", s.guidance_scale, "must be >= 0 (1 disables guidance)")


StepCallback = Callable[[int, int], None]
"""Called as ``callback(step, total_steps)`` after each denoising step (step counts from 1)."""


def generate(pipe, settings: GenerationSettings, *, on_step: StepCallback | None = None,
             progress: bool = True, precision: str | None = None) -> GenerationResult:
    """Generate one image with ``pipe`` (a ``StableDiffusion3Pipeline``).

    The latents come from a CPU generator seeded with ``settings.seed``, so the same seed gives the same
    starting noise on every device.

    Example:
        >>> from sd35fp8_helpers import load_pipeline
        >>> pipe = load_pipeline("tiny")
        >>> generate(pipe, GenerationSettings("a cat", steps=2), progress=False).image.size
        (128, 128)
    """
    import torch

    multiple, max_side = pipeline_limits(pipe)
    check_settings(settings, multiple=multiple, max_side=max_side)
    pipe.set_progress_bar_config(disable=not progress, desc="denoising")

    def _callback(_pipe, step_index, _timestep, kwargs):
        if on_step is not None:
            on_step(step_index + 1, settings.steps)
        return kwargs

    start = time.perf_counter()
    out = pipe(
        prompt=settings.prompt, negative_prompt=settings.negative_prompt or None,
        num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
        height=settings.height, width=settings.width,
        generator=torch.Generator("cpu").manual_seed(settings.seed),
        callback_on_step_end=_callback,
    )
    seconds = time.perf_counter() - start
    source = getattr(pipe, "sd35fp8_source", None)
    dtype = str(pipe.transformer.dtype).replace("torch.", "")
    return GenerationResult(image=out.images[0], settings=settings, seconds=seconds,
                            model=source.spec if source else "unknown",
                            precision=precision or dtype, device=str(pipe.device),
                            extra={"compute_dtype": dtype})

"""Generate one image, checked first, with a progress bar and a step callback; save it with its settings.

The flow mirrors diffusers' own pipelines: check inputs → run the pipeline (its denoising loop reports
every step to our callback) → wrap the result in a dataclass. Inputs are checked *before* any model work,
so a wrong size fails in milliseconds with the nearest valid value, not after the text encoders ran.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidGenerationInput
from ..versions import library_versions
from ..vocabulary import parse_precision, precision_label
from .decode import fit_vae_tiles
from .defaults import model_defaults, native_size  # noqa: F401  (native_size: part of this module's API)
from .settings import GenerationSettings  # noqa: F401  (part of this module's API)

PNG_METADATA_KEY = "sd35fp8"

MAX_SEED = 2**64 - 1
"""torch generators take 64-bit seeds; a larger one would fail deep inside the pipeline."""
MAX_STEPS = 1000
"""More denoising steps than any scheduler schedule is useful for; past it a typo holds the GPU for hours."""
MAX_GUIDANCE = 100.0
"""Classifier-free guidance far past ~20 only saturates the image; NaN or infinity poisons every latent."""


MAX_LORA_SCALE = 4.0
"""LoRA strengths past ±4 only burn the image; infinity or NaN would poison every latent."""


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


def read_png_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata :meth:`GenerationResult.save` wrote; ``settings`` rebuilds a :class:`GenerationSettings`."""
    from PIL import Image

    with Image.open(path) as img:
        raw = img.text.get(PNG_METADATA_KEY)  # type: ignore[attr-defined]
    if raw is None:
        raise InvalidGenerationInput("png", str(path), "carries no sd35fp8 metadata, so its settings are unknown",
                                     fix="use a PNG saved by sd35fp8 (generate, the playground, serve), or pass "
                                         "--prompt/--seed to make a new image")
    try:
        meta = json.loads(raw)
        GenerationSettings(**meta["settings"])
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidGenerationInput("png", str(path), f"has sd35fp8 metadata that cannot be read ({exc})",
                                     fix="the file was edited or written by another version; pass --prompt "
                                         "and --seed instead") from exc
    return meta


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
    if isinstance(s.steps, bool) or not isinstance(s.steps, int) or not 1 <= s.steps <= MAX_STEPS:
        raise InvalidGenerationInput("steps", s.steps, f"must be a whole number from 1 to {MAX_STEPS}")
    if isinstance(s.seed, bool) or not isinstance(s.seed, int) or not 0 <= s.seed <= MAX_SEED:
        raise InvalidGenerationInput("seed", s.seed, f"must be a whole number from 0 to 2**64-1 ({MAX_SEED})",
                                     fix="any seed in range gives a reproducible image; e.g. seed % 2**64")
    g = s.guidance_scale
    if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or not 0 <= g <= MAX_GUIDANCE:
        raise InvalidGenerationInput("guidance_scale", g, f"must be a finite number from 0 to {MAX_GUIDANCE:g} "
                                     "(0 or 1 disables guidance; SD3.5 uses 3.5-7)")
    if not isinstance(s.negative_prompt, str):
        raise InvalidGenerationInput("negative_prompt", s.negative_prompt, "must be text")
    if s.lora:
        from ..lora.shipped import named_loras, user_lora_dir

        names = list(named_loras())
        if s.lora not in names:
            raise InvalidGenerationInput("lora", s.lora, "is not the name of a LoRA",
                                         fix=f"choose one of: {', '.join(names) or 'none yet'}, or leave it empty; "
                                             f"add your own .safetensors to {user_lora_dir()}")
    x = s.lora_scale
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or abs(x) > MAX_LORA_SCALE:
        raise InvalidGenerationInput("lora_scale", x, f"must be a finite number from -{MAX_LORA_SCALE:g} to "
                                     f"{MAX_LORA_SCALE:g} (1 = full strength, 0 = off)")


def text_kwargs(pipe) -> dict[str, Any]:
    """Pipeline arguments the model itself asks for (a scene model trained with 32 T5 tokens runs with 32)."""
    length = model_defaults(pipe).max_sequence_length
    return {} if length is None else {"max_sequence_length": length}


def pipeline_precision(pipe) -> str:
    """The :data:`~sd35fp8_helpers.vocabulary.PRECISIONS` name a pipeline is in: ``fp8-storage`` /
    ``fp8-compute`` after :func:`~sd35fp8_helpers.precision.quantize_` (or an FP8 checkpoint), else ``bf16``
    ("as loaded"). Read from the pipeline, never passed around, so a PNG cannot record the wrong one."""
    report = getattr(pipe, "sd35fp8_fp8", None)
    return f"fp8-{report.mode}" if report is not None else "bf16"


def compute_dtype(pipe) -> str:
    """The dtype activations run in (``bfloat16`` on GPU, ``float32`` for the tiny model on CPU)."""
    return str(pipe.transformer.dtype).removeprefix("torch.")


def precision_label_of(pipe) -> str:
    """What to show people: ``BF16``, ``FP8 storage``, ``FP8 compute``, or ``as loaded (float32)``."""
    return precision_label(pipeline_precision(pipe), compute_dtype(pipe))


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
    actual = pipeline_precision(pipe)
    if precision is not None and parse_precision(precision) != actual:
        raise InvalidGenerationInput("precision", precision, f"does not match the pipeline, which is in {actual}",
                                     fix=f"apply_precision_(pipe, {precision!r}) first, or leave precision out: "
                                         "it is read from the pipeline")
    pipe.set_progress_bar_config(disable=not progress, desc="denoising")

    def _callback(_pipe, step_index, _timestep, kwargs):
        if on_step is not None:
            on_step(step_index + 1, settings.steps)
        return kwargs

    from ..lora.apply import use_lora_

    use_lora_(pipe, settings.lora, settings.lora_scale)  # the settings' LoRA on a side path (or none)
    fit_vae_tiles(pipe, settings.height, settings.width)  # VAE tiling, if on, must engage at this size
    start = time.perf_counter()
    out = pipe(
        prompt=settings.prompt, negative_prompt=settings.negative_prompt or None,
        num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
        height=settings.height, width=settings.width,
        generator=torch.Generator("cpu").manual_seed(settings.seed), **text_kwargs(pipe),
        callback_on_step_end=_callback,
    )
    seconds = time.perf_counter() - start
    source = getattr(pipe, "sd35fp8_source", None)
    return GenerationResult(image=out.images[0], settings=settings, seconds=seconds,
                            model=source.spec if source else "unknown",
                            precision=actual, device=str(pipe.device),
                            extra={"compute_dtype": compute_dtype(pipe), **_lora_record(pipe)})


def _lora_record(pipe) -> dict[str, Any]:
    """LoRAs on the pipeline when the image was made (hand-loaded ones too): PNG metadata says so."""
    from ..lora.apply import loaded_loras

    loras = loaded_loras(pipe)
    return {"loras": loras} if loras else {}

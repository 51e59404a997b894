"""Tiled denoising beyond one transformer pass, and the upscale-then-refine path to 2048²–4096².

Why tile the transformer at all
    SD3.5's positional embedding has a fixed size (``pos_embed_max_size`` patches: ≈3072 px for Large, 256 px
    for the tiny model); beyond it diffusers raises ``ValueError``. Attention cost also grows with the square
    of the token count. Tiled denoising never shows the transformer more than one window.

How :func:`generate_tiled` works (MultiDiffusion, Bar-Tal et al. 2023; Mixture of Diffusers, Jiménez 2023)
    Every step, the transformer predicts the velocity on overlapping latent windows; the predictions are
    blended into one canvas-sized prediction — plain averages (``weighting="uniform"``, MultiDiffusion) or
    Gaussian weights that favour each window's centre (``"gaussian"``, Mixture of Diffusers) — and the
    scheduler takes one step on the whole canvas. Overlapping windows agree because they are forced to share
    one latent every step; that is what removes seams. Windows of equal size are batched into one transformer
    call when ``activation_memory`` allows. All windows get the same prompt conditioning.

    It reuses the pipeline's own pieces — ``check_inputs``, ``encode_prompt``, ``prepare_latents``, the
    scheduler (``retrieve_timesteps``), ``progress_bar``, ``image_processor`` — and decodes with
    :func:`~sd35fp8_helpers.highres.tiling.decode_tiled`.

Upscale-refine (:func:`upscale_refine`, the "Ultimate SD Upscale" idea)
    Composition comes from a native-size generation (the model was trained there); resolution comes from
    upscaling (Lanczos) and then re-denoising the upscaled image at low strength (0.2–0.35) window by window
    — the same windowed loop, started from the noised latents of the upscaled image, with the scheduler
    schedule of ``StableDiffusion3Img2ImgPipeline(**pipe.components)`` (no second copy of the weights).

Example (384 × 512 px: beyond the tiny model's 256-px single pass):
    >>> from sd35fp8_helpers import load_pipeline
    >>> pipe = load_pipeline("tiny", device="cpu")
    >>> settings = GenerationSettings("a harbour at dusk", height=384, width=512)
    >>> result = generate_tiled(pipe, settings, TiledDiffusionConfig(vae=TileConfig(progress=False)), progress=False)
    >>> result.image.size, result.extra["tiled"]["windows"]
    ((512, 384), 20)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import InvalidTilingInput
from ..pipeline.decode import latents_to_image, scale_latents
from ..pipeline.generation import (
    GenerationResult,
    GenerationSettings,
    StepCallback,
    check_settings,
    pipeline_limits,
    text_kwargs,
)
from .tiling import TileConfig, decode_tiled, encode_tiled

Weighting = Literal["gaussian", "uniform"]

TRANSFORMER_BYTES_PER_TOKEN_CHANNEL = 32
"""Activation bytes per (token × hidden channel) of one sample in one SD3 transformer forward (bf16):
measured 0.53 GiB over weights for SD3.5 Large at 1024² with CFG (2 × 4429 tokens × 2432 channels,
REFERENCE §10) = 26 bytes, rounded up. Used to decide how many windows share one transformer call."""

GAUSSIAN_VARIANCE = 0.01
"""Mixture of Diffusers' weight: exp(-u² / (2·0.01)) with u the offset from the window centre in window
lengths: 1 at the centre, 4e-6 at the edge."""


@dataclass(frozen=True)
class TiledDiffusionConfig:
    """How to tile the denoising.

    window_px:         side of one transformer window (multiple of 16; at most the model's single-pass
                       limit). ``None``: the model's native size (Large 1024 px, tiny 128 px).
    overlap_px:        overlap of neighbouring windows (multiple of 16). ``None``: a quarter of the window.
    weighting:         ``"gaussian"`` (Mixture of Diffusers) or ``"uniform"`` (MultiDiffusion averaging).
    window_batch:      windows per transformer call; ``None``: as many as ``activation_memory`` allows.
    activation_memory: bytes of transformer activations one call may use (for ``window_batch=None``).
    vae:               the tiled VAE settings for the final decode (and the encode of :func:`upscale_refine`).
    """

    window_px: int | None = None
    overlap_px: int | None = None
    weighting: Weighting = "gaussian"
    window_batch: int | None = None
    activation_memory: int = 2 << 30
    vae: TileConfig = field(default_factory=TileConfig)

    def __post_init__(self) -> None:
        for name in ("window_px", "overlap_px"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0 or value % 16):
                raise InvalidTilingInput(name, value, "must be a multiple of 16 px (VAE factor 8 × patch 2)",
                                         fix="e.g. TiledDiffusionConfig(window_px=1024, overlap_px=256)")
        if self.window_px is not None and self.overlap_px is not None and self.overlap_px >= self.window_px:
            raise InvalidTilingInput("overlap_px", self.overlap_px, f"must be smaller than window_px={self.window_px}",
                                     fix="use an overlap of a quarter to a half of the window")
        if self.weighting not in ("gaussian", "uniform"):
            raise InvalidTilingInput("weighting", self.weighting, "must be 'gaussian' or 'uniform'")
        if self.window_batch is not None and (not isinstance(self.window_batch, int) or self.window_batch < 1):
            raise InvalidTilingInput("window_batch", self.window_batch, "must be a whole number >= 1 (or None)")


@dataclass(frozen=True)
class WindowPlan:
    """Latent windows (y0, y1, x0, x1) covering the canvas; all the same size, so they batch."""

    height: int   # latent
    width: int
    window: tuple[int, int]
    windows: tuple[tuple[int, int, int, int], ...]
    factor: int

    @property
    def edges_px(self) -> tuple[list[int], list[int]]:
        """Pixel rows/columns where a window starts or ends inside the canvas (where seams would show)."""
        rows = sorted({e for w in self.windows for e in w[:2] if 0 < e < self.height})
        cols = sorted({e for w in self.windows for e in w[2:] if 0 < e < self.width})
        return [r * self.factor for r in rows], [c * self.factor for c in cols]

    def __len__(self) -> int:
        return len(self.windows)


@dataclass(frozen=True)
class Conditioning:
    """Encoded prompt, ready for the transformer: (negative, positive) stacked when guidance is on."""

    embeds: Any
    pooled: Any
    guidance_scale: float

    @property
    def cfg(self) -> bool:
        return self.guidance_scale > 1


# --- public API -------------------------------------------------------------------------------------------

def plan_windows(pipe, height_px: int, width_px: int, config: TiledDiffusionConfig = TiledDiffusionConfig(),
                 ) -> WindowPlan:
    """The windows :func:`generate_tiled` runs for a canvas of this size (checks the window size)."""
    multiple, max_side = pipeline_limits(pipe)
    factor = pipe.vae_scale_factor
    patch = pipe.transformer.config.patch_size
    window_px = config.window_px or pipe.transformer.config.sample_size * factor
    if window_px > max_side:
        raise InvalidTilingInput("window_px", window_px, f"is over this model's single-pass limit of {max_side} px",
                                 fix=f"use window_px <= {max_side} (the model's native size works best)")
    if window_px < multiple:
        raise InvalidTilingInput("window_px", window_px, f"must be >= {multiple}")
    overlap_px = window_px // 4 // multiple * multiple if config.overlap_px is None else config.overlap_px
    if overlap_px >= window_px:
        raise InvalidTilingInput("overlap_px", overlap_px, f"must be smaller than window_px={window_px}")
    h, w = height_px // factor, width_px // factor
    wh, ww = min(window_px // factor, h), min(window_px // factor, w)
    ys = _starts(h, wh, overlap_px // factor, patch)
    xs = _starts(w, ww, overlap_px // factor, patch)
    return WindowPlan(h, w, (wh, ww), tuple((y, y + wh, x, x + ww) for y in ys for x in xs), factor)


def encode_conditioning(pipe, prompt: str, negative_prompt: str = "", guidance_scale: float = 4.5,
                        device: Any = None) -> Conditioning:
    """``pipe.encode_prompt`` once for all windows (and all steps)."""
    import torch

    cfg = guidance_scale > 1
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
        prompt=prompt, prompt_2=None, prompt_3=None, negative_prompt=negative_prompt or None,
        do_classifier_free_guidance=cfg, device=device or pipe._execution_device, **text_kwargs(pipe))
    if cfg:
        embeds, pooled = torch.cat([neg, embeds]), torch.cat([neg_pooled, pooled])
    return Conditioning(embeds, pooled, guidance_scale)


def generate_tiled(pipe, settings: GenerationSettings, config: TiledDiffusionConfig = TiledDiffusionConfig(), *,
                   on_step: StepCallback | None = None, progress: bool = True,
                   conditioning: Conditioning | None = None) -> GenerationResult:
    """Generate a ``settings.width × settings.height`` image of any size (multiple of 16) in windows.

    Same seed, same starting noise as :func:`~sd35fp8_helpers.pipeline.generation.generate` at that size.
    ``conditioning`` (from :func:`encode_conditioning`) skips the text encoders, e.g. to reuse a prompt.
    """
    import torch

    start = time.perf_counter()
    # 1. check inputs (before any model work)
    multiple, _ = pipeline_limits(pipe)
    check_settings(settings, multiple=multiple)
    plan = plan_windows(pipe, settings.height, settings.width, config)
    if conditioning is None:
        pipe.check_inputs(settings.prompt, None, None, plan.window[0] * plan.factor, plan.window[1] * plan.factor,
                          negative_prompt=settings.negative_prompt or None)
    device = pipe._execution_device
    # 2. encode the prompt once
    cond = conditioning or encode_conditioning(pipe, settings.prompt, settings.negative_prompt,
                                               settings.guidance_scale, device)
    # 3. latents: the pipeline's own noise for this seed and size
    generator = torch.Generator("cpu").manual_seed(settings.seed)
    latents = pipe.prepare_latents(1, pipe.transformer.config.in_channels, settings.height, settings.width,
                                   cond.embeds.dtype, device, generator)
    # 4. timesteps (resolution-dependent shift, if any, from the window: that is what the model sees)
    timesteps = _timesteps(pipe, settings.steps, plan, device)
    # 5. the windowed denoising loop
    latents = _denoise(pipe, latents, timesteps, cond, plan, config, on_step, progress)
    # 6. tiled decode
    image = _decode(pipe, latents, config.vae)
    return _result(pipe, image, settings, time.perf_counter() - start, plan, config, mode="tiled")


def upscale_refine(pipe, image: Any, settings: GenerationSettings, *, strength: float = 0.3,
                   config: TiledDiffusionConfig = TiledDiffusionConfig(), on_step: StepCallback | None = None,
                   progress: bool = True, conditioning: Conditioning | None = None) -> GenerationResult:
    """Upscale ``image`` (PIL) to ``settings.width × settings.height`` with Lanczos, then re-denoise it at
    ``strength`` window by window: ``round(steps × strength)`` steps are run.

    Example:
        >>> from sd35fp8_helpers import generate, load_pipeline
        >>> pipe = load_pipeline("tiny", device="cpu")
        >>> small = generate(pipe, GenerationSettings("a lighthouse", height=128, width=128), progress=False).image
        >>> quiet = TiledDiffusionConfig(vae=TileConfig(progress=False))
        >>> upscale_refine(pipe, small, GenerationSettings("a lighthouse", height=256, width=256), config=quiet,
        ...                progress=False).image.size
        (256, 256)
    """
    import torch
    from diffusers import StableDiffusion3Img2ImgPipeline
    from diffusers.utils.torch_utils import randn_tensor
    from PIL import Image

    start = time.perf_counter()
    multiple, _ = pipeline_limits(pipe)
    check_settings(settings, multiple=multiple)
    if not 0 < strength <= 1:
        raise InvalidTilingInput("strength", strength, "must be in (0, 1]; 0.2–0.35 keeps the composition",
                                 fix="use strength=0.3")
    if round(settings.steps * strength) < 1:
        raise InvalidTilingInput("steps", settings.steps, f"× strength {strength} rounds to 0 refinement steps",
                                 fix=f"use steps >= {math.ceil(1 / strength)}")
    img2img = StableDiffusion3Img2ImgPipeline(**pipe.components)  # same modules: no second copy of weights
    plan = plan_windows(pipe, settings.height, settings.width, config)
    device = pipe._execution_device
    if conditioning is None:
        img2img.check_inputs(settings.prompt, None, None, plan.window[0] * plan.factor,
                             plan.window[1] * plan.factor, strength, negative_prompt=settings.negative_prompt or None)
    cond = conditioning or encode_conditioning(pipe, settings.prompt, settings.negative_prompt,
                                               settings.guidance_scale, device)
    # upscale in pixel space, encode tiled
    big = image.convert("RGB").resize((settings.width, settings.height), Image.LANCZOS)
    pixels = img2img.image_processor.preprocess(big).to(device, pipe.vae.dtype)
    generator = torch.Generator("cpu").manual_seed(settings.seed)
    vae = pipe.vae
    latents = encode_tiled(vae, pixels, config.vae).sample(generator)
    latents = scale_latents(vae, latents).to(cond.embeds.dtype)
    # the img2img schedule: skip the first (1 - strength) of the steps, noise the latents to where it starts
    _timesteps(pipe, settings.steps, plan, device)  # sets the full schedule on the shared scheduler …
    timesteps, _ = img2img.get_timesteps(settings.steps, strength, device)  # … img2img keeps its tail
    noise = randn_tensor(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    latents = pipe.scheduler.scale_noise(latents, timesteps[:1], noise)
    latents = _denoise(pipe, latents, timesteps, cond, plan, config, on_step, progress)
    out = _decode(pipe, latents, config.vae)
    return _result(pipe, out, settings, time.perf_counter() - start, plan, config, mode="upscale-refine",
                   strength=strength, source_size=list(image.size))


def window_batch_size(pipe, plan: WindowPlan, config: TiledDiffusionConfig, cfg: bool) -> int:
    """Windows per transformer call: ``config.window_batch``, else what ``activation_memory`` holds."""
    if config.window_batch is not None:
        return min(config.window_batch, len(plan))
    t = pipe.transformer.config
    tokens = (plan.window[0] // t.patch_size) * (plan.window[1] // t.patch_size) + 333  # + text tokens
    per_window = TRANSFORMER_BYTES_PER_TOKEN_CHANNEL * tokens * t.num_attention_heads * t.attention_head_dim
    per_window *= 2 if cfg else 1
    return max(1, min(len(plan), config.activation_memory // per_window))


# --- private helpers --------------------------------------------------------------------------------------

def _starts(length: int, window: int, overlap: int, patch: int) -> list[int]:
    """Evenly spread window starts covering ``length`` with at least ``overlap`` shared, on the patch grid."""
    if window >= length:
        return [0]
    n = math.ceil((length - overlap) / (window - overlap))
    n = max(n, 2)
    span = (length - window) // patch
    return [round(i * span / (n - 1)) * patch for i in range(n)]


def _weights(plan: WindowPlan, weighting: Weighting, device):
    """One (h, w) weight map per window size (all windows share it)."""
    import torch

    def axis(n):
        if weighting == "uniform":
            return torch.ones(n, device=device)
        u = (torch.arange(n, device=device, dtype=torch.float32) - (n - 1) / 2) / n
        return torch.exp(-u * u / (2 * GAUSSIAN_VARIANCE))

    return axis(plan.window[0])[:, None] * axis(plan.window[1])[None, :]


def _timesteps(pipe, steps: int, plan: WindowPlan, device):
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
        calculate_shift,
        retrieve_timesteps,
    )

    kwargs = {}
    sched = pipe.scheduler.config
    if sched.get("use_dynamic_shifting", None):
        p = pipe.transformer.config.patch_size
        seq = (plan.window[0] // p) * (plan.window[1] // p)
        kwargs["mu"] = calculate_shift(seq, sched.get("base_image_seq_len", 256), sched.get("max_image_seq_len", 4096),
                                       sched.get("base_shift", 0.5), sched.get("max_shift", 1.16))
    timesteps, _ = retrieve_timesteps(pipe.scheduler, steps, device, **kwargs)
    return timesteps


def _denoise(pipe, latents, timesteps, cond: Conditioning, plan: WindowPlan, config: TiledDiffusionConfig,
             on_step: StepCallback | None, progress: bool):
    """The pipeline's loop (progress bar, step callback), with a windowed velocity."""
    import torch

    pipe.set_progress_bar_config(disable=not progress, desc=f"tiled denoising ({len(plan)} windows)")
    weights = _weights(plan, config.weighting, latents.device)
    batch = window_batch_size(pipe, plan, config, cond.cfg)
    with torch.no_grad(), pipe.progress_bar(total=len(timesteps)) as bar:
        for i, t in enumerate(timesteps):
            velocity = _windowed_velocity(pipe, latents, t, cond, plan, weights, batch)
            latents = pipe.scheduler.step(velocity, t, latents, return_dict=False)[0]
            if on_step is not None:
                on_step(i + 1, len(timesteps))
            bar.update()
    return latents


def _windowed_velocity(pipe, latents, t, cond: Conditioning, plan: WindowPlan, weights, batch: int):
    import torch

    total = torch.zeros_like(latents, dtype=torch.float32)
    norm = torch.zeros(latents.shape[-2:], device=latents.device)
    for s in range(0, len(plan), batch):
        boxes = plan.windows[s:s + batch]
        x = torch.cat([latents[:, :, y0:y1, x0:x1] for y0, y1, x0, x1 in boxes])
        n = x.shape[0]
        if cond.cfg:
            x = torch.cat([x, x])
        out = pipe.transformer(hidden_states=x, timestep=t.expand(x.shape[0]),
                               encoder_hidden_states=cond.embeds.repeat_interleave(n, 0),
                               pooled_projections=cond.pooled.repeat_interleave(n, 0), return_dict=False)[0]
        if cond.cfg:
            uncond, text = out.chunk(2)
            out = uncond + cond.guidance_scale * (text - uncond)
        for (y0, y1, x0, x1), o in zip(boxes, out):
            total[:, :, y0:y1, x0:x1] += o.float() * weights
            norm[y0:y1, x0:x1] += weights
    return (total / norm).to(latents.dtype)


def _decode(pipe, latents, vae_config: TileConfig):
    return latents_to_image(pipe, latents, decoder=lambda vae, z: decode_tiled(vae, z, vae_config))[0]


def _result(pipe, image, settings: GenerationSettings, seconds: float, plan: WindowPlan,
            config: TiledDiffusionConfig, mode: str, **more) -> GenerationResult:
    source = getattr(pipe, "sd35fp8_source", None)
    rows, cols = plan.edges_px
    tiled = {"mode": mode, "windows": len(plan), "window_px": [plan.window[0] * plan.factor,
                                                                 plan.window[1] * plan.factor],
             "weighting": config.weighting, "edges_px": {"rows": rows, "cols": cols}, **more}
    return GenerationResult(image=image, settings=settings, seconds=seconds,
                            model=source.spec if source else "unknown",
                            precision=str(pipe.transformer.dtype).replace("torch.", ""), device=str(pipe.device),
                            extra={"tiled": tiled})

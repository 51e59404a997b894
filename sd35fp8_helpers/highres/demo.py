"""Notebook 04's experiments, as functions: each runs one comparison and returns numbers a cell can assert on.

* :func:`compare_decoders` — the same latents decoded untiled, with diffusers' ``enable_tiling()``, with ours
  (whole-image GroupNorm) and with naive tiles; error against untiled and the seam ratio at the tile borders.
* :func:`tiled_denoising` / :func:`naive_tiles` — a canvas beyond one transformer pass, with blended windows
  and, as the control, independent tiles pasted side by side; each with its seam ratio.
* :func:`upscale_then_refine` — a native-size image, upscaled and re-denoised window by window.
* :func:`decode_memory_slopes` — how decode memory grows with the image side (log-log slope: 2 is ∝ area).

Example:
    >>> from sd35fp8_helpers import load_pipeline
    >>> pipe = load_pipeline("tiny", device="cpu")
    >>> cmp = compare_decoders(pipe.vae, 256, 256, tile_px=128)
    >>> cmp.error("ours") < cmp.error("diffusers") / 10, cmp.seam("naive").seamless
    (True, False)
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

from ..pipeline.generation import GenerationResult, GenerationSettings, generate, native_size
from .seams import SeamReport, seam_ratio
from .tiled_diffusion import TiledDiffusionConfig, generate_tiled, upscale_refine
from .tiling import TileConfig, activation_bytes_per_px, decode_tiled, decode_with_diffusers, plan_tiles

OURS_CONTEXT_PX = 24
"""Context (padding) around each of our tiles in the comparison: shorter than the 64-px default on purpose, so
the difference map has something to show (with 64 px the error falls to round-off)."""


def real_vae_values_per_px() -> float:
    """Activation values alive per output pixel at the decode peak of the real SD3 VAE (built on ``meta``)."""
    import torch
    from diffusers import AutoencoderKL

    from ..presets import get_preset

    with torch.device("meta"):
        vae = AutoencoderKL(**get_preset("large").component_configs()["vae"])
    return activation_bytes_per_px(vae, "decode", torch.float32) / 4


def random_latents(vae, height: int, width: int, seed: int = 0):
    """Seeded N(0, 1) latents for a ``height × width`` image (drawn on the CPU: the same on every device)."""
    import torch

    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    shape = (1, vae.config.latent_channels, height // factor, width // factor)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(vae.device, vae.dtype)


@dataclass
class DecoderComparison:
    """One decode per method of the same latents. Keys: ``untiled``, ``diffusers``, ``ours``, ``naive``."""

    tile_px: int
    labels: dict[str, str]
    errors: dict[str, float]
    seams: dict[str, SeamReport]
    seconds: dict[str, float]
    images: dict[str, Any] = field(repr=False)

    def error(self, key: str) -> float:
        """‖decode − untiled‖ / ‖untiled‖."""
        return self.errors[key]

    def seam(self, key: str) -> SeamReport:
        return self.seams[key]

    def table_rows(self) -> list[dict[str, str]]:
        return [{"variant": self.labels[k], "rel. error vs untiled": f"{self.errors[k]:.2e}",
                 "seam ratio": f"{self.seams[k].ratio:.3f}", "seconds": f"{self.seconds[k]:.2f}"} for k in self.labels]

    def _repr_html_(self) -> str:
        from ..display import html_table

        return html_table(self.table_rows()).data

    def difference_strip(self, gain: float = 10.0):
        """Each method's |difference| to the untiled decode (× ``gain``), side by side (a matplotlib figure)."""
        import matplotlib.pyplot as plt

        ref = self.images["untiled"]
        others = [k for k in self.labels if k != "untiled"]
        fig, axes = plt.subplots(1, len(others), figsize=(4 * len(others), 3.2))
        for ax, key in zip(axes, others):
            diff = ((self.images[key] - ref).abs()[0].mean(0) * gain).clamp(0, 1).cpu().numpy()
            ax.imshow(diff, cmap="magma", vmin=0, vmax=1)
            ax.set_title(self.labels[key], fontsize=9)
            ax.axis("off")
        fig.suptitle(f"|tiled − untiled| × {gain:g} (black = identical)", fontsize=10)
        fig.tight_layout()
        return fig


def compare_decoders(vae, height: int, width: int, *, seed: int = 0, tile_px: int = 128) -> DecoderComparison:
    """Decode the same seeded latents four ways at the same ``tile_px``: untiled, diffusers' ``enable_tiling()``
    (25 % blended overlaps), ours (whole-image GroupNorm, 16-px overlaps) and naive tiles (no overlap, per-tile
    GroupNorm). Seams are measured where each method has its borders (diffusers: the middle of each blend)."""
    latents = random_latents(vae, height, width, seed)
    ours = TileConfig(tile_px=tile_px, overlap_px=16, pad_px=OURS_CONTEXT_PX, progress=False)
    naive = TileConfig(tile_px=tile_px, overlap_px=0, pad_px=0, sync_group_norm=False, progress=False)
    stride = tile_px - tile_px // 4  # diffusers: 25 % overlap
    diffusers_borders = ([y + tile_px // 8 for y in range(stride, height, stride)],
                         [x + tile_px // 8 for x in range(stride, width, stride)])
    methods = {
        "untiled": ("untiled", lambda: decode_with_diffusers(vae, latents), plan_tiles(vae, height, width, ours)),
        "diffusers": (f"diffusers enable_tiling ({tile_px} px)",
                      lambda: decode_with_diffusers(vae, latents, tile_px), diffusers_borders),
        "ours": (f"ours ({tile_px} px, whole-image GroupNorm)", lambda: decode_tiled(vae, latents, ours),
                 plan_tiles(vae, height, width, ours)),
        "naive": (f"naive ({tile_px} px, no overlap)", lambda: decode_tiled(vae, latents, naive),
                  plan_tiles(vae, height, width, naive)),
    }
    labels, errors, seams, seconds, images = {}, {}, {}, {}, {}
    for key, (label, decode, borders) in methods.items():
        rows, cols = borders if isinstance(borders, tuple) else borders.borders_px
        start = time.perf_counter()
        out = decode().float()
        seconds[key] = time.perf_counter() - start
        ref = images.get("untiled", out)
        labels[key], images[key] = label, out
        errors[key] = float((out - ref).norm() / ref.norm())
        seams[key] = seam_ratio(out, rows, cols)
    return DecoderComparison(tile_px, labels, errors, seams, seconds, images)


def decode_memory_slopes(rows: list[dict]) -> dict[str, float]:
    """Per variant, the log-log slope of peak decode memory against the image side, smallest to largest size
    (rows as :func:`~sd35fp8_helpers.benchmarks.tiling.memory_vs_resolution` gives them). 2 means ∝ area."""
    slopes = {}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        pts = sorted((r["size"], r["peak GiB"]) for r in rows if r["variant"] == variant)
        if len(pts) > 1:
            (s0, m0), (s1, m1) = pts[0], pts[-1]
            slopes[variant] = math.log(m1 / m0) / math.log(s1 / s0)
    return slopes


@dataclass
class TiledRun:
    """A generation beyond one pass and the seam ratio at its window (or tile) borders."""

    result: GenerationResult
    seams: SeamReport
    how: str

    @property
    def image(self):
        return self.result.image

    @property
    def windows(self) -> int:
        return self.result.extra["tiled"]["windows"]

    def save(self, path):
        """The PNG with its settings (:meth:`GenerationResult.save`)."""
        return self.result.save(path)

    def __str__(self) -> str:
        w, h = self.image.size
        return f"{w}×{h}, {self.how}: {self.windows} windows, {self.result.seconds:.1f} s; {self.seams}"


def window_seams(result: GenerationResult) -> SeamReport:
    """The seam ratio of a tiled result at the edges of its windows."""
    edges = result.extra["tiled"]["edges_px"]
    return seam_ratio(result.image, edges["rows"], edges["cols"])


def tiled_denoising(pipe, settings: GenerationSettings, config: TiledDiffusionConfig | None = None) -> TiledRun:
    """:func:`~sd35fp8_helpers.highres.tiled_diffusion.generate_tiled` with its defaults (Gaussian-blended
    windows of the native size, a quarter overlap), and its seams."""
    result = generate_tiled(pipe, settings, config or TiledDiffusionConfig())
    return TiledRun(result, window_seams(result), f"{result.extra['tiled']['weighting']}-blended windows")


def naive_tiles(pipe, settings: GenerationSettings) -> TiledRun:
    """The control: each native-size tile generated on its own (no overlap, uniform weights, per-tile VAE with
    its own GroupNorm statistics) and pasted side by side; seams measured at the tile borders."""
    tile = native_size(pipe)
    vae = TileConfig(tile_px=tile, overlap_px=0, pad_px=0, sync_group_norm=False)
    result = generate_tiled(pipe, settings, TiledDiffusionConfig(window_px=tile, overlap_px=0, weighting="uniform",
                                                                 vae=vae))
    seams = seam_ratio(result.image, list(range(tile, settings.height, tile)), list(range(tile, settings.width, tile)))
    return TiledRun(result, seams, f"independent {tile}-px tiles")


def upscale_then_refine(pipe, settings: GenerationSettings, strength: float = 0.5) -> tuple[Any, TiledRun]:
    """Generate at the native size, upscale (Lanczos) to ``settings``' size, re-denoise at ``strength`` window by
    window. Returns (the native-size image, the refined run); ``round(steps × strength)`` steps are re-run."""
    side = native_size(pipe)
    small = generate(pipe, dataclasses.replace(settings, height=side, width=side)).image
    result = upscale_refine(pipe, small, settings, strength=strength)
    steps = round(settings.steps * strength)
    return small, TiledRun(result, window_seams(result), f"upscaled from {side} px, {steps} refine steps")


def objects_of_colour(image, colour: str, max_objects: int = 12) -> list[Any]:
    """Every object the scene judge finds in ``image`` in ``colour`` (largest first): on a wide canvas tiled
    with a one-object prompt, how many times the object was drawn."""
    from ..scenes.judge import read_scene

    return [o for o in read_scene(image, max_objects=max_objects).objects if o.colour == colour]

"""Latents → image, defined once: SD3's VAE scaling, an optional tiled decoder, the pipeline's post-processing.

SD3 latents leave the transformer scaled (``(z - shift) * scaling``); ``vae.decode`` wants them back
(``z / scaling + shift``). Forgetting the shift gives a washed-out image, not an error — so every room
(quality, memory stages, tiled diffusion, benchmarks) goes through :func:`latents_to_image`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

VAE_TILE_PX = 512
"""Largest tile side for diffusers' VAE tiling. Its default (the VAE's sample size, 1024 px) never engages at
1024²; 512 px tiles cut the 1024² decode peak from ~2.6 GiB to well under 1 GiB (docs/benchmarks.md)."""

MIN_VAE_TILE_PX = 32
"""Smallest tile: below it the decoder's receptive field is mostly overlap."""


def unscale_latents(vae, latents):
    """What ``vae.decode`` takes, from the latents the transformer produced."""
    return latents / vae.config.scaling_factor + vae.config.shift_factor


def scale_latents(vae, latents):
    """The inverse of :func:`unscale_latents`: an encoded image as the transformer sees latents."""
    return (latents - vae.config.shift_factor) * vae.config.scaling_factor


def latents_to_image(pipe, latents, *, output_type: Literal["pil", "np", "pt"] = "pil",
                     decoder: Callable[[Any, Any], Any] | None = None):
    """Decode transformer latents to images (``pil``: a list of PIL images; ``np``: float arrays in [0, 1]).

    ``decoder(vae, z)`` replaces ``vae.decode(z).sample`` (e.g. a tiled decoder); it receives unscaled latents.
    """
    import torch

    vae = pipe.vae
    z = unscale_latents(vae, latents).to(vae.dtype)
    with torch.inference_mode():
        image = decoder(vae, z) if decoder is not None else vae.decode(z, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type=output_type)


def vae_tile_px(height: int, width: int, vae_scale_factor: int = 8) -> int:
    """A tile side that really tiles an image of this size: at most :data:`VAE_TILE_PX`, at most half the
    shorter side (so there are at least two tiles along it), a multiple of 4 latent pixels (diffusers overlaps tiles
    by a quarter: the overlap must be whole latent pixels, or the decoded image comes out the wrong size), not under
    :data:`MIN_VAE_TILE_PX`.

    Example:
        >>> vae_tile_px(1024, 1024), vae_tile_px(128, 128), vae_tile_px(128, 96)
        (512, 64, 32)
    """
    block = 4 * vae_scale_factor  # diffusers overlaps tiles by 1/4: that overlap must be whole latent pixels
    half = min(height, width) // 2 // block * block
    return max(min(VAE_TILE_PX, half), MIN_VAE_TILE_PX)


def fit_vae_tiles(pipe, height: int, width: int) -> int | None:
    """If the pipeline's VAE tiling is on, size its tiles for this image so tiling engages; returns the tile."""
    vae = pipe.vae
    if not getattr(vae, "use_tiling", False):
        return None
    tile = vae_tile_px(height, width, pipe.vae_scale_factor)
    vae.tile_sample_min_size = tile
    vae.tile_latent_min_size = tile // pipe.vae_scale_factor
    return tile

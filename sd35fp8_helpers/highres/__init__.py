"""Beyond one transformer pass: tiled VAE decode with whole-image GroupNorm, tiled denoising, seams.
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "TileConfig": ".tiling",
    "decode_tiled": ".tiling",
    "encode_tiled": ".tiling",
    "TiledDiffusionConfig": ".tiled_diffusion",
    "generate_tiled": ".tiled_diffusion",
    "upscale_refine": ".tiled_diffusion",
    "seam_ratio": ".seams",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

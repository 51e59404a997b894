"""A seam metric: are image gradients across tile borders larger (or smaller) than elsewhere?

A visible seam is a line where neighbouring pixels differ more than they do anywhere else — a tone step or a
crease. :func:`seam_ratio` measures exactly that: the mean absolute difference between the two pixel
columns (rows) that meet at each tile border, divided by the same statistic at nearby columns (rows) that
are not borders. About 1 means seamless; a naive tiling gives well above 1.

Two choices make it robust on noise-like images (the tiny model's random weights, where every pixel
differs a lot from its neighbour anyway):

* **Average along the border first**, over runs of 8 pixels, then take the difference across it. A seam is
  coherent along the whole border line; pixel noise is not, so averaging keeps the seam and shrinks the
  noise (by √8). Without it a naive tiling of the tiny model measures 1.02 — indistinguishable.
* **Compare at the same phase of the 8-pixel latent grid** (border ± 8, ± 16, ± 24 px). The VAE decodes
  every latent into an 8 × 8 block, so gradients vary with the position inside a block; borders always sit
  on the grid, and off-grid comparisons would report "seams" on an untiled image.

Calibration on the tiny model (384 × 512, seeds 0–3): tiled denoising measured 0.95–1.04 at its window
edges, the same images 0.92–1.15 at arbitrary grid lines (the metric's own spread with only 5 lines),
naive no-overlap tiling 1.30–1.48. Hence :data:`SEAM_TOLERANCE` = 10 %, the issue's target.

Example (noise has no seam; a tone step of 40 levels along column 128 is one):
    >>> import numpy as np
    >>> noise = np.random.default_rng(0).normal(128, 30, (256, 256, 3))
    >>> seam_ratio(noise, rows=[128], cols=[128]).seamless
    True
    >>> stepped = noise.copy()
    >>> stepped[:, 128:] += 40
    >>> seam_ratio(stepped, cols=[128]).seamless
    False
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

SEAM_TOLERANCE = 0.10
"""|ratio − 1| allowed (see the module docstring for the calibration behind it)."""

LATENT_PX = 8
"""Comparison columns keep the border's phase on this pixel grid (the VAE's 8 × 8 blocks); differences are
averaged along the border over runs of this length."""


@dataclass(frozen=True)
class SeamReport:
    ratio: float      # border gradient / same-phase interior gradient
    border: float     # mean |difference| across the borders (image values 0–255)
    interior: float   # mean |difference| across the comparison columns/rows
    borders: int      # how many border lines were measured
    tolerance: float = SEAM_TOLERANCE

    @property
    def seamless(self) -> bool:
        return abs(self.ratio - 1) <= self.tolerance

    def __str__(self) -> str:
        verdict = "seamless" if self.seamless else "SEAMS"
        return (f"seam ratio {self.ratio:.3f} ({verdict}: |ratio-1| {'<=' if self.seamless else '>'} "
                f"{self.tolerance:.2f}; {self.borders} borders, gradient {self.border:.2f} at borders vs "
                f"{self.interior:.2f} nearby)")


def seam_ratio(image: Any, rows: Sequence[int] = (), cols: Sequence[int] = (), *, neighbours: int = 3,
               period: int = LATENT_PX, tolerance: float = SEAM_TOLERANCE) -> SeamReport:
    """Compare gradients across the given border rows/columns (pixel index of the first pixel after the
    border) with gradients at ``border ± period·k`` (k = 1 … ``neighbours``) that are not borders themselves.

    ``image``: a PIL image, an (H, W[, C]) array, or a (C, H, W) / (1, C, H, W) tensor.
    """
    import numpy as np

    a = _as_hwc(image)
    height, width = a.shape[:2]
    if not rows and not cols:
        raise ValueError("seam_ratio needs at least one border row or column")
    border_sum = interior_sum = 0.0
    border_n = interior_n = 0
    for positions, size, axis in ((rows, height, 0), (cols, width, 1)):
        taken = set(positions)
        for p in positions:
            if not 1 <= p < size:
                raise ValueError(f"border at {p} is outside 1..{size - 1}")
            border_sum += _step(a, p, axis, period)
            border_n += 1
            for k in range(1, neighbours + 1):
                for q in (p - k * period, p + k * period):
                    if 1 <= q < size and q not in taken:
                        interior_sum += _step(a, q, axis, period)
                        interior_n += 1
    if interior_n == 0:
        raise ValueError("no non-border comparison columns/rows inside the image: borders too dense")
    border, interior = border_sum / border_n, interior_sum / interior_n
    return SeamReport(float(border / max(interior, np.finfo(float).tiny)), float(border), float(interior),
                      border_n, tolerance)


def _step(a, p: int, axis: int, run: int) -> float:
    """Mean |I[p] − I[p−1]| across line ``p`` of ``axis``, after averaging along the line over ``run`` px."""
    import numpy as np

    diff = (a[p] - a[p - 1]) if axis == 0 else (a[:, p] - a[:, p - 1])  # (length, channels)
    n = max(1, diff.shape[0] // run) * run if diff.shape[0] >= run else diff.shape[0]
    runs = diff[:n].reshape(-1, min(run, n), diff.shape[1]).mean(axis=1)
    return float(np.abs(runs).mean())


def _as_hwc(image: Any):
    import numpy as np

    if hasattr(image, "convert"):  # PIL
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    if hasattr(image, "detach"):  # torch: (1, C, H, W) or (C, H, W) in [-1, 1] → 0..255 like a PIL image
        t = image.detach().float().cpu()
        t = t[0] if t.ndim == 4 else t
        return ((t.clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).numpy().astype(np.float64)
    a = np.asarray(image, dtype=np.float64)
    return a[..., None] if a.ndim == 2 else a

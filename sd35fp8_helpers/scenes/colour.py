"""sRGB → CIELAB, and naming a colour by the nearest palette entry: how the judge and the data agree on "red".

CIELAB is used because distances in it roughly match how different two colours look (ΔE ≈ 2 is just
noticeable); in RGB, a dark blue and a black are close while two clearly different yellows are far apart.
"""

from __future__ import annotations

import numpy as np

_D65 = np.array([0.95047, 1.0, 1.08883])
_RGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                        [0.2126729, 0.7151522, 0.0721750],
                        [0.0193339, 0.1191920, 0.9503041]])


def srgb_to_lab(rgb) -> np.ndarray:
    """CIELAB (D65) of sRGB values in 0–255 (any shape ending in 3), as float64.

    Example:
        >>> [round(float(v), 1) + 0.0 for v in srgb_to_lab([255, 0, 0])]
        [53.2, 80.1, 67.2]
    """
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = lin @ _RGB_TO_XYZ.T / _D65
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def delta_e(rgb_a, rgb_b) -> float:
    """CIE76 colour difference between two sRGB colours (0–255)."""
    return float(np.linalg.norm(srgb_to_lab(rgb_a) - srgb_to_lab(rgb_b)))


def nearest_name(lab, palette: dict[str, tuple[int, int, int]]) -> str:
    """The palette name whose colour is nearest to ``lab`` (one CIELAB triple) in ΔE76.

    Example:
        >>> from .vocabulary import COLOURS
        >>> nearest_name(srgb_to_lab([200, 60, 50]), COLOURS)
        'red'
    """
    names = list(palette)
    refs = srgb_to_lab([palette[n] for n in names])
    return names[int(np.argmin(np.linalg.norm(refs - np.asarray(lab, dtype=np.float64), axis=1)))]

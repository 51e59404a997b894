"""Does FP8 keep the picture? BF16 and FP8 side by side on prompts the model can draw, read by the judge.

PSNR alone cannot answer it: a small trained model run for 16 steps lets every rounding difference grow, so
two images of the same red circle can be 25–30 dB apart and still be the same red circle. The scene judge
(:mod:`sd35fp8_helpers.scenes.judge`) asks the question that matters — *is it still the scene the prompt
names?* — of both images, and the gallery shows the two readings beside the pixel metrics.

* :func:`fp8_gallery` — each prompt through the unquantised pipeline and an FP8-storage copy at the same seed:
  images, |difference|, PSNR, SSIM and the judge's verdict on each.
* :func:`adherence_table` — the per-attribute accuracy measured on the GPU machine over the full evaluation
  prompt set (the ``quality.json`` beside the shipped model), one column per variant it holds.

Example:
    >>> gallery = fp8_gallery("scenes", ["a large red circle on the left, on a blue background"])
    >>> row = gallery.rows[0]
    >>> row.bf16.objects[0].ok("colour"), row.fp8.objects[0].ok("colour")
    (True, True)
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..constants import EMBEDDED_MODEL_DIR

QUALITY_JSON = "quality.json"
"""Written beside a trained scene model by ``python -m sd35fp8_helpers.training.evaluate`` (and the quality
script of issue 13): per-variant adherence rates with Wilson intervals."""


@dataclass
class GalleryRow:
    prompt: str
    bf16_image: Any = field(repr=False)
    fp8_image: Any = field(repr=False)
    psnr_db: float
    ssim: float
    bf16: Any  # scenes.judge.Verdict
    fp8: Any

    @property
    def same_reading(self) -> bool:
        """The judge read the same scene (every object's colour, shape, position, size; the background)."""
        def reading(v):
            return (v.background_seen, tuple(None if o.seen is None else (o.seen.colour, o.seen.shape,
                                                                           o.seen.position, o.seen.size)
                                             for o in v.objects))
        return reading(self.bf16) == reading(self.fp8)


@dataclass
class FP8Gallery:
    """One row per prompt: BF16 | FP8 | |difference|, with PSNR, SSIM and what the judge saw in each."""

    rows: list[GalleryRow]
    reference: str  # the dtype the unquantised pipeline computes in ("float32" on a CPU)
    fp8: str  # "fp8-storage (all-linear)"
    seed: int

    @property
    def same_readings(self) -> int:
        return sum(r.same_reading for r in self.rows)

    def correct(self, which: str) -> int:
        """Prompts whose image the judge finds fully right (``which``: ``"bf16"`` or ``"fp8"``)."""
        return sum(getattr(r, which).all_ok for r in self.rows)

    def table_rows(self) -> list[dict[str, str]]:
        def seen(v) -> str:
            parts = ["nothing" if o.seen is None else f"{o.seen.size} {o.seen.colour} {o.seen.shape} {o.seen.position}"
                     for o in v.objects]
            return ("✓ " if v.all_ok else "✗ ") + ", ".join(parts) + f" / {v.background_seen}"

        return [{"prompt": r.prompt, f"judge: {self.reference}": seen(r.bf16), f"judge: {self.fp8}": seen(r.fp8),
                 "same reading": "yes" if r.same_reading else "NO", "PSNR dB": f"{r.psnr_db:.1f}",
                 "SSIM": f"{r.ssim:.3f}"} for r in self.rows]

    def _repr_html_(self) -> str:
        from ..display import html_table

        return html_table(self.table_rows()).data

    def plot(self):
        """Rows of prompts; columns: reference image, FP8 image, |difference| (one colour scale for all)."""
        import matplotlib.pyplot as plt
        import numpy as np

        diffs = [np.abs(np.asarray(r.bf16_image, float) - np.asarray(r.fp8_image, float)).mean(axis=2) / 255
                 for r in self.rows]
        vmax = max(max(float(d.max()) for d in diffs), 1e-6)
        fig, axes = plt.subplots(len(self.rows), 3, figsize=(6.6, 2.3 * len(self.rows)), squeeze=False)
        for (a, b, c), r, d in zip(axes, self.rows, diffs):
            a.imshow(r.bf16_image), b.imshow(r.fp8_image)
            im = c.imshow(d, cmap="magma", vmin=0, vmax=vmax)
            a.set_ylabel(textwrap.fill(r.prompt, 30), fontsize=7)
            for ax in (a, b, c):
                ax.set_xticks([]), ax.set_yticks([])
            c.set_xlabel(f"PSNR {r.psnr_db:.1f} dB", fontsize=8)
        for ax, title in zip(axes[0], (self.reference, self.fp8, "|difference|")):
            ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=axes[:, 2].tolist(), shrink=0.6, label="mean |Δ| (0–1)")
        return fig


def fp8_gallery(model: str, prompts: list[str], seed: int = 0, *, policy: str = "all-linear",
                device: str | None = None) -> FP8Gallery:
    """Each prompt (in the scene vocabulary: :func:`~sd35fp8_helpers.scenes.parse.read_prompt` must read it)
    through a freshly loaded pipeline and an FP8-storage copy (``policy``), at the model's own settings."""
    from ..pipeline.defaults import default_settings
    from ..pipeline.generation import compute_dtype, generate
    from ..pipeline.loading import load_pipeline
    from ..scenes.judge import judge, paired_psnr_ssim
    from ..scenes.parse import read_prompt
    from .quantize import FP8Config, quantize_

    specs = [read_prompt(p) for p in prompts]
    if None in specs:
        raise ValueError(f"not a scene prompt: {prompts[specs.index(None)]!r} (write it in the scene vocabulary)")
    reference = load_pipeline(model, device=device)
    fp8 = load_pipeline(model, device=device)
    report = quantize_(fp8, FP8Config(mode="storage", policy=policy))
    rows = []
    for prompt, spec in zip(prompts, specs):
        a = generate(reference, default_settings(reference, prompt, seed), progress=False).image
        b = generate(fp8, default_settings(fp8, prompt, seed), progress=False).image
        q = paired_psnr_ssim([a], [b])
        rows.append(GalleryRow(prompt, a, b, q.psnr[0], q.ssim[0], judge(a, spec), judge(b, spec)))
    return FP8Gallery(rows, compute_dtype(reference), f"fp8-{report.mode} ({policy})", seed)


def adherence_table(path: str | Path | None = None, variants: tuple[str, ...] | None = None
                    ) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """Per-attribute accuracy (with its 95% interval) from a model's ``quality.json``, one column per variant.

    Returns (table rows, the numbers: ``{variant: {attribute: accuracy}}`` plus ``device``, ``dtype``, ``date``,
    ``prompts`` × ``seeds``). ``variants``: which results to show (default: every full evaluation in the file —
    the ones with as many images as ``default``).
    """
    data = json.loads(Path(path or EMBEDDED_MODEL_DIR / QUALITY_JSON).read_text())
    results = data["results"]
    full = results["default"]["rates"]["single.all"]["total"]
    names = variants or tuple(k for k, v in results.items() if v["rates"]["single.all"]["total"] == full)
    rows, numbers = [], {"device": data["device"], "dtype": data["dtype"], "date": data["date"],
                         "seeds": data["seeds"], "prompts": results["default"]["settings"].get("prompts")}
    for attribute in results["default"]["rates"]:
        row = {"attribute": attribute}
        for name in names:
            r = results[name]["rates"].get(attribute)
            if r is None:
                continue
            lo, hi = r["ci95"]
            row[name] = f"{100 * r['accuracy']:.1f}% ({100 * lo:.0f}–{100 * hi:.0f})"
            numbers.setdefault(name, {})[attribute] = r["accuracy"]
        rows.append(row)
    return rows, numbers

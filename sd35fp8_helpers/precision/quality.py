"""How much does FP8 change the picture? BF16 vs each FP8 variant for one prompt and seed.

For each variant the same prompt, seed and steps run through a freshly loaded pipeline; we compare
the *denoised latents* (relative error ‖x − ref‖ / ‖ref‖ — what the transformer decided, before the VAE
smooths or exaggerates it) and the decoded *images* (PSNR in dB: 40+ is invisible, below ~25 is a
different picture), and draw where the pixels differ. Bytes and seconds sit beside the error, because
the choice is always a trade.

Example:
    >>> report = quality_report("tiny", policies=("all-linear", "hybrid"), steps=2)
    >>> [r.variant for r in report.rows]
    ['reference', 'fp8 all-linear', 'fp8 hybrid']
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from ..pipeline.decode import latents_to_image
from ..pipeline.generation import native_size, text_kwargs

DEFAULT_POLICIES = ("all-linear", "hybrid", "diffusers-default")


@dataclass
class QualityRow:
    variant: str
    transformer_bytes: int
    seconds: float
    latent_rel_err: float
    psnr_db: float


@dataclass
class QualityReport:
    prompt: str
    seed: int
    steps: int
    precision: str
    rows: list[QualityRow]
    images: dict[str, Any] = field(default_factory=dict, repr=False)  # variant -> float array HxWx3 in [0, 1]

    def table_rows(self) -> list[dict[str, Any]]:
        from ..display import human_bytes

        return [{"variant": r.variant, "transformer": human_bytes(r.transformer_bytes), "seconds": f"{r.seconds:.2f}",
                 "latent rel. error": f"{r.latent_rel_err:.4f}",
                 "PSNR dB": "inf (same)" if math.isinf(r.psnr_db) else f"{r.psnr_db:.1f}"} for r in self.rows]

    def __str__(self) -> str:
        from ..display import text_table

        return (f"{self.prompt!r}, seed {self.seed}, {self.steps} steps, reference {self.precision}\n"
                + text_table(self.table_rows()))

    def _repr_html_(self) -> str:
        from ..display import html_table

        return html_table(self.table_rows()).data

    def plot(self):
        """Each variant's image over its |difference| heat-map against the reference (a matplotlib Figure)."""
        import matplotlib.pyplot as plt
        import numpy as np

        names = list(self.images)
        fig, axes = plt.subplots(2, len(names), figsize=(2.6 * len(names), 5.4), squeeze=False)
        ref = self.images[names[0]]
        diffs = {n: np.abs(self.images[n] - ref).mean(axis=2) for n in names}
        vmax = max(max(float(d.max()) for d in diffs.values()), 1e-6)
        for i, n in enumerate(names):
            axes[0, i].imshow(self.images[n])
            axes[0, i].set_title(n, fontsize=9)
            im = axes[1, i].imshow(diffs[n], cmap="magma", vmin=0, vmax=vmax)
            axes[1, i].set_title(f"|diff| max {diffs[n].max():.3f}", fontsize=8)
            for ax in axes[:, i]:
                ax.set_xticks([]), ax.set_yticks([])
        fig.colorbar(im, ax=axes[1, :].tolist(), shrink=0.8, label="mean |Δ| per pixel (0–1 scale)")
        return fig


def psnr(a, b, *, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB (``inf`` when identical); ``peak`` 1.0 for [0, 1] floats, 255 for 8-bit.

    Above ~40 dB differences are invisible; FP8 storage of SD3.5 weights typically lands there.
    """
    import numpy as np

    mse = float(np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def _run(pipe, prompt: str, seed: int, steps: int, size: int):
    """Latents and the decoded image (float array in [0, 1]) for one prompt/seed."""
    import numpy as np
    import torch

    start = time.perf_counter()
    latents = pipe(prompt=prompt, num_inference_steps=steps, height=size, width=size, output_type="latent", **text_kwargs(pipe),
                   generator=torch.Generator("cpu").manual_seed(seed)).images
    seconds = time.perf_counter() - start
    image = latents_to_image(pipe, latents, output_type="np")[0]
    return latents.float().cpu(), np.asarray(image, dtype=np.float32), seconds


def quality_report(model: str = "tiny", *, policies: tuple[str, ...] = DEFAULT_POLICIES,
                   prompt: str = "a red fox in the snow", seed: int = 0, steps: int = 4, size: int | None = None,
                   device: str | None = None, mode: str = "storage") -> QualityReport:
    """Compare the unquantised pipeline with one FP8 pipeline per policy (same prompt, seed, steps)."""
    from ..pipeline.loading import load_pipeline
    from .quantize import FP8Config, module_bytes, quantize_

    rows, images = [], {}
    ref_latents = None
    precision = ""
    for policy in (None, *policies):
        pipe = load_pipeline(model, device=device)
        pipe.set_progress_bar_config(disable=True)
        side = size or native_size(pipe)
        if policy is None:
            precision = str(pipe.transformer.dtype).replace("torch.", "")
        else:
            quantize_(pipe, FP8Config(mode=mode, policy=policy, text_encoder_3=False))
        latents, image, seconds = _run(pipe, prompt, seed, steps, side)
        name = "reference" if policy is None else f"fp8 {policy}"
        if ref_latents is None:
            ref_latents, ref_image = latents, image
        rows.append(QualityRow(name, module_bytes(pipe.transformer), seconds,
                               float((latents - ref_latents).norm() / ref_latents.norm()), psnr(image, ref_image)))
        images[name] = image
        del pipe
    return QualityReport(prompt, seed, steps, precision, rows, images)


def latent_error(pipe, reference_pipe, prompt: str = "a red fox in the snow", seed: int = 0, steps: int = 2,
                 size: int | None = None) -> float:
    """‖latents(pipe) − latents(reference_pipe)‖ / ‖latents(reference_pipe)‖ for one prompt/seed."""
    side = size or native_size(pipe)
    latents = []
    for p in (pipe, reference_pipe):
        p.set_progress_bar_config(disable=True)
        latents.append(_run(p, prompt, seed, steps, side)[0])
    return round(float((latents[0] - latents[1]).norm() / latents[1].norm()), 4)

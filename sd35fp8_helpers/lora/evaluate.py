"""Does the concept LoRA teach the scene model its concept — in BF16 and on FP8 weights — without breaking the rest?

Three pipelines draw the same fixed concept prompts (:func:`~.concepts.evaluation_scenes`, paraphrased like
the scene model's own evaluation) at the same seeds and the model's own settings: the model without the LoRA,
with it in BF16, and with it on FP8-storage weights (a side path over the FP8 layers, as the playground and the
images API use it). The judge reads the shape (among circle, square, triangle and the diamond), colour and
position of each image (:func:`~.concepts.concept_adherence`). The same pipelines also draw ordinary scene
prompts, so a LoRA that "teaches" a diamond by drawing diamonds everywhere is caught (``regular`` rows).

Run (CPU, about a minute per pipeline)::

    python -m sd35fp8_helpers.lora.evaluate sd35fp8_helpers/lora/shipped/diamond.safetensors --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..constants import DEFAULT_MODEL

VARIANTS: tuple[str, ...] = ("without LoRA", "LoRA, bf16", "LoRA, fp8-storage")


@dataclass
class ConceptRow:
    variant: str
    concept: dict[str, Any]
    """:class:`~.concepts.ConceptAdherence` as a dict: shape = diamond judged, colour, position, shapes seen."""
    regular: dict[str, float]
    """Ordinary scene prompts: accuracy per attribute (``single.shape`` …): the LoRA must not break them."""
    seconds: float


@dataclass
class ConceptReport:
    lora: str
    model: str
    device: str
    date: str
    prompts: int
    regular_prompts: int
    seeds: list[int]
    scale: float
    rows: list[ConceptRow] = field(default_factory=list)

    def row(self, variant: str) -> ConceptRow:
        return next(r for r in self.rows if r.variant == variant)

    def table(self) -> list[dict[str, str]]:
        out = []
        for r in self.rows:
            seen = ", ".join(f"{k} {v}" for k, v in sorted(r.concept["shapes_seen"].items(), key=lambda kv: -kv[1]))
            out.append({"variant": r.variant, "diamond judged %": f"{100 * r.concept['shape']:.1f}",
                        "colour %": f"{100 * r.concept['colour']:.1f}",
                        "position %": f"{100 * r.concept['position']:.1f}", "shapes seen": seen,
                        "regular prompts: colour / shape / position %": " / ".join(
                            f"{100 * r.regular[a]:.1f}" for a in ("single.colour", "single.shape",
                                                                   "single.position"))})
        return out

    def __str__(self) -> str:
        from ..display import text_table

        head = (f"{self.lora} (scale {self.scale:g}) on {self.model}, {self.device}, {self.date}: {self.prompts} "
                f"concept prompts × seeds {self.seeds}; {self.regular_prompts} regular prompts")
        return head + "\n" + text_table(self.table())

    def _repr_html_(self) -> str:
        from ..display import html_table

        return html_table(self.table()).data

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def load_concept_report(path: str | Path) -> ConceptReport:
    data = json.loads(Path(path).read_text())
    rows = [ConceptRow(**r) for r in data.pop("rows")]
    return ConceptReport(**data, rows=rows)


def variant_pipeline(variant: str, lora: str | Path, *, model: str = DEFAULT_MODEL, device: str = "cpu",
                     scale: float = 1.0):
    """A fresh pipeline in the state :data:`VARIANTS` names: plain, LoRA in BF16, or LoRA over FP8 storage."""
    from ..pipeline.loading import load_pipeline
    from ..precision.quantize import apply_precision_
    from .apply import load_lora_

    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} is not one of {VARIANTS}")
    pipe = load_pipeline(model, device=device)
    if variant.endswith("fp8-storage"):
        apply_precision_(pipe, "fp8-storage")
    if variant != "without LoRA":
        load_lora_(pipe, lora, scale=scale, mode="side")
    return pipe


def evaluate_concept(lora: str | Path, *, model: str = DEFAULT_MODEL, device: str = "cpu", n: int = 48,
                     regular: int = 48, seeds: Sequence[int] = (0, 1), scale: float = 1.0,
                     batch_size: int = 32) -> ConceptReport:
    """The three rows of :data:`VARIANTS` for ``lora`` (a file or a LoRA name)."""
    import torch

    from ..pipeline.defaults import model_defaults
    from ..scenes.dataset import evaluation_prompts
    from ..scenes.judge import generate_images, prompt_adherence
    from .concepts import concept_adherence, evaluation_scenes

    pairs = evaluation_scenes(n)
    scenes = [s for _, s in pairs for _ in seeds]
    texts = [t for t, _ in pairs for _ in seeds]
    plain = evaluation_prompts("single")[:regular]
    report = ConceptReport(str(lora), str(model), torch.cuda.get_device_name() if device.startswith("cuda") else
                           "CPU", time.strftime("%Y-%m-%d"), n, len(plain), list(seeds), scale)
    for variant in VARIANTS:
        pipe = variant_pipeline(variant, lora, model=model, device=device, scale=scale)
        kwargs = model_defaults(pipe).pipeline_kwargs()
        start = time.perf_counter()
        images = generate_images(pipe, texts, [s for _ in pairs for s in seeds], batch_size=batch_size, **kwargs)
        concept = concept_adherence(images, scenes).as_dict()
        rates = prompt_adherence(pipe, plain, seeds, batch_size=batch_size, **kwargs).to_dict()["rates"]
        report.rows.append(ConceptRow(variant, concept, {a: r["accuracy"] for a, r in rates.items()},
                                      round(time.perf_counter() - start, 1)))
        print(f"[concept] {variant}: diamond {100 * concept['shape']:.1f}%, seen {concept['shapes_seen']}", flush=True)
        del pipe
    return report


@dataclass
class LoraGallery:
    """The same prompts and seed without the LoRA, with it in BF16 and with it on FP8 weights, as judged."""

    prompts: list[str]
    images: dict[str, list[Any]]
    """variant (:data:`VARIANTS`) → one image per prompt."""
    shapes: dict[str, list[str | None]]
    """variant → the shape the judge saw in each image (among the scene shapes and the diamond)."""

    def count(self, variant: str, shape: str = "diamond") -> int:
        return sum(s == shape for s in self.shapes[variant])

    def plot(self):
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(len(self.prompts), len(VARIANTS), figsize=(2.3 * len(VARIANTS),
                                                                            2.5 * len(self.prompts)), squeeze=False)
        for j, variant in enumerate(VARIANTS):
            for i, prompt in enumerate(self.prompts):
                ax = axes[i, j]
                ax.imshow(self.images[variant][i])
                ax.set_xticks([]), ax.set_yticks([])
                ax.set_xlabel(f"judge: {self.shapes[variant][i] or 'nothing'}", fontsize=8)
                if i == 0:
                    ax.set_title(variant, fontsize=9)
                if j == 0:
                    ax.set_ylabel("\n".join(prompt[k:k + 26] for k in range(0, len(prompt), 26)), fontsize=7)
        fig.tight_layout()
        return fig


def lora_gallery(lora: str | Path, prompts: Sequence[str], *, model: str = DEFAULT_MODEL, seed: int = 0,
                 scale: float = 1.0, device: str = "cpu") -> LoraGallery:
    """Draw ``prompts`` at ``seed`` through the three pipelines of :data:`VARIANTS` and read each shape."""
    from ..pipeline.defaults import default_settings
    from ..pipeline.generation import generate
    from .concepts import read_shape

    images: dict[str, list[Any]] = {}
    for variant in VARIANTS:
        pipe = variant_pipeline(variant, lora, model=model, device=device, scale=scale)
        images[variant] = [generate(pipe, default_settings(pipe, p, seed), progress=False).image for p in prompts]
        del pipe
    return LoraGallery(list(prompts), images, {v: [read_shape(im) for im in ims] for v, ims in images.items()})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sd35fp8_helpers.lora.evaluate", description=__doc__.splitlines()[0])
    ap.add_argument("lora", help="a LoRA file or name")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=48, help="concept prompts")
    ap.add_argument("--regular", type=int, default=48, help="ordinary scene prompts (the LoRA must not break them)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--json", type=Path, help="write the report here")
    args = ap.parse_args(argv)
    report = evaluate_concept(args.lora, model=args.model, device=args.device, n=args.n, regular=args.regular,
                              seeds=tuple(args.seeds), scale=args.scale)
    print(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.to_json(), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

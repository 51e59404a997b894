"""Score a trained scene model on the fixed evaluation prompts: the numbers its model card quotes.

``python -m sd35fp8_helpers.training.evaluate MODEL_DIR OUT.json [--device cuda] [--dtype bf16]`` loads the
folder like any diffusers download, generates every evaluation prompt × seed at the model's own inference
settings (``sd35fp8_scenes.json``), judges each image from its pixels (:mod:`sd35fp8_helpers.scenes.judge`)
and writes per-attribute accuracy with Wilson intervals. A short sweep over steps and guidance on part of the
prompts shows how sensitive the result is; a non-square pass checks the sizes the model was trained on
besides 128²; and a grid of examples (prompt above, the judge's reading below) is saved beside the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SWEEP = ((8, 4.0), (12, 4.0), (16, 3.0), (16, 4.0), (16, 5.0), (24, 4.0), (32, 4.0))
"""(steps, guidance) pairs of the sensitivity sweep."""


def load_scene_pipeline(folder: str | os.PathLike, device: str = "cpu", dtype: str = "bf16"):
    """``StableDiffusion3Pipeline.from_pretrained`` of a scene model folder, on ``device`` in ``dtype``."""
    import torch
    from diffusers import StableDiffusion3Pipeline

    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[dtype]
    pipe = StableDiffusion3Pipeline.from_pretrained(str(folder), torch_dtype=torch_dtype)
    return pipe.to(device)


def _settings(record: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    inf = dict(record["inference"], **overrides)
    return dict(num_inference_steps=inf["steps"], guidance_scale=inf["guidance_scale"], height=inf["height"],
                width=inf["width"], max_sequence_length=inf["max_sequence_length"])


def example_grid(pipe, prompts, record: dict[str, Any], path: Path, seed: int = 0) -> list[dict[str, Any]]:
    """Images of ``prompts`` at ``seed`` in a grid, each captioned with its prompt and the judge's reading."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..scenes.judge import generate_images, judge

    images = generate_images(pipe, [p.text for p in prompts], [seed] * len(prompts), batch_size=64,
                             **_settings(record))
    cols = 6
    rows = (len(prompts) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 3.4 * rows), squeeze=False)
    examples = []
    for ax, p, img in zip(axes.flat, prompts, images, strict=False):
        v = judge(img, p.spec)
        ax.imshow(img)
        ax.set_title("\n".join([p.text[i:i + 34] for i in range(0, len(p.text), 34)]), fontsize=6)
        seen = ", ".join("nothing" if o.seen is None else f"{o.seen.size} {o.seen.colour} {o.seen.shape} "
                         f"{o.seen.position}" for o in v.objects)
        label = ("✓ " if v.all_ok else "✗ ") + seen + f" / {v.background_seen}"
        ax.set_xlabel("\n".join(label[i:i + 40] for i in range(0, len(label), 40)), fontsize=6)  # two objects: long
        ax.set_xticks([]), ax.set_yticks([])
        examples.append({"id": p.id, "prompt": p.text, "seed": seed, "all_ok": v.all_ok, "judge": v.summary()})
    for ax in list(axes.flat)[len(prompts):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return examples


def vae_ceiling(pipe, prompts=None, seeds: tuple[int, ...] = (0, 1), *, batch_size: int = 32):
    """The judge's scores on the *ground-truth* renders of ``prompts`` after a round trip through the model's VAE.

    No transformer is involved: this is the best any transformer could score through this VAE (its
    ceiling). If shapes fail here, the VAE — not the denoiser — is what must improve.
    Returns ``(rendered, round_trip)`` :class:`~sd35fp8_helpers.scenes.judge.AdherenceReport` s.
    """
    import numpy as np
    import torch

    from ..pipeline.decode import latents_to_image, scale_latents
    from ..scenes.dataset import evaluation_prompts
    from ..scenes.judge import prompt_adherence
    from ..scenes.render import render

    prompts = prompts or evaluation_prompts()
    truth = [render(p.spec, seed=s).image for p in prompts for s in seeds]
    vae = pipe.vae
    out = []
    for i in range(0, len(truth), batch_size):
        x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 127.5 - 1 for im in truth[i:i + batch_size]]))
        x = x.permute(0, 3, 1, 2).to(vae.device, vae.dtype)
        with torch.inference_mode():
            z = vae.encode(x).latent_dist.mode()
        out += latents_to_image(pipe, scale_latents(vae, z))
    return prompt_adherence(truth, prompts, seeds), prompt_adherence(out, prompts, seeds)


@dataclass(frozen=True)
class ColourMixups:
    """Where a model's wrong colours come from, on one-object images: ``swapped`` of the ``wrong`` ones drew the
    object in the background's colour *and* the background in the object's — the model read both colour words
    but bound them to the wrong nouns (a binding failure, not a drawing one)."""

    images: int
    wrong: int
    swapped: int

    @property
    def swapped_share(self) -> float:
        return self.swapped / self.wrong if self.wrong else 0.0


def colour_mixups(records: list[dict[str, Any]]) -> ColourMixups:
    """Count colour swaps in the judge's ``records`` of the evaluation prompts (``quality.json``'s ``default``
    run: ``id``, ``seen`` objects, ``background``)."""
    from ..scenes.dataset import evaluation_prompts

    specs = {p.id: p.spec for p in evaluation_prompts("single")}
    images = wrong = swapped = 0
    for r in records:
        spec = specs.get(r["id"])
        if spec is None:
            continue
        images += 1
        seen = r["seen"][0]["colour"] if r["seen"] else None
        asked = spec.objects[0].colour
        if seen is not None and seen != asked:
            wrong += 1
            swapped += seen == spec.background and r["background"] == asked
    return ColourMixups(images, wrong, swapped)


def model_colour_mixups(folder: str | os.PathLike | None = None) -> ColourMixups:
    """:func:`colour_mixups` of a scene model's committed ``quality.json`` (default: the shipped model)."""
    from ..constants import EMBEDDED_MODEL_DIR

    data = json.loads((Path(folder or EMBEDDED_MODEL_DIR) / "quality.json").read_text())
    return colour_mixups(data["results"]["default"]["records"])


def evaluate_model(folder: str | os.PathLike, out_json: str | os.PathLike, *, device: str = "cuda",
                   dtype: str = "bf16", seeds: tuple[int, ...] = (0, 1), sweep: bool = True,
                   workers: int = 0, extra_settings: tuple[tuple[int, float], ...] = (),
                   limit: int | None = None) -> dict[str, Any]:
    """Evaluate ``folder`` on the full prompt set (and sweep/non-square/examples); write ``out_json``."""
    import torch

    from ..scenes.dataset import evaluation_prompts
    from ..scenes.judge import prompt_adherence
    from .train_tiny import load_scene_record

    workers = workers or min(16, os.cpu_count() or 1)
    Path(out_json).parent.mkdir(parents=True, exist_ok=True)
    record = load_scene_record(folder)
    if record is None:
        raise ValueError(f"{folder} is not a trained scene model (no sd35fp8_scenes.json)")
    pipe = load_scene_pipeline(folder, device, dtype)
    prompts = evaluation_prompts()
    if limit is not None:  # a quick look: the first ``limit`` single- and two-object prompts
        prompts = evaluation_prompts("single")[:limit] + evaluation_prompts("two")[:limit]
    out: dict[str, Any] = {"model": str(folder), "device": torch.cuda.get_device_name() if device.startswith("cuda")
                           else "cpu", "dtype": dtype, "seeds": list(seeds), "date": time.strftime("%Y-%m-%d"),
                           "inference": record["inference"], "results": {}}

    def run(name: str, chosen, seeds_, **over: Any) -> dict[str, Any]:
        start = time.perf_counter()
        report = prompt_adherence(pipe, chosen, seeds_, batch_size=128, workers=workers, **_settings(record, **over))
        entry = {"settings": report.settings, "seconds": round(time.perf_counter() - start, 1),
                 "rates": report.to_dict()["rates"], "table": report.to_table()}
        if name == "default":
            entry["records"] = report.records
        out["results"][name] = entry
        print(f"[eval] {name}: {entry['seconds']} s\n{entry['table']}", flush=True)
        Path(out_json).write_text(json.dumps(out, indent=1) + "\n")
        return entry

    run("default", prompts, seeds)
    inf = record["inference"]
    for steps, guidance in extra_settings:
        run(f"steps{steps}_cfg{guidance:g}", prompts, seeds, steps=steps, guidance_scale=guidance)
    singles = [p for p in prompts if p.kind == "single"]
    examples = singles[::max(1, len(singles) // 6)][:6] + [p for p in prompts if p.kind == "two"][:6]
    out["examples"] = example_grid(pipe, examples, record, Path(out_json).with_name("examples.png"))
    wide = [p for i, p in enumerate(prompts) if i % 4 == 0]
    run("wide_192x128", wide, (0,), width=192, height=128)
    run("tall_128x192", wide, (0,), width=128, height=192)
    if sweep:
        subset = [p for i, p in enumerate(prompts) if i % 2 == 0]
        for steps, guidance in SWEEP:
            if (steps, guidance) != (inf["steps"], inf["guidance_scale"]):
                run(f"sweep_steps{steps}_cfg{guidance:g}", subset, (0,), steps=steps, guidance_scale=guidance)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out_json", type=Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32", "fp16"))
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--limit", type=int, help="only the first N single- and N two-object prompts")
    parser.add_argument("--also", nargs="*", default=[], help="more full evaluations, as STEPS:GUIDANCE")
    args = parser.parse_args(argv)
    extra = tuple((int(a.split(":")[0]), float(a.split(":")[1])) for a in args.also)
    evaluate_model(args.model_dir, args.out_json, device=args.device, dtype=args.dtype, sweep=not args.no_sweep,
                   extra_settings=extra, limit=args.limit)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

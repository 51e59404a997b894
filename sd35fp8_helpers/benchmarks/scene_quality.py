"""What does each way of running the model do to its pictures? The quality table, on the trained scene model.

Every variant — BF16, FP8 storage under each layer policy, FP8 compute (GPUs of capability ≥ 8.9), T5 dropped,
a tiled VAE decode, every memory strategy offered on the device, and a Comfy-format scaled-FP8 round trip —
draws the same fixed prompts (:func:`~sd35fp8_helpers.scenes.dataset.evaluation_prompts`) at the same seeds
and the model's own settings. Each image is judged from its pixels (:mod:`sd35fp8_helpers.scenes.judge`:
colour, shape, position, size, background, and both objects of a two-object prompt) and compared with the
BF16 image of the same prompt and seed (paired PSNR / SSIM). A strategy that calls itself lossless
(:attr:`~sd35fp8_helpers.memory.strategies.Strategy.lossless`) must give *identical* images to its precision's
resident pipeline; the table says whether it did.

Run (CPU: about a second per image on 2 cores; the GPU machine: a few ms)::

    python -m sd35fp8_helpers.benchmarks.scene_quality --json docs/benchmarks/scene-quality-cpu.json

Images (and latents) of each finished variant are kept in ``--cache`` (default
``outputs/scene-quality/``), so an interrupted run resumes where it stopped and a re-run only redoes what
changed. ``--single N --two N`` takes the first N prompts of each kind (the CPU test in
``tests/test_scene_quality.py`` uses 16 + 16).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..constants import BENCHMARKS_DIR, DEFAULT_MODEL, REPO_ROOT

REFERENCE = "bf16"
"""The variant every other is compared with (paired PSNR / SSIM, identity)."""

DEFAULT_JSON = BENCHMARKS_DIR / "scene-quality-cpu.json"
DEFAULT_CACHE = REPO_ROOT / "outputs" / "scene-quality"


@dataclass(frozen=True)
class Variant:
    """One way to run the model: how to build its pipeline from the reference one, and what it should match.

    ``build(model, device)`` returns a fresh pipeline. ``decode_of`` names a variant whose *latents* this one
    reuses, only decoding them differently (a tiled VAE changes nothing before the decode, so the denoising
    is not repeated). ``identical_to`` names the variant whose images this one must equal bit for bit (a
    lossless memory strategy: its precision's resident pipeline).
    """

    name: str
    what: str
    precision: str
    build: Callable[[str, str], Any] | None = None
    decode_of: str | None = None
    identical_to: str | None = None
    available: str = ""
    """Why the variant cannot run on this device (empty: it can)."""


@dataclass
class VariantResult:
    name: str
    what: str
    precision: str
    seconds_per_image: float
    transformer_bytes: int
    rates: dict[str, dict[str, Any]]
    psnr_db: float
    ssim: float
    identical: int
    images: int
    identical_to: str | None = None
    identity_ok: bool | None = None
    skipped: str = ""
    flips: dict[str, int] = field(default_factory=dict)
    """How many images the judge reads differently from BF16, per attribute (``single.shape``: a one-object
    image whose shape reading changed; ``two.found``: an object seen in one image and missed in the other)."""
    same_reading: float = math.nan
    """Fraction of images the judge reads exactly as it reads the BF16 image of the same prompt and seed (every
    object's colour, shape, position and size, and the background): "keeps the picture", image by image."""

    def row(self) -> dict[str, str]:
        from ..display import human_bytes

        if self.skipped:
            return {"variant": self.name, "precision": self.precision, "note": f"skipped: {self.skipped}"}
        acc = {k: f"{100 * v['accuracy']:.1f}" for k, v in self.rates.items()}
        out = {"variant": self.name, "precision": self.precision,
               "transformer": human_bytes(self.transformer_bytes) if self.transformer_bytes else "(as bf16)",
               "s/image": _seconds(self.seconds_per_image) if self.seconds_per_image else "(decode only)"}
        for key, label in COLUMNS:
            out[label] = acc.get(key, "–")
        out["same reading %"] = f"{100 * self.same_reading:.1f}"
        out["PSNR dB"] = "∞ (identical)" if math.isinf(self.psnr_db) else f"{self.psnr_db:.1f}"
        out["SSIM"] = f"{self.ssim:.4f}"
        out["identical"] = f"{self.identical}/{self.images}"
        if self.identical_to:
            out["note"] = f"lossless: must equal {self.identical_to} — " + ("yes" if self.identity_ok else "NO")
        return out


def _seconds(s: float) -> str:
    """Seconds per image in batches: a CPU's 0.36, a GPU's 0.0039 (printed as 3.9 ms, not 0.00)."""
    return f"{s:.2f}" if s >= 0.1 else f"{1000 * s:.1f} ms"


COLUMNS: tuple[tuple[str, str], ...] = (
    ("single.colour", "colour %"), ("single.shape", "shape %"), ("single.position", "position %"),
    ("single.size", "size %"), ("single.background", "background %"), ("two.both", "two: both %"),
)
"""Adherence columns of the printed table (the JSON has every attribute with its 95% interval)."""


@dataclass
class SceneQualityReport:
    model: str
    device: str
    date: str
    settings: dict[str, Any]
    prompts: dict[str, int]
    seeds: list[int]
    versions: dict[str, str]
    command: str
    results: dict[str, VariantResult] = field(default_factory=dict)
    ceiling: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    """The judge on the ground-truth renders of the same prompts, as drawn and after a round trip through the
    model's VAE (no transformer): the best any denoiser could score through this VAE."""

    def rows(self) -> list[dict[str, str]]:
        labels = {"rendered": "ground-truth renders", "vae_round_trip": "renders through the VAE (ceiling)"}
        top = [{"variant": labels[k], "precision": "–", **{lab: f"{100 * rates[key]['accuracy']:.1f}"
                                                         for key, lab in COLUMNS if key in rates}}
               for k, rates in self.ceiling.items()]
        return top + [r.row() for r in self.results.values()]

    def _keys(self, rows: list[dict[str, str]]) -> list[str]:
        """Columns in a variant row's order (the ceiling rows have fewer), then any others."""
        first = next((r.row() for r in self.results.values() if not r.skipped), {})
        return list(dict.fromkeys([*first, *(k for r in rows for k in r)]))

    def __str__(self) -> str:
        from ..display import text_table

        rows = self.rows()
        head = (f"{self.model} on {self.device}, {self.date}: {self.prompts['single']} single + {self.prompts['two']} "
                f"two-object prompts × seeds {self.seeds}, {self.settings}")
        return head + "\n" + text_table(rows, self._keys(rows))

    def _repr_html_(self) -> str:
        from ..display import html_table

        return html_table(self.rows()).data

    def to_markdown(self) -> str:
        """The table as GitHub markdown (what docs/benchmarks.md and the model card paste)."""
        rows = self.rows()
        keys = self._keys(rows)
        lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(r.get(k, "") for k in keys) + " |" for r in rows]
        return "\n".join(lines)

    def plot(self, variants: Sequence[str] | None = None):
        """Adherence per attribute, one bar per variant (the ceiling as a line), and PSNR vs BF16 beside it."""
        import matplotlib.pyplot as plt
        import numpy as np

        names = [n for n in (variants or self.results) if not self.results[n].skipped]
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [3, 1.2]})
        x = np.arange(len(COLUMNS))
        width = 0.8 / len(names)
        for i, n in enumerate(names):
            rates = self.results[n].rates
            ax.bar(x + (i - (len(names) - 1) / 2) * width, [100 * rates[k]["accuracy"] for k, _ in COLUMNS],
                   width, label=n)
        ceiling = self.ceiling.get("vae_round_trip", {})
        for j, (k, _) in enumerate(COLUMNS):
            if k in ceiling:
                ax.hlines(100 * ceiling[k]["accuracy"], j - 0.42, j + 0.42, colors="k", linestyles="--", lw=1)
        ax.set_xticks(x, [lab.removesuffix(" %") for _, lab in COLUMNS])
        ax.set_ylabel("judged correct, %")
        ax.set_ylim(0, 105)
        ax.set_title("adherence (dashed: ground truth through the VAE)", fontsize=10)
        ax.legend(fontsize=7, ncol=2)
        finite = [(n, self.results[n].psnr_db) for n in names if n != REFERENCE]
        bx.barh([n for n, _ in finite], [p for _, p in finite], color="tab:gray")
        bx.invert_yaxis()
        bx.set_xlabel("PSNR vs BF16, dB (higher: closer)")
        bx.tick_params(axis="y", labelsize=7)
        fig.tight_layout()
        return fig

    def to_json(self) -> dict[str, Any]:
        return {**{k: v for k, v in asdict(self).items() if k != "results"},
                "results": {k: asdict(v) for k, v in self.results.items()}}

    def accuracy(self, variant: str, attribute: str) -> float:
        return self.results[variant].rates[attribute]["accuracy"]

    def changes(self, variant: str) -> dict[str, float]:
        """Attribute → accuracy of ``variant`` minus the reference's (+0.01: one point better than BF16)."""
        ref = self.results[REFERENCE].rates
        return {a: r["accuracy"] - ref[a]["accuracy"] for a, r in self.results[variant].rates.items()}


def load_report(path: str | Path = DEFAULT_JSON) -> SceneQualityReport:
    """A report written by :func:`run_scene_quality` (what notebook 02 and the model card read)."""
    data = json.loads(Path(path).read_text())
    results = {k: VariantResult(**v) for k, v in data.pop("results").items()}
    return SceneQualityReport(**data, results=results)


# ---- the variants ------------------------------------------------------------------------------------------

def _loaded(**kwargs: Any) -> Callable[[str, str], Any]:
    def build(model: str, device: str):
        from ..pipeline.loading import load_pipeline

        return load_pipeline(model, device=device, **kwargs)
    return build


def _fp8(mode: str, policy: str) -> Callable[[str, str], Any]:
    def build(model: str, device: str):
        from ..precision.quantize import FP8Config, quantize_

        pipe = _loaded()(model, device)
        quantize_(pipe, FP8Config(mode=mode, policy=policy))
        return pipe
    return build


def _strategy(name: str) -> Callable[[str, str], Any]:
    def build(model: str, device: str):
        from ..memory.strategies import get_strategy

        pipe = _loaded()(model, device)
        get_strategy(name).apply(pipe, device)
        return pipe
    return build


def _comfy_round_trip(model: str, device: str):
    """Write the model as a Comfy-Org scaled-FP8 single file, then load that file back with its scales."""
    from ..precision.comfy import load_comfy_pipeline, save_comfy_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        path = save_comfy_checkpoint(_loaded()(model, "cpu"), Path(tmp) / "scenes_fp8_scaled.safetensors")
        return load_comfy_pipeline(path, base=model, device=device)


def fp8_compute_unavailable(device: str) -> str:
    """Why FP8 compute cannot run on ``device`` (empty when it can)."""
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        return "FP8 compute needs an NVIDIA GPU of capability ≥ 8.9 (this run is on the CPU)"
    cap = torch.cuda.get_device_capability()
    return "" if cap >= (8, 9) else f"FP8 compute needs capability ≥ 8.9; this GPU is {cap[0]}.{cap[1]}"


def variants(device: str = "cpu") -> list[Variant]:
    """Every variant of the quality table, in the order the table prints them (what matters most first)."""
    from ..memory.strategies import get_strategy, offered_strategies
    from ..precision.policies import POLICIES

    out = [Variant(REFERENCE, "weights as shipped (bf16; a CPU computes in float32)", "bf16", _loaded())]
    out += [Variant(f"fp8-storage {p}", f"FP8 storage, {p} policy (transformer + T5)", "fp8-storage", _fp8("storage", p))
            for p in POLICIES]
    out.append(Variant("fp8-compute", "FP8 compute (torchao, all-linear, compiled)", "fp8-compute",
                       _fp8("compute", "all-linear"), available=fp8_compute_unavailable(device)))
    out.append(Variant("comfy round trip", "saved as a Comfy scaled-FP8 file, loaded back with its scales",
                       "fp8-storage", _comfy_round_trip))
    out.append(Variant("t5-dropped", "T5 dropped (text_encoder_3=None), bf16", "bf16", _loaded(text_encoder_3=False)))
    # memory strategies offered here; "resident" and "fp8" are the bf16 and fp8-storage all-linear rows above
    same_rows = {"resident": REFERENCE, "fp8": "fp8-storage all-linear"}
    names = offered_strategies(device)
    for name in names:
        s = get_strategy(name)
        if name in same_rows:
            continue
        untiled = name.removesuffix("_tiled")
        precision = "fp8-storage" if s.fp8 else "bf16"
        if s.vae_tiling and (untiled in same_rows or untiled in names):  # the untiled one's latents, in tiles
            out.append(Variant(f"memory {name}", s.description, precision,
                               decode_of=same_rows.get(untiled, f"memory {untiled}")))
        else:
            ident = same_rows["fp8" if s.fp8 else "resident"] if s.lossless else None
            out.append(Variant(f"memory {name}", s.description, precision, _strategy(name), identical_to=ident))
    return out


# ---- running -----------------------------------------------------------------------------------------------

def _generate(pipe, jobs: Sequence[tuple[str, int]], settings: dict[str, Any], batch_size: int, desc: str):
    """Latents for every (prompt, seed) job, batched, each seed on its own CPU generator (as ``generate``)."""
    import torch
    from tqdm.auto import tqdm

    pipe.set_progress_bar_config(disable=True)
    out = []
    for i in tqdm(range(0, len(jobs), batch_size), desc=desc, unit="batch", leave=False):
        chunk = jobs[i:i + batch_size]
        gens = [torch.Generator("cpu").manual_seed(int(s)) for _, s in chunk]
        with torch.inference_mode():
            out.append(pipe(prompt=[t for t, _ in chunk], generator=gens, output_type="latent", **settings)
                       .images.float().cpu())
    return torch.cat(out)


def _decode(pipe, latents, height: int, width: int, tiled: bool, batch_size: int, device: str):
    import numpy as np

    from ..pipeline.decode import fit_vae_tiles, latents_to_image

    if tiled:
        from ..memory.strategies import get_strategy

        get_strategy("resident_tiled").apply(pipe, device)  # merged: the pipeline keeps its FP8 / T5 state
        fit_vae_tiles(pipe, height, width)
    images = []
    for i in range(0, len(latents), batch_size):
        z = latents[i:i + batch_size].to(pipe._execution_device)  # under offload hooks vae.device says cpu
        arr = latents_to_image(pipe, z, output_type="np")
        images.append((np.clip(arr, 0, 1) * 255).round().astype(np.uint8))
    if tiled:
        pipe.vae.disable_tiling()
        pipe.vae.disable_slicing()
    return np.concatenate(images)


def _named(record: dict[str, Any]) -> tuple:
    """A judged image as names only (each object's colour, shape, position, size; the background)."""
    objects = tuple(None if o is None else (o["colour"], o["shape"], o["position"], o["size"]) for o in record["seen"])
    return objects, record["background"]


def _flips(readings: Sequence[tuple], reference: Sequence[tuple]) -> dict[str, int]:
    """Per attribute, how many images are read differently in ``readings`` than in ``reference``."""
    from collections import Counter

    count: Counter[str] = Counter()
    for (objects, background), (ref_objects, ref_background) in zip(readings, reference, strict=True):
        kind = "two" if len(ref_objects) == 2 else "single"
        count[f"{kind}.background"] += background != ref_background
        for o, r in zip(objects, ref_objects, strict=True):
            if (o is None) != (r is None):
                count[f"{kind}.found"] += 1
            elif o is not None:
                for i, attribute in enumerate(("colour", "shape", "position", "size")):
                    count[f"{kind}.{attribute}"] += o[i] != r[i]
    return {k: v for k, v in sorted(count.items()) if v}


def _cache_file(cache: Path, name: str) -> Path:
    return cache / (name.replace(" ", "_") + ".npz")


def run_scene_quality(model: str = DEFAULT_MODEL, *, device: str = "cpu", single: int | None = None,
                      two: int | None = None, seeds: Sequence[int] = (0, 1), only: Sequence[str] | None = None,
                      json_path: str | Path | None = DEFAULT_JSON, cache: str | Path | None = DEFAULT_CACHE,
                      batch_size: int = 32, workers: int = 2, command: str = "") -> SceneQualityReport:
    """Run every variant (or ``only`` those, plus the reference) and return/write the table.

    The JSON is rewritten after each variant, so an interrupted run keeps what it finished; with ``cache``
    each variant's images and latents are kept and reused when the prompts, seeds and settings match.
    """
    import numpy as np
    import torch

    from ..pipeline.defaults import model_defaults
    from ..precision.quantize import module_bytes
    from ..scenes.dataset import evaluation_prompts
    from ..scenes.judge import paired_psnr_ssim, prompt_adherence
    from ..training.evaluate import vae_ceiling
    from ..versions import library_versions

    prompts = evaluation_prompts("single")[:single] + evaluation_prompts("two")[:two]
    jobs = [(p.text, s) for p in prompts for s in seeds]
    probe = _loaded()(model, device)  # the model's own settings, and its VAE for the ceiling rows
    d = model_defaults(probe)
    settings = d.pipeline_kwargs()
    rendered, round_trip = vae_ceiling(probe, prompts, tuple(seeds), batch_size=batch_size)
    del probe
    n_single = sum(p.kind == "single" for p in prompts)
    report = SceneQualityReport(
        model=str(model), device=torch.cuda.get_device_name() if device.startswith("cuda") else
        f"CPU ({torch.get_num_threads()} threads)", date=time.strftime("%Y-%m-%d"), settings=settings,
        prompts={"single": n_single, "two": len(prompts) - n_single}, seeds=list(seeds),
        versions=library_versions(), command=command or f"run_scene_quality({model!r}, device={device!r})")
    report.ceiling = {"rendered": rendered.to_dict()["rates"], "vae_round_trip": round_trip.to_dict()["rates"]}
    key = json.dumps([jobs, settings], sort_keys=True)
    cache = Path(cache) if cache else None
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
    chosen = [v for v in variants(device) if only is None or v.name in only or v.name == REFERENCE]
    by_name = {v.name: v for v in variants(device)}
    images: dict[str, Any] = {}
    latents: dict[str, Any] = {}

    def produce(v: Variant) -> tuple[Any, float, int]:
        """(uint8 images, seconds per image, transformer bytes) of ``v``, from the cache when it matches."""
        f = _cache_file(cache, v.name) if cache else None
        if f is not None and f.is_file():
            z = np.load(f, allow_pickle=False)
            if str(z["key"]) == key:
                latents[v.name] = torch.from_numpy(z["latents"]) if z["latents"].size else None
                return z["images"], float(z["seconds"]), int(z["bytes"])
        if v.decode_of:
            if v.decode_of not in latents:
                produce_and_keep(by_name[v.decode_of])
            pipe = by_name[v.decode_of].build(model, device)
            imgs = _decode(pipe, latents[v.decode_of], d.height, d.width, True, batch_size, device)
            seconds, nbytes, lat = 0.0, produce_and_keep(by_name[v.decode_of])[2], None
        else:
            pipe = v.build(model, device)
            start = time.perf_counter()
            lat = _generate(pipe, jobs, settings, batch_size, v.name)
            imgs = _decode(pipe, lat, d.height, d.width, False, batch_size, device)
            seconds = (time.perf_counter() - start) / len(jobs)
            nbytes = module_bytes(pipe.transformer)
        del pipe
        latents[v.name] = lat
        if f is not None:
            tmp = f.with_suffix(".partial.npz")
            np.savez(tmp, key=key, images=imgs, latents=lat.numpy() if lat is not None else np.zeros(0),
                     seconds=seconds, bytes=nbytes)
            tmp.replace(f)  # whole or not at all
        return imgs, seconds, nbytes

    def produce_and_keep(v: Variant) -> Any:
        if v.name not in images:
            images[v.name] = produce(v)
        return images[v.name]

    reference_readings: list[Any] = []
    for v in chosen:
        if v.available:
            report.results[v.name] = VariantResult(v.name, v.what, v.precision, 0.0, 0, {}, math.nan, math.nan, 0,
                                                   0, skipped=v.available)
            continue
        imgs, seconds, nbytes = produce_and_keep(v)
        ref = produce_and_keep(by_name[REFERENCE])[0]
        adherence = prompt_adherence(list(imgs), prompts, seeds, workers=workers)
        readings = [_named(r) for r in adherence.records]
        reference_readings = reference_readings or readings  # the reference runs first
        same_reading = sum(a == b for a, b in zip(readings, reference_readings, strict=True)) / len(readings)
        flips = _flips(readings, reference_readings)
        paired = paired_psnr_ssim(list(imgs), list(ref))
        identity = None
        if v.identical_to:
            identity = bool(np.array_equal(imgs, produce_and_keep(by_name[v.identical_to])[0]))
        base_bytes = report.results[REFERENCE].transformer_bytes if REFERENCE in report.results else nbytes
        report.results[v.name] = VariantResult(
            v.name, v.what, v.precision, round(seconds, 4), nbytes or base_bytes,
            adherence.to_dict()["rates"], paired.mean_psnr, paired.mean_ssim, paired.identical, len(imgs),
            v.identical_to, identity, flips=flips, same_reading=same_reading)
        print(f"[quality] {v.name}: " + ", ".join(f"{lab} {r}" for lab, r in report.results[v.name].row().items()
                                                  if lab not in ("variant", "precision")), flush=True)
        if json_path:
            _write(report, Path(json_path))
    return report


def _write(report: SceneQualityReport, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps(report.to_json(), indent=1, default=_json_default) + "\n")
    tmp.replace(path)


def _json_default(x: Any) -> Any:
    return float(x) if hasattr(x, "__float__") else str(x)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sd35fp8_helpers.benchmarks.scene_quality",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--single", type=int, help="first N single-object prompts (default: all 240)")
    parser.add_argument("--two", type=int, help="first N two-object prompts (default: all 120)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--only", nargs="+", help="variant names (the reference always runs)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--list", action="store_true", help="print the variants and exit")
    args = parser.parse_args(argv)
    if args.list:
        for v in variants(args.device):
            print(f"{v.name:32s} {v.what}" + (f"  [skipped here: {v.available}]" if v.available else ""))
        return 0
    with contextlib.suppress(BrokenPipeError):
        report = run_scene_quality(args.model, device=args.device, single=args.single, two=args.two,
                                   seeds=tuple(args.seeds), only=args.only, json_path=args.json, cache=args.cache,
                                   batch_size=args.batch_size, command=" ".join(["python -m",
                                                                                __spec__.name if __spec__ else
                                                                                "scene_quality", *sys.argv[1:]]))
        print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

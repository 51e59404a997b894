"""The measured figures the notebooks quote, read from ``docs/benchmarks/*.json`` — never typed into prose.

A notebook sentence such as "FP8 compute is 1.76× bf16" goes stale the day the benchmark is re-run on another
GPU. So each chapter prints its sentences from the committed JSON instead: every function here returns a
:class:`Findings` — the numbers (for the cell to ``assert`` on) and the sentences that say them, naming the
device and date they were measured on.

Example:
    >>> f = fp8_speed()
    >>> f["compute_ms"] < f["bf16_ms"] < f["storage_ms"]
    True
    >>> "FP8 compute" in str(f)
    True
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..constants import BENCHMARKS_DIR

PUBLISHED_TENSORRT_SPEEDUP = {"large": 2.3, "medium": 1.7}
"""Stability AI / NVIDIA's published TensorRT FP8 speed-up over BF16 PyTorch (RTX GPUs): an anchor, not ours."""


@dataclass(frozen=True)
class Findings:
    """Numbers measured on the GPU machine and the sentences a notebook prints from them."""

    numbers: dict[str, Any]
    sentences: tuple[str, ...]
    source: str  # "NVIDIA H100 80GB HBM3, 2026-11-24"

    def __getitem__(self, key: str) -> Any:
        return self.numbers[key]

    def __str__(self) -> str:
        return "\n".join(self.sentences)

    def _repr_markdown_(self) -> str:
        return "\n".join(f"* {s}" for s in self.sentences) + f"\n\n*(measured on {self.source})*"


def _ok(variants: list[dict], name: str) -> dict | None:
    return next((v for v in variants if v["variant"] == name and v["status"] == "ok"), None)


def fp8_speed(folder: str | Path | None = None, preset: str = "large") -> Findings:
    """Per-step speed and weight memory of bf16, bf16+compile, FP8 storage and FP8 compute (``sd35fp8 bench``)."""
    from .fp8 import load_results

    results = load_results(folder or BENCHMARKS_DIR)
    run = next(r for r in results if r["preset"] == preset)
    bf16, compiled = _ok(run["variants"], "bf16"), _ok(run["variants"], "bf16+compile")
    storage, compute = _ok(run["variants"], "fp8-storage"), _ok(run["variants"], "fp8-compute")
    t5 = next((r["text_encoder_3"] for r in results if r.get("text_encoder_3")), None)
    published = PUBLISHED_TENSORRT_SPEEDUP[preset]
    n = {"bf16_ms": bf16["ms_per_step"], "compile_ms": compiled["ms_per_step"] if compiled else math.nan,
         "storage_ms": storage["ms_per_step"], "compute_ms": compute["ms_per_step"],
         "compute_speedup": bf16["ms_per_step"] / compute["ms_per_step"],
         "storage_speedup": bf16["ms_per_step"] / storage["ms_per_step"],
         "weights_bf16_gib": bf16["weights_gib"], "weights_fp8_gib": storage["weights_gib"],
         "t5_bf16_gib": t5["bf16_gib"] if t5 else math.nan, "t5_fp8_gib": t5["fp8_gib"] if t5 else math.nan,
         "published_tensorrt_speedup": published}
    n["short_of_published"] = 1 - n["compute_speedup"] / published
    name = f"SD3.5 {preset.capitalize()} {run['width']}²"
    sentences = (
        f"{name}: weights {n['weights_bf16_gib']:.1f} GiB in bf16 → {n['weights_fp8_gib']:.1f} GiB in FP8"
        + (f"; T5-XXL {n['t5_bf16_gib']:.1f} → {n['t5_fp8_gib']:.1f} GiB." if t5 else "."),
        f"FP8 storage: {n['storage_ms']:.0f} ms per step against bf16's {n['bf16_ms']:.0f} ms "
        f"({n['storage_speedup']:.2f}×) — a memory technique, not a speed one.",
        f"FP8 compute (with torch.compile): {n['compute_ms']:.0f} ms, {n['compute_speedup']:.2f}× bf16 eager"
        + (f" and {n['compile_ms'] / n['compute_ms']:.2f}× bf16 + compile." if compiled else "."),
        f"The published TensorRT FP8 figure, {published}×, is {n['short_of_published']:.0%} further: attention "
        "stays in bf16 here.")
    return Findings(n, sentences, f"{run['device']}, {run['date']}")


def memory_ladder(path: str | Path | None = None, preset: str = "large") -> Findings:
    """What each rung of the memory ladder costs, as measured (``benchmarks.memory``), and how well the
    predictor of today matches the measurements."""
    from .memory import load_results, predicted_now_gib

    results = load_results(path)
    rows = {r["strategy"]: r for r in results["ladder"] if r["preset"] == preset and "error" not in r}
    per_step = [rows[s]["s_per_image_28"] for s in rows if "group" in s or "sequential" in s]
    errors = {(r["preset"], r["strategy"]): 100 * (predicted_now_gib(r) - r["measured_gib"]) / r["measured_gib"]
              for r in results["ladder"] if "error" not in r}
    misses = sorted(f"{p} {s} ({e:+.1f}%)" for (p, s), e in errors.items() if abs(e) > 2)
    n = {"resident_gib": rows["resident"]["measured_gib"], "leanest_gib": min(r["measured_gib"] for r in rows.values()),
         "resident_s": rows["resident"]["s_per_image_28"], "fp8_s": rows["fp8"]["s_per_image_28"],
         "model_offload_extra_s": rows["fp8_model_offload"]["s_per_image_28"] - rows["fp8"]["s_per_image_28"],
         "per_step_offload_s": (min(per_step), max(per_step)),
         "offload_host_gib": rows["fp8_model_offload"]["host_peak_gib"],
         "within_2pct": len(errors) - len(misses), "rungs": len(errors), "misses": misses}
    sentences = (
        f"SD3.5 {preset.capitalize()} at 1024²: from {n['resident_gib']:.1f} GiB resident down to "
        f"{n['leanest_gib']:.2f} GiB on the leanest rung ({n['resident_gib'] / n['leanest_gib']:.0f}× less).",
        f"Model offload costs {n['model_offload_extra_s']:.0f} s of transfers per image on top of FP8's "
        f"{n['fp8_s']:.1f} s; group and sequential offload pay every step: "
        f"{n['per_step_offload_s'][0]:.0f}–{n['per_step_offload_s'][1]:.0f} s per image.",
        f"Offloading keeps the weights in host RAM instead: {n['offload_host_gib']:.1f} GiB at the peak with model "
        "offload.",
        f"Today's predictor is within 2% of the measured peak on {n['within_2pct']} of {n['rungs']} rungs"
        + (f"; it misses {', '.join(misses)}." if misses else "."))
    return Findings(n, sentences, f"{results['device']}, {results['date']}")


def tiling(path: str | Path | None = None, size: int = 4096) -> Findings:
    """VAE decode at ``size``² untiled, with diffusers' tiling and with ours; the tiled Large generation."""
    from .tiling import BENCH_JSON

    data = json.loads(Path(path or BENCHMARKS_DIR / Path(BENCH_JSON).name).read_text())
    rows = {r["variant"]: r for r in data["vae"] if r["size"] == size and "error" not in r}
    untiled, ours = rows["untiled"], rows["ours (1 GiB budget)"]
    default = rows["diffusers tiling default"]
    tile = next(m.group(1) for name in rows if (m := re.fullmatch(r"diffusers tiling (\d+px)", name)))
    small, same_tile = rows[f"diffusers tiling {tile}"], rows[f"ours {tile}"]
    n = {"untiled_gib": untiled["peak_gib"], "untiled_s": untiled["seconds"],
         "diffusers_gib": default["peak_gib"], "diffusers_s": default["seconds"],
         "diffusers_error": default["rel_error_vs_untiled"],
         "diffusers_small_gib": small["peak_gib"], "diffusers_small_error": small["rel_error_vs_untiled"],
         "ours_gib": ours["peak_gib"], "ours_s": ours["seconds"], "ours_error": ours["rel_error_vs_untiled"],
         "ours_same_tile_error": same_tile["rel_error_vs_untiled"], "small_tile": tile}
    sentences = [
        f"VAE decode {size}²: untiled {n['untiled_gib']:.1f} GiB / {n['untiled_s']:.1f} s; diffusers' tiling "
        f"{n['diffusers_gib']:.2f} GiB / {n['diffusers_s']:.1f} s (default tiles, {n['diffusers_error']:.1%} error "
        f"vs untiled) or {n['diffusers_small_gib']:.2f} GiB with {n['small_tile']} tiles ({n['diffusers_small_error']:.1%}).",
        f"Ours: {n['ours_gib']:.2f} GiB, {n['ours_error']:.1%} error — "
        f"{n['diffusers_small_error'] / n['ours_same_tile_error']:.0f}× closer than diffusers at the same tile size — "
        f"but {n['ours_s']:.1f} s: every GroupNorm is a barrier that moves all tiles' activations to the CPU and back."]
    large = data.get("large") or {}
    if "peak_gib" in large:
        n.update(large_peak_gib=large["peak_gib"], large_windows=large["windows"], large_window_px=large["window_px"],
                 large_s_per_step=sum(large["seconds_per_step"]) / len(large["seconds_per_step"]),
                 large_decode_s=large["seconds_decode"], large_size=large["size"])
        sentences.append(
            f"SD3.5 Large {n['large_size']}², tiled (FP8 storage, {n['large_windows']} windows of "
            f"{n['large_window_px']} px): peak {n['large_peak_gib']:.2f} GiB, {n['large_s_per_step']:.0f} s per "
            f"step, {n['large_decode_s']:.0f} s for the tiled decode.")
    env = data["environment"]
    return Findings(n, tuple(sentences), f"{env.get('gpu', env['device'])}, torch {env['torch']}, {env['date']}")

"""Whole-image benchmark (``sd35fp8 bench --pipeline``): text encoders + N steps + VAE decode, BF16 vs FP8.

A step benchmark (:mod:`.fp8`) says how fast the transformer is; a user waits for the image. This one times
``pipe(prompt, …)`` end to end on a real-size pipeline with random weights (nothing downloaded), one process:

1. **bf16 eager** — a first call, a timed one at batch 1, one at batch 4 (``num_images_per_prompt``).
2. the same pipeline converted to **FP8** in place (:data:`FP8_PIPELINE_CONFIG`: the transformer in static
   per-tensor FP8 compute, calibrated on :data:`CALIBRATION_PROMPTS` through this random-weight pipeline,
   compiled per block; T5 in FP8 storage) — the first call (compile), a timed one, batch 4 (first and timed),
   then a **size change** (the default side → 7/8 × 9/8 of it, e.g. 1024² → 1152×896 → 1024²) with the
   graphs ``torch.compile`` built for each call counted (``torch._dynamo`` ``unique_graphs``),
3. a **warm start**: a fresh process that builds the same FP8 pipeline and times its first image with the
   inductor cache the first process left on disk (``TORCHINDUCTOR_CACHE_DIR``).

Seconds are wall clock around the call (CUDA synchronised), peak is ``max_memory_allocated`` during the call;
"rel. error" compares the decoded images of the timed batch-1 calls (same seed) with bf16's.

Example (CPU, the tiny preset: bf16 is timed, FP8 compute is skipped with the reason)::

    sd35fp8 bench --pipeline --preset tiny --steps 2
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FP8_PIPELINE_CONFIG: dict[str, Any] = dict(mode="compute", activation_scales="static", weight_scales="row",
                                           fast_accum=True, fuse_qkv=True, text_encoder_3=True)
"""The FP8 whole-image variant: FP8Config fields (the fastest step variant measured on the H200,
``fp8-static-row-qkv``; T5 in FP8 storage). The committed whole-image run used the tensor-wise variant, the
fastest of *its* step runs (``docs/benchmarks/pipeline-large-h200.json`` names its config)."""
CALIBRATION_PROMPTS: tuple[str, ...] = ("a red fox in the snow", "a city street at night in the rain",
                                        "a bowl of fruit on a wooden table")
PROMPT = "a lighthouse on a cliff at sunset, oil painting"
GIB = 2**30


@dataclass
class PipelineCall:
    label: str
    height: int
    width: int
    batch: int
    steps: int
    seconds: float
    s_per_image: float
    images_per_s: float
    peak_gib: float | None
    graphs_compiled: int | None  # torch.compile graphs built during this call (None: eager)


@dataclass
class PipelineVariant:
    variant: str
    description: str
    status: str = "ok"
    weights_gib: float | None = None  # every component
    transformer_gib: float | None = None
    calls: list[PipelineCall] = field(default_factory=list)
    rel_err_vs_bf16: float | None = None
    warm_first_call_s: float | None = None
    warm_graphs_compiled: int | None = None
    report: str = ""  # the FP8Report, as printed

    def call(self, label: str) -> PipelineCall | None:
        return next((c for c in self.calls if c.label == label), None)


@dataclass
class PipelineBenchResult:
    preset: str
    steps: int
    device: str
    versions: dict[str, str]
    date: str
    command: str
    sizes: list[tuple[int, int]]
    variants: list[PipelineVariant] = field(default_factory=list)
    calibration: dict[str, Any] | None = None
    kind: str = "pipeline"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def table(self) -> str:
        head = ("variant", "call", "size", "batch", "s", "s/image", "images/s", "peak GiB", "graphs")
        rows = [head]
        for v in self.variants:
            for c in v.calls:
                rows.append((v.variant, c.label, f"{c.width}x{c.height}", str(c.batch), f"{c.seconds:.2f}",
                             f"{c.s_per_image:.2f}", f"{c.images_per_s:.2f}",
                             "-" if c.peak_gib is None else f"{c.peak_gib:.2f}",
                             "-" if c.graphs_compiled is None else str(c.graphs_compiled)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = [f"SD3.5 {self.preset} whole image ({self.steps} steps, text encoders + VAE decode) — {self.device}"]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        for v in self.variants:
            extra = [] if v.status == "ok" else [v.status]
            if v.rel_err_vs_bf16 is not None:
                extra.append(f"rel. error of the image vs bf16 {v.rel_err_vs_bf16:.4f}")
            if v.warm_first_call_s is not None:
                extra.append(f"warm-start first image {v.warm_first_call_s:.2f} s ({v.warm_graphs_compiled} graphs)")
            if extra:
                lines.append(f"{v.variant}: " + "; ".join(extra))
        return "\n".join(lines)


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _sizes(side: int, multiple: int) -> list[tuple[int, int]]:
    """(height, width): the default square, a landscape of the same area class (7/8 × 9/8), the square again."""
    def snap(x: float) -> int:
        return max(multiple, int(round(x / multiple)) * multiple)

    return [(side, side), (snap(side * 7 / 8), snap(side * 9 / 8)), (side, side)]


def _run(pipe, label: str, height: int, width: int, batch: int, steps: int, guidance: float, device: str,
         compiled: bool, seed: int = 0):
    import torch

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    graphs = _graphs()
    t0 = time.perf_counter()
    with torch.inference_mode():
        image = pipe(prompt=PROMPT, num_inference_steps=steps, height=height, width=width, guidance_scale=guidance,
                     num_images_per_prompt=batch, generator=torch.Generator("cpu").manual_seed(seed),
                     output_type="pt").images
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / GIB if cuda else None
    call = PipelineCall(label, height, width, batch, steps, seconds, seconds / batch, batch / seconds, peak,
                        _graphs() - graphs if compiled else None)
    print(f"  {label}: {width}x{height} batch {batch}: {seconds:.2f} s, peak {peak} GiB, graphs "
          f"{call.graphs_compiled}", file=sys.stderr, flush=True)
    return call, image[:1].float().cpu()


def _weights(pipe) -> tuple[float, float]:
    from ..precision.quantize import module_bytes

    parts = [getattr(pipe, n) for n in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")]
    return sum(module_bytes(m) for m in parts if m is not None) / GIB, module_bytes(pipe.transformer) / GIB


def build_fp8_pipeline(preset: str, device: str, height: int, width: int, steps: int,
                       config: dict[str, Any] | None = None):
    """The random-weight pipeline (seeded), calibrated and converted to ``config`` (:data:`FP8_PIPELINE_CONFIG`)."""
    import torch

    from .memory import build_pipeline

    torch.manual_seed(0)
    pipe = build_pipeline(preset, device)
    return pipe, _to_fp8(pipe, height, width, steps, config)


def _to_fp8(pipe, height: int, width: int, steps: int, config: dict[str, Any] | None = None):
    from ..errors import FP8ComputeUnavailable
    from ..precision.calibration import calibrate_
    from ..precision.compute import fp8_compute_support
    from ..precision.quantize import FP8Config, quantize_

    can, why = fp8_compute_support(pipe.transformer.device)
    if not can:  # before spending a calibration pass
        raise FP8ComputeUnavailable(str(pipe.transformer.device), None, why)

    cal = calibrate_(pipe, CALIBRATION_PROMPTS, steps=min(steps, 3), height=height, width=width)
    report = quantize_(pipe, FP8Config(**(config or FP8_PIPELINE_CONFIG)))
    report.calibration = cal.summary()
    return report


def run_pipeline_bench(preset: str = "large", *, steps: int | None = None, device: str | None = None,
                       batches: tuple[int, ...] = (1, 4), json_path: str | Path | None = None, command: str = "",
                       warm_start: bool = True, deadline: float | None = None,
                       fp8_config: dict[str, Any] | None = None, bf16_warmup: bool = True,
                       with_fp8: bool = True) -> PipelineBenchResult:
    """Run the whole-image benchmark (module docstring); ``json_path`` is rewritten after every call.

    ``fp8_config``: the FP8Config fields of the FP8 variant (default :data:`FP8_PIPELINE_CONFIG`).
    ``bf16_warmup``: one untimed-for-the-table bf16 call first (recorded as "first call"), so the timed one
    excludes cuBLAS/cuDNN set-up. ``with_fp8=False`` measures bf16 only.
    """
    import torch

    from ..errors import FP8ComputeUnavailable
    from ..pipeline.loading import default_device
    from ..presets import get_preset
    from ..versions import library_versions
    from .memory import build_pipeline

    p = get_preset(preset)
    device = device or default_device()
    steps = steps or p.default_steps
    side = p.default_side_px
    sizes = _sizes(side, p.size_multiple)
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)"
    result = PipelineBenchResult(preset, steps, name, library_versions(optional=True), time.strftime("%Y-%m-%d"),
                                 command, sizes)

    def write() -> None:
        if json_path and str(json_path) != "-":
            Path(json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(json_path).write_text(result.to_json() + "\n")

    def late(margin: float = 0.0) -> bool:
        return deadline is not None and time.monotonic() > deadline - margin

    torch.manual_seed(0)
    pipe = build_pipeline(preset, device)
    pipe.set_progress_bar_config(disable=True)
    guidance = p.default_guidance
    bf16 = PipelineVariant("bf16", "bf16 eager: text encoders, transformer, VAE")
    bf16.weights_gib, bf16.transformer_gib = _weights(pipe)
    result.variants.append(bf16)
    if bf16_warmup:
        bf16.calls.append(_run(pipe, "first call", side, side, 1, steps, guidance, device, compiled=False)[0])
    call, reference = _run(pipe, "timed", side, side, 1, steps, guidance, device, compiled=False)
    bf16.calls.append(call)
    write()
    for b in batches:
        if b > 1 and not late():
            bf16.calls.append(_run(pipe, f"batch {b}", side, side, b, steps, guidance, device, compiled=False)[0])
            write()

    if not with_fp8:
        return result
    config = dict(fp8_config or FP8_PIPELINE_CONFIG)
    fp8 = PipelineVariant("fp8", "FP8 compute transformer (" + ", ".join(f"{k}={v}" for k, v in config.items()
                                                                        if k not in ("mode",)) +
                          "), per-block compile; T5 FP8 storage; CLIPs and VAE bf16")
    result.variants.append(fp8)
    try:
        report = _to_fp8(pipe, side, side, steps, config)
    except FP8ComputeUnavailable as e:
        fp8.status = f"skipped: {e.one_line.split(' fix:')[0]}"
        write()
        return result
    result.calibration = report.calibration
    fp8.report = str(report)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    fp8.weights_gib, fp8.transformer_gib = _weights(pipe)
    plan = [("first call", side, side, 1), ("timed", side, side, 1)]
    for b in batches:
        if b > 1:
            plan += [(f"batch {b} (first)", side, side, b), (f"batch {b}", side, side, b)]
    (h2, w2), (h3, w3) = sizes[1], sizes[2]
    plan += [("size change (first)", h2, w2, 1), ("back to the first size", h3, w3, 1)]
    for label, h, w, b in plan:
        if late() and label != "first call":
            fp8.status = f"ok (stopped before '{label}': out of the run's time budget)"
            break
        call, image = _run(pipe, label, h, w, b, steps, guidance, device, compiled=True)
        fp8.calls.append(call)
        if label == "timed":
            fp8.rel_err_vs_bf16 = float((image - reference).norm() / reference.norm())
        write()
    del pipe
    if warm_start and not late(margin=45):  # a new process builds the pipeline again: ~30 s for Large
        fp8.warm_first_call_s, fp8.warm_graphs_compiled = _warm_first_call(preset, steps, device, config)
        write()
    return result


def _warm_first_call(preset: str, steps: int, device: str, config: dict[str, Any]) -> tuple[float | None, int | None]:
    """First-image seconds of the FP8 pipeline in a new process that reuses this process's inductor cache."""
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    cmd = [sys.executable, "-m", "sd35fp8_helpers.benchmarks.pipeline", "--child", preset, str(steps), device,
           json.dumps(config)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode:
        print(proc.stderr[-3000:], file=sys.stderr)
        return None, None
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    return data["first_call_s"], data["graphs"]


def _child(preset: str, steps: int, device: str, config: dict[str, Any]) -> None:
    from ..presets import get_preset

    p = get_preset(preset)
    side = p.default_side_px
    pipe, _ = build_fp8_pipeline(preset, device, side, side, steps, config)
    pipe.set_progress_bar_config(disable=True)
    call, _ = _run(pipe, "warm first call", side, side, 1, steps, p.default_guidance, device, compiled=True)
    print(json.dumps({"first_call_s": call.seconds, "graphs": call.graphs_compiled}))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _child(sys.argv[2], int(sys.argv[3]), sys.argv[4], json.loads(sys.argv[5]))


def load_pipeline_results(folder: str | Path | None = None) -> list[dict[str, Any]]:
    """The ``pipeline-*.json`` files written by ``sd35fp8 bench --pipeline`` (default folder: ``docs/benchmarks``)."""
    from ..constants import BENCHMARKS_DIR

    return [json.loads(p.read_text()) for p in sorted(Path(folder or BENCHMARKS_DIR).glob("pipeline-*.json"))]


def pipeline_markdown(data: dict[str, Any]) -> str:
    """One whole-image JSON as a Markdown table (what docs/benchmarks.md shows): a row per timed call."""
    lines = ["| variant | call | size | batch | s | s/image | images/s | peak GiB | graphs compiled |",
             "|---" * 9 + "|"]
    for v in data["variants"]:
        for c in v["calls"]:
            graphs = "-" if c["graphs_compiled"] is None else str(c["graphs_compiled"])
            peak = "-" if c["peak_gib"] is None else f"{c['peak_gib']:.2f}"
            lines.append(f"| {v['variant']} | {c['label']} | {c['width']}×{c['height']} | {c['batch']} | "
                         f"{c['seconds']:.2f} | {c['s_per_image']:.2f} | {c['images_per_s']:.2f} | {peak} | {graphs} |")
        if v["status"] != "ok":
            lines.append(f"| {v['variant']} | {v['status']} |" + " |" * 7)
    return "\n".join(lines)

"""Benchmark the SD3.5 transformer step in bf16 and FP8: weights, peak memory, ms/step, compile time.

One "step" is what a sampler does once per denoising step: one transformer forward **with CFG** (batch 2 —
conditional and unconditional), at the real latent size (1024² → 128×128×16 latents, 4096 image tokens) and
333 text tokens (77 CLIP + 256 T5); for Large Turbo (guidance 0: no CFG) a step is batch 1. Inputs and weights are random (N(0, 0.02)): at real size that measures
speed and memory faithfully without downloading 16 GB. The text encoders and the VAE are outside the step
(they run once per image); ``--t5`` measures T5-XXL's bytes in bf16 and FP8 storage on its own.

Methodology: build each variant fresh, warm up, synchronise, time with CUDA events, report the median;
peak memory from ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. Compiled variants
report the first call (compile + one step) and, with ``--warm-start``, the first call of a *second process*
that finds the inductor cache on disk (``TORCHINDUCTOR_CACHE_DIR``).

Example (CPU, seconds)::

    sd35fp8 bench --preset tiny --variants bf16 fp8-storage --height 128 --width 128 --repeats 2
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..constants import BENCHMARKS_DIR

VARIANTS: dict[str, str] = {
    "bf16": "bf16 eager",
    "bf16+compile": "bf16 + torch.compile (per block)",
    "fp8-storage": "FP8 storage (all-linear, per-row scales), eager",
    "fp8-storage+compile": "FP8 storage + torch.compile (per block)",
    "fp8-compute": "torchao FP8 dynamic row-wise + torch.compile (per block)",
    "fp8-compute+model-compile": "torchao FP8 dynamic row-wise + torch.compile (whole model)",
    "fp8-compute-eager": "torchao FP8 dynamic row-wise, no compile",
    "fp8-compute-qkv": "torchao FP8 dynamic row-wise + fused QKV + torch.compile (per block)",
    "fp8-static": "FP8 static per-tensor (calibrated) activations, per-tensor weights + torch.compile (per block)",
    "fp8-static-fast": "FP8 static per-tensor, fast accumulation + torch.compile (per block)",
    "fp8-static-fast-qkv": "FP8 static per-tensor, fast accumulation, fused QKV + torch.compile (per block)",
    "fp8-static-row": "FP8 static per-tensor activations, per-row weights (row-wise GEMM), fast accumulation "
                      "+ torch.compile (per block)",
    "fp8-static-row-qkv": "FP8 static per-tensor activations, per-row weights (row-wise GEMM), fast accumulation, "
                          "fused QKV + torch.compile (per block)",
}
STATIC_CONFIGS: dict[str, dict[str, Any]] = {
    "fp8-static": dict(activation_scales="static", weight_scales="tensor"),
    "fp8-static-fast": dict(activation_scales="static", weight_scales="tensor", fast_accum=True),
    "fp8-static-fast-qkv": dict(activation_scales="static", weight_scales="tensor", fast_accum=True, fuse_qkv=True),
    "fp8-static-row": dict(activation_scales="static", weight_scales="row", fast_accum=True),
    "fp8-static-row-qkv": dict(activation_scales="static", weight_scales="row", fast_accum=True, fuse_qkv=True),
    "fp8-compute-qkv": dict(fuse_qkv=True),
}
"""FP8Config fields of the variants beyond plain torchao dynamic (fp8-compute)."""
CALIBRATION_PASSES: tuple[tuple[int, float], ...] = ((11, 900.0), (12, 500.0), (13, 100.0))
"""Random weights have no prompts worth the name: the static variants calibrate on these random-input
forward passes (input seed, timestep) — other inputs than the timed ones (seed 1, timestep 500)."""
DEFAULT_VARIANTS = ("bf16", "bf16+compile", "fp8-storage", "fp8-compute")
TEXT_TOKENS = 333
"""77 CLIP tokens + 256 T5 tokens: the joint-attention text length of StableDiffusion3Pipeline."""
WEIGHT_STD = 0.02


@dataclass
class VariantResult:
    variant: str
    description: str
    status: str = "ok"  # ok | skipped: reason | failed: error
    weights_gib: float | None = None
    peak_gib: float | None = None
    ms_per_step: float | None = None
    ms_all: list[float] = field(default_factory=list)
    s_per_image: float | None = None
    speedup: float | None = None
    first_call_s: float | None = None
    warm_first_call_s: float | None = None
    rel_err_vs_bf16: float | None = None
    profile: dict[str, Any] | None = None
    """CUDA kernel time of one step by kind (attention, GEMM, Triton, other), when asked for."""


@dataclass
class BenchResult:
    preset: str
    height: int
    width: int
    steps: int
    device: str
    versions: dict[str, str]
    date: str
    command: str
    variants: list[VariantResult]
    text_encoder_3: dict[str, Any] | None = None
    batch: int = 2
    """Transformer batch of one step: 2 with CFG (Large, Medium), 1 without (Large Turbo, guidance 0)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def table(self) -> str:
        head = ("variant", "weights GiB", "peak GiB", "ms/step", f"s/image ({self.steps})", "speed-up",
                "1st call s", "warm 1st s", "rel.err")
        rows = [head]
        for v in (v for v in self.variants if v.status == "ok"):
            rows.append((v.variant, _gib(v.weights_gib), _gib(v.peak_gib), _f(v.ms_per_step, 1),
                         _f(v.s_per_image, 2), _f(v.speedup, 2, "x"), _f(v.first_call_s, 1),
                         _f(v.warm_first_call_s, 1), _f(v.rel_err_vs_bf16, 4)))
        widths = [max(len(r[i]) for r in rows if len(r) > i) for i in range(len(head))]
        step = "CFG batch 2" if self.batch == 2 else f"batch {self.batch} (no CFG)"
        lines = [f"SD3.5 {self.preset} transformer, {self.width}x{self.height}, {step}, "
                 f"{TEXT_TOKENS} text tokens — {self.device}"]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines += [f"{v.variant}: {v.status}" for v in self.variants if v.status != "ok"]
        if self.text_encoder_3:
            t = self.text_encoder_3
            lines.append(f"T5 encoder: {_gib(t['bf16_gib'])} GiB bf16 -> {_gib(t['fp8_gib'])} GiB FP8 storage "
                         f"({t['layers']} Linears), rel.err of its output {t['rel_err']:.4f}")
        return "\n".join(lines)


def _f(x: float | None, digits: int, suffix: str = "") -> str:
    return "-" if x is None else f"{x:.{digits}f}{suffix}"


def _gib(x: float | None) -> str:
    return _f(x, 2 if x is None or x >= 0.1 else 5)


# --- building blocks --------------------------------------------------------------------------------------

def _random_weights_(model, seed: int) -> None:
    """N(0, 0.02) for every matrix/conv weight and bias (norm scales keep their ones), deterministic:
    every variant of one run gets identical weights, so their outputs can be compared."""
    import torch

    gen_device = next(model.parameters()).device
    g = torch.Generator(gen_device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 or name.endswith("bias"):
                p.normal_(0.0, WEIGHT_STD, generator=g)


def build_transformer(preset: str, device: str, *, seed: int = 0):
    """The preset's transformer in bf16 on ``device`` with seeded random weights."""
    import torch

    from ..presets import instantiate_transformer

    model = instantiate_transformer(preset, device=device, dtype=torch.bfloat16).eval()
    _random_weights_(model, seed)
    return model


def step_inputs(model, height: int, width: int, device: str, *, seed: int = 1, batch: int = 2,
                timestep: float = 500.0) -> dict[str, Any]:
    """Random inputs of one step: latents (16, H/8, W/8), 333 text tokens, pooled vectors; ``batch`` 2 = one
    CFG step (conditional + unconditional), 1 = a guidance-free step (Large Turbo)."""
    import torch

    cfg = model.config
    g = torch.Generator("cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device, torch.bfloat16)

    return dict(hidden_states=randn(batch, cfg.in_channels, height // 8, width // 8),
                encoder_hidden_states=randn(batch, TEXT_TOKENS, cfg.joint_attention_dim),
                pooled_projections=randn(batch, cfg.pooled_projection_dim),
                timestep=torch.tensor([timestep] * batch, device=device), return_dict=False)


class _Timer:
    def __init__(self, device: str) -> None:
        import torch

        self.cuda = device.startswith("cuda")
        self.torch = torch

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def time_ms(self, fn) -> float:
        if self.cuda:
            start, end = (self.torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1000


def calibrate_random(model, height: int, width: int, device: str, batch: int = 2):
    """Static scales for a random-weight transformer: activation amax over :data:`CALIBRATION_PASSES`."""
    from ..precision.calibration import record_activation_amax, set_activation_scales_

    def run() -> None:
        for seed, t in CALIBRATION_PASSES:
            model(**step_inputs(model, height, width, device, seed=seed, batch=batch, timestep=t))

    cal = record_activation_amax(model, run, source=f"{len(CALIBRATION_PASSES)} random-input forward passes "
                                                    f"(timesteps {', '.join(str(int(t)) for _, t in CALIBRATION_PASSES)})")
    set_activation_scales_(model, cal)
    return cal


def _prepare(name: str, model, *, height: int = 1024, width: int = 1024, device: str = "cpu", batch: int = 2) -> None:
    from ..precision.compute import compile_transformer, fp8_compute_support
    from ..precision.quantize import FP8Config, quantize_

    if name.startswith("fp8-storage"):
        quantize_(model, FP8Config(mode="storage"))
    elif name.startswith("fp8-static"):
        if not fp8_compute_support(device)[0]:  # say why before spending a calibration pass
            quantize_(model, FP8Config(mode="compute"))
        calibrate_random(model, height, width, device, batch)
        quantize_(model, FP8Config(mode="compute", **STATIC_CONFIGS[name]))
    elif name.startswith("fp8-compute"):
        quantize_(model, FP8Config(mode="compute", compile=name != "fp8-compute-eager",
                                   compile_scope="model" if name.endswith("model-compile") else "blocks",
                                   **STATIC_CONFIGS.get(name, {})))
    if name in ("bf16+compile", "fp8-storage+compile"):
        compile_transformer(model, "blocks")


_ATTENTION = ("flash", "fmha", "cudnn", "sdpa", "attention")
_GEMM = ("gemm", "nvjet", "cutlass", "xmma", "sm90", "scaled_mm", "matmul")


def profile_step(fn, device: str) -> dict[str, Any]:
    """CUDA kernel time of one call of ``fn`` by kind: attention, GEMM, Triton (fused elementwise), other.

    Kernel names decide the kind (cuDNN/flash → attention; cuBLAS ``nvjet``/cutlass/xmma → GEMM; ``triton_``
    → Triton). Also returns the 12 most expensive kernels, so the split can be checked by eye.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    kinds = {"attention": 0.0, "gemm": 0.0, "triton": 0.0, "other": 0.0}
    counts = {k: 0 for k in kinds}
    top = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", 0.0) or getattr(e, "device_time_total", 0.0)
        if not us:
            continue
        name = e.key.lower()
        kind = ("attention" if any(a in name for a in _ATTENTION) else "triton" if name.startswith("triton")
                else "gemm" if any(g in name for g in _GEMM) else "other")
        kinds[kind] += us / 1000
        counts[kind] += e.count
        top.append((us / 1000, e.count, e.key[:120]))
    top.sort(reverse=True)
    return {"ms": {k: round(v, 2) for k, v in kinds.items()}, "calls": counts,
            "total_ms": round(sum(kinds.values()), 2),
            "top": [{"ms": round(ms, 3), "calls": n, "kernel": k} for ms, n, k in top[:12]]}


def run_variant(name: str, preset: str, height: int, width: int, steps: int, device: str, *,
                warmup: int = 3, repeats: int = 7, reference=None, profile: bool = False) -> tuple[VariantResult, Any]:
    """Build, convert, warm up and time one variant. Returns the result and its output (for error checks)."""
    import torch

    from ..errors import FP8ComputeUnavailable
    from ..precision.quantize import module_bytes

    res = VariantResult(name, VARIANTS[name])
    cuda = device.startswith("cuda")
    t0 = time.perf_counter()
    model = build_transformer(preset, device)
    from ..presets import get_preset

    batch = get_preset(preset).step_batch
    try:
        _prepare(name, model, height=height, width=width, device=device, batch=batch)
        print(f"  {name}: built and converted in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    except FP8ComputeUnavailable as e:
        res.status = f"skipped: {e.one_line.split(' fix:')[0]}"
        return res, None
    res.weights_gib = module_bytes(model) / 2**30
    inputs = step_inputs(model, height, width, device, batch=batch)
    timer = _Timer(device)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        timer.sync()
        t0 = time.perf_counter()
        out = model(**inputs)[0]
        timer.sync()
        res.first_call_s = time.perf_counter() - t0
        for _ in range(max(warmup - 1, 0)):
            model(**inputs)
        res.ms_all = [round(timer.time_ms(lambda: model(**inputs)), 3) for _ in range(repeats)]
        out = model(**inputs)[0].float().cpu()
        if profile and cuda:
            res.profile = profile_step(lambda: model(**inputs), device)
    res.ms_per_step = statistics.median(res.ms_all)
    res.s_per_image = res.ms_per_step * steps / 1000
    if cuda:
        res.peak_gib = torch.cuda.max_memory_allocated() / 2**30
    if reference is not None:
        res.rel_err_vs_bf16 = float((out - reference).norm() / reference.norm())
    del model, inputs
    _free(cuda)
    return res, out


def _free(cuda: bool) -> None:
    """Drop compiled graphs (their guards keep the model alive) and cached blocks before the next variant."""
    import gc

    import torch

    torch._dynamo.reset()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def measure_t5(preset: str, device: str) -> dict[str, Any]:
    """T5-XXL (real config) in bf16, then FP8 storage: bytes, and the relative error of its output."""
    import torch
    from transformers import T5Config, T5EncoderModel

    from ..precision.policies import TEXT_ENCODER_POLICY
    from ..precision.quantize import module_bytes
    from ..precision.storage import to_storage
    from ..presets import get_preset

    with torch.device(device):
        t5 = T5EncoderModel(T5Config(**{"vocab_size": 32128, **get_preset(preset).t5})).to(torch.bfloat16).eval()
    _random_weights_(t5, seed=2)
    ids = torch.randint(0, 32000, (1, 256), generator=torch.Generator("cpu").manual_seed(3)).to(device)
    with torch.inference_mode():
        ref = t5(ids).last_hidden_state.float()
        bf16 = module_bytes(t5)
        layers = to_storage(t5, TEXT_ENCODER_POLICY)
        out = t5(ids).last_hidden_state.float()
    return {"bf16_gib": bf16 / 2**30, "fp8_gib": module_bytes(t5) / 2**30, "layers": len(layers),
            "rel_err": float((out - ref).norm() / ref.norm())}


def run_bench(preset: str = "tiny", *, height: int | None = None, width: int | None = None, steps: int | None = None,
              variants: tuple[str, ...] = DEFAULT_VARIANTS, device: str | None = None, warmup: int = 3,
              repeats: int = 7, warm_start: bool | tuple[str, ...] = False, t5: bool = False, command: str = "",
              json_path: str | Path | None = None, profile: tuple[str, ...] = (),
              deadline: float | None = None) -> BenchResult:
    """Time every variant of one preset; optionally re-run compiled ones in a fresh process (warm cache).

    ``json_path`` is rewritten after every variant, so a run stopped by a time limit keeps what it measured.
    ``warm_start``: True (every compiled FP8 variant) or the names to re-run. ``profile``: variants whose
    step is also profiled (CUDA kernel time by kind). ``deadline`` (``time.monotonic()``): variants not
    started by then are recorded as skipped — the GPU lease is short.
    """
    import torch

    from ..pipeline.loading import default_device
    from ..presets import get_preset
    from ..versions import library_versions

    p = get_preset(preset)
    device = device or default_device()
    height = height or p.default_side_px
    width = width or p.default_side_px
    steps = steps or p.default_steps
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        from ..errors import Sd35fp8Error

        raise Sd35fp8Error(f"unknown variant(s) {unknown}", fix=f"choose from {', '.join(VARIANTS)}")
    versions = library_versions(optional=True)
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)"
    result = BenchResult(preset, height, width, steps, name, versions, time.strftime("%Y-%m-%d"), command, [],
                         batch=p.step_batch)
    reference = None
    for v in variants:
        if deadline is not None and time.monotonic() > deadline:
            result.variants.append(VariantResult(v, VARIANTS[v], status="skipped: out of the run's time budget"))
            continue
        try:
            res, out = run_variant(v, preset, height, width, steps, device, warmup=warmup, repeats=repeats,
                                   reference=reference, profile=v in profile)
        except Exception as e:  # keep the other variants' numbers; the table shows the failure
            res, out = VariantResult(v, VARIANTS[v], status=f"failed: {type(e).__name__}: {str(e)[:300]}"), None
            _free(device.startswith("cuda"))
        if v == "bf16" and out is not None:
            reference = out
        result.variants.append(res)
        base = next((r for r in result.variants if r.variant == "bf16" and r.ms_per_step), None)
        if base and res.ms_per_step:
            res.speedup = base.ms_per_step / res.ms_per_step
        print(f"  {v}: {res.status}, {_f(res.ms_per_step, 1)} ms/step", file=sys.stderr, flush=True)
        _write(result, json_path)
    if warm_start:
        for r in result.variants:
            wanted = (r.variant in warm_start) if isinstance(warm_start, tuple) else (
                _compiled(r.variant) and (r.variant.startswith("fp8") or not device.startswith("cuda")))
            if r.status == "ok" and wanted and (deadline is None or time.monotonic() < deadline):
                r.warm_first_call_s = _warm_first_call(r.variant, preset, height, width, device)
                _write(result, json_path)
    if t5:
        result.text_encoder_3 = measure_t5(preset, device)
        _write(result, json_path)
    return result


def _write(result: BenchResult, json_path: str | Path | None) -> None:
    if json_path and str(json_path) != "-":
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(result.to_json() + "\n")


def _compiled(variant: str) -> bool:
    return ("compile" in variant or variant.startswith(("fp8-static", "fp8-compute"))) and variant != "fp8-compute-eager"


def _warm_first_call(variant: str, preset: str, height: int, width: int, device: str) -> float | None:
    """First-call seconds of ``variant`` in a new process that reuses this process's inductor cache.

    On CUDA only the FP8 variants are re-run (each re-run rebuilds the model: device time is scarce)."""
    cmd = [sys.executable, "-m", "sd35fp8_helpers.cli", "bench", "--preset", preset, "--height", str(height),
           "--width", str(width), "--variants", variant, "--repeats", "1", "--warmup", "1", "--device", device,
           "--json", "-"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode:
        print(proc.stderr[-2000:], file=sys.stderr)
        return None
    data = json.loads(proc.stdout[proc.stdout.index("{"):])
    return data["variants"][0]["first_call_s"]


def benchmarks_folder() -> Path:
    """``docs/benchmarks`` of this repository: the JSON measured on the GPU machine and committed."""
    return BENCHMARKS_DIR


def load_results(folder: str | Path) -> list[dict[str, Any]]:
    """The ``fp8-*.json`` files written by ``sd35fp8 bench`` in ``folder`` (e.g. ``docs/benchmarks``), merged per
    preset, size and device: each variant's first successful measurement is kept (its speed-up was computed
    against the bf16 eager run of the same process)."""
    merged: dict[tuple, dict[str, Any]] = {}
    for path in sorted(Path(folder).glob("fp8-*.json")):
        data = json.loads(path.read_text())
        key = (data["preset"], data["width"], data["height"], data["device"])
        if key not in merged:
            merged[key] = {**data, "variants": []}
        have = {v["variant"]: i for i, v in enumerate(merged[key]["variants"])}
        for v in data["variants"]:
            if v["variant"] not in have:
                merged[key]["variants"].append(v)
            elif v["status"] == "ok" and merged[key]["variants"][have[v["variant"]]]["status"] != "ok":
                merged[key]["variants"][have[v["variant"]]] = v
    order = list(VARIANTS)
    for data in merged.values():
        data["variants"].sort(key=lambda v: order.index(v["variant"]))
    return list(merged.values())


def plot_results(results: list[dict[str, Any]]):
    """Bar chart of ms/step per variant, one panel per preset, titled with the device (a matplotlib Figure)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.4), squeeze=False)
    for ax, r in zip(axes[0], results):
        ok = [v for v in r["variants"] if v["status"] == "ok"]
        names = [v["variant"] for v in ok]
        ms = [v["ms_per_step"] for v in ok]
        bars = ax.barh(names, ms, color=["#888" if n.startswith("bf16") else "#2a7" for n in names])
        for bar, v in zip(bars, ok):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {v['ms_per_step']:.0f} ms "
                    f"({v['speedup']:.2f}x, {v['weights_gib']:.1f} GiB)", va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, max(ms) * 1.6)
        ax.set_xlabel("ms per CFG step (lower is better)")
        ax.set_title(f"SD3.5 {r['preset']} {r['width']}² — {r['device']}", fontsize=9)
    fig.tight_layout()
    return fig


def markdown_table(data: dict[str, Any]) -> str:
    """One benchmark JSON as a Markdown table (what docs/benchmarks.md shows)."""
    lines = [f"| variant | weights GiB | peak GiB | ms/step | s/image ({data['steps']} steps) | vs bf16 eager "
             "| first call s | warm-start first call s | rel. error vs bf16 |", "|---" * 9 + "|"]
    base = next((v["ms_per_step"] for v in data["variants"] if v["variant"] == "bf16" and v["ms_per_step"]), None)
    for v in data["variants"]:
        if v["status"] != "ok":
            lines.append(f"| {v['variant']} | {v['status']} |" + " |" * 7)
            continue
        speed = base / v["ms_per_step"] if base else None
        lines.append(f"| {v['description']} | {_gib(v['weights_gib'])} | {_gib(v['peak_gib'])} | "
                     f"{v['ms_per_step']:.1f} | {v['s_per_image']:.2f} | {_f(speed, 2, '×')} | "
                     f"{_f(v['first_call_s'], 1)} | {_f(v['warm_first_call_s'], 1)} | {_f(v['rel_err_vs_bf16'], 4)} |")
    return "\n".join(lines)


def profile_markdown(profile: dict[str, Any], ms_per_step: float) -> str:
    """A variant's step profile (``--profile``) as the Markdown table docs/benchmarks.md shows."""
    names = {"attention": "attention (cuDNN SDPA, bf16, and the Triton kernels named after it)",
             "gemm": "FP8 GEMMs (cuBLAS)", "triton": "Triton fused elementwise/reduction kernels", "other": "other"}
    lines = ["| part | ms | kernels |", "|---|---|---|"]
    lines += [f"| {names[k]} | {ms:.1f} | {profile['calls'][k]} |" for k, ms in profile["ms"].items()]
    lines.append(f"| idle between kernels (step {ms_per_step:.1f} ms − kernels {profile['total_ms']:.1f} ms) | "
                 f"{ms_per_step - profile['total_ms']:.1f} | |")
    return "\n".join(lines)


def real_size_bytes(preset: str = "large") -> dict[str, dict[str, float]]:
    """GiB of the real-size transformer per policy and of T5-XXL, bf16 → FP8 storage — computed exactly on the
    ``meta`` device (no memory, no GPU): the same conversion code, without the numbers."""
    import torch
    from transformers import T5Config, T5EncoderModel

    from ..precision.policies import POLICIES, TEXT_ENCODER_POLICY
    from ..precision.quantize import module_bytes
    from ..precision.storage import to_storage
    from ..presets import get_preset, instantiate_transformer

    out = {}
    for name, policy in POLICIES.items():
        model = instantiate_transformer(preset, device="meta").to(torch.bfloat16)
        before = module_bytes(model)
        layers = to_storage(model, policy)
        out[f"transformer {name}"] = {"bf16_gib": before / 2**30, "fp8_gib": module_bytes(model) / 2**30,
                                      "layers": len(layers)}
    with torch.device("meta"):
        t5 = T5EncoderModel(T5Config(**{"vocab_size": 32128, **get_preset(preset).t5})).to(torch.bfloat16)
    before = module_bytes(t5)
    layers = to_storage(t5, TEXT_ENCODER_POLICY)
    out["text_encoder_3 (T5-XXL)"] = {"bf16_gib": before / 2**30, "fp8_gib": module_bytes(t5) / 2**30,
                                      "layers": len(layers)}
    return out

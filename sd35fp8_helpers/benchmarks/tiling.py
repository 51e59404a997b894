"""Benchmark: tiled VAE decode (ours vs diffusers' ``enable_tiling`` vs untiled) and tiled Large generation.

Real-size SD3 VAE (``presets.LARGE.vae``, PyTorch default initialisation — GroupNorm keeps activations in
range, so errors are meaningful) and, optionally, the SD3.5 Large transformer with random N(0, 0.02) weights
in FP8 storage (``fp8.quantize_``). Prints a table and writes JSON. Run on the GPU machine::

    python3 -m sd35fp8_helpers.benchmarks.tiling --json $OUT/tiling.json            # VAE only
    python3 -m sd35fp8_helpers.benchmarks.tiling --json $OUT/tiling.json --large   # + Large 4096² generation

On a CPU, ``--preset tiny --sizes 256 512`` checks that the script works.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from ..constants import REPO_ROOT
from ..highres.tiling import TileConfig, decode_tiled, decode_with_diffusers, plan_tiles
from ..presets import get_preset

EQUAL_TILE_PX = 512
"""Tile side for the like-for-like comparison: diffusers' default (1024 px) never tiles a 1024² image."""


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _measure(fn: Callable[[], Any], device: str, repeats: int) -> tuple[Any, float, float]:
    """(last output, median seconds, peak GiB allocated) over ``repeats`` runs after one warm-up."""
    import torch

    out = fn() if repeats > 1 else None  # one run only (4096²): the smaller sizes warmed everything up
    _sync(device)
    times = []
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        out = None
        start = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    return out, statistics.median(times), peak


def _rel_error(a, ref) -> float:
    return float((a.float() - ref.float()).norm() / ref.float().norm())


def bench_vae(preset: str, sizes: list[int], device: str, dtype, repeats: int,
              rows: list[dict] | None = None, save: Callable[[], None] = lambda: None) -> list[dict]:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    with torch.device(device):
        vae = AutoencoderKL(**get_preset(preset).component_configs()["vae"]).to(dtype).eval()
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    tile = min(EQUAL_TILE_PX, max(sizes) // 2)
    rows = [] if rows is None else rows
    for size in sizes:
        z = torch.randn(1, vae.config.latent_channels, size // factor, size // factor,
                        generator=torch.Generator().manual_seed(size)).to(device, dtype)
        ref = None

        def untiled():
            return decode_with_diffusers(vae, z)

        def diffusers_tiled(t):
            return lambda: decode_with_diffusers(vae, z, t)

        ours_equal = TileConfig(tile_px=tile, progress=False)
        ours_budget = TileConfig(progress=False)
        variants = [("untiled", untiled, None),
                    (f"diffusers tiling {tile}px", diffusers_tiled(tile), None),
                    (f"ours {tile}px", lambda: decode_tiled(vae, z, ours_equal), ours_equal),
                    ("ours (1 GiB budget)", lambda: decode_tiled(vae, z, ours_budget), ours_budget)]
        if size > vae.config.sample_size:
            variants.insert(2, ("diffusers tiling default", diffusers_tiled(vae.config.sample_size), None))
        for name, fn, cfg in variants:
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            try:
                out, seconds, peak = _measure(fn, device, repeats if size <= 2048 else 1)
            except torch.OutOfMemoryError:
                rows.append({"size": size, "variant": name, "error": "out of memory"})
                continue
            out = out.float().cpu()
            if name == "untiled":
                ref = out
            row = {"size": size, "variant": name, "seconds": round(seconds, 4),
                   "peak_gib": round(peak, 3), "rel_error_vs_untiled": None if ref is None or name == "untiled"
                   else round(_rel_error(out, ref), 6)}
            if cfg is not None:
                plan = plan_tiles(vae, size, size, cfg)
                row.update(tiles=len(plan), tile_px=plan.tile_px)
            rows.append(row)
            print(json.dumps(row), flush=True)
            save()
            del out
        del ref, z
    return rows


def bench_large(size: int, steps: int, device: str, preset: str = "large") -> dict:
    """SD3.5 Large (random N(0, 0.02), FP8 storage) tiled generation at ``size``², real VAE, no text encoders
    (random prompt embeddings of the real shapes: the text encoders run once and are not what tiling changes)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        StableDiffusion3Pipeline,
    )

    from ..highres.tiled_diffusion import (
        Conditioning,
        TiledDiffusionConfig,
        generate_tiled,
        plan_windows,
    )
    from ..pipeline.generation import GenerationSettings
    from ..presets import instantiate_transformer

    cuda = device.startswith("cuda")
    spec = get_preset(preset)
    torch.manual_seed(0)
    transformer = instantiate_transformer(spec, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in transformer.parameters():
            p.normal_(0, 0.02)
    how = "sd35fp8_helpers.precision.fp8.quantize_(storage, all-linear)"
    try:
        from ..precision.quantize import FP8Config, quantize_

        quantize_(transformer, FP8Config(mode="storage"))
    except Exception as exc:  # the fp8 module is another helper's work: fall back to diffusers' casting
        how = f"diffusers enable_layerwise_casting (fp8 module failed: {exc!r})"
        transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16,
                                             skip_modules_pattern=("pos_embed",))
    with torch.device(device):
        vae = AutoencoderKL(**spec.component_configs()["vae"]).to(torch.bfloat16).eval()
    pipe = StableDiffusion3Pipeline(transformer=transformer, vae=vae,
                                    scheduler=FlowMatchEulerDiscreteScheduler(**spec.scheduler),
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    weights_gib = torch.cuda.memory_allocated() / 2**30 if cuda else float("nan")
    g = torch.Generator().manual_seed(1)
    t = spec.transformer
    cond = Conditioning(torch.randn(2, 333, t["joint_attention_dim"], generator=g).to(device, torch.bfloat16),
                        torch.randn(2, t["pooled_projection_dim"], generator=g).to(device, torch.bfloat16), 3.5)
    window = spec.default_side_px
    config = TiledDiffusionConfig(window_px=window, overlap_px=window // 4, activation_memory=1 << 30,
                                  vae=TileConfig(tile_memory=512 << 20, progress=False))
    settings = GenerationSettings("random weights", steps=steps, guidance_scale=3.5, height=size, width=size)
    plan = plan_windows(pipe, size, size, config)
    step_times: list[float] = []
    last = [time.perf_counter()]

    def on_step(i, n):
        _sync(device)
        step_times.append(time.perf_counter() - last[0])
        last[0] = time.perf_counter()

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    last[0] = start
    result = generate_tiled(pipe, settings, config, conditioning=cond, on_step=on_step, progress=False)
    _sync(device)
    total = time.perf_counter() - start
    row = {"preset": preset, "size": size, "steps": steps, "windows": len(plan), "window_px": window,
           "overlap_px": window // 4, "fp8": how, "weights_gib": round(weights_gib, 3),
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
           "seconds_total": round(total, 2), "seconds_per_step": [round(t, 2) for t in step_times],
           "seconds_decode": round(total - sum(step_times), 2), "image_size": list(result.image.size)}
    print(json.dumps(row), flush=True)
    return row


def environment(device: str) -> dict:
    import platform

    import torch

    from ..versions import library_versions

    env = {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(),
           **library_versions(optional=True), "device": device}
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    return env


def table(rows: list[dict]) -> str:
    lines = [f"{'size':>6} {'variant':<26} {'peak GiB':>9} {'seconds':>8} {'rel.err':>9} {'tiles':>5}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['size']:>6} {r['variant']:<26} {r['error']}")
            continue
        err = "—" if r["rel_error_vs_untiled"] is None else f"{r['rel_error_vs_untiled']:.2e}"
        lines.append(f"{r['size']:>6} {r['variant']:<26} {r['peak_gib']:>9.3f} {r['seconds']:>8.3f} {err:>9} "
                     f"{r.get('tiles', ''):>5}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="large", help="VAE config: large (real SD3 VAE) or tiny")
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--large", action="store_true", help="also run the Large 4096² tiled generation (GPU)")
    p.add_argument("--large-size", type=int, default=4096)
    p.add_argument("--large-steps", type=int, default=3)
    p.add_argument("--large-preset", default="large", help="tiny: a CPU dry run of the same code path")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    out: dict[str, Any] = {"environment": environment(args.device), "command": " ".join(sys.argv),
                           "vae_init": "PyTorch default initialisation", "dtype": str(dtype)}

    def save() -> None:  # after every row: a run cut short by a time limit still leaves its numbers
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=2)

    out["vae"] = []
    bench_vae(args.preset, args.sizes, args.device, dtype, args.repeats, out["vae"], save)
    if args.large:
        try:
            out["large"] = bench_large(args.large_size, args.large_steps, args.device, args.large_preset)
        except Exception as exc:  # report, keep the VAE numbers
            out["large"] = {"error": repr(exc)}
            print("large failed:", repr(exc), flush=True)
    save()
    print(json.dumps(out["environment"]))
    if "large" in out:
        print("large:", json.dumps(out["large"]))
    print(table(out["vae"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())


# --- reading the committed results (notebook 04) ---------------------------------------------------------

BENCH_JSON = "docs/benchmarks/tiling.json"
"""The committed GPU measurements (written by ``main --json``), relative to the repository root."""


def memory_vs_resolution(json_path: str | None = None) -> tuple[list[dict], str]:
    """Peak decode memory per resolution: measured on the GPU (committed JSON) when present, else analytic.

    Returns (rows, source label). Analytic rows use :func:`~sd35fp8_helpers.highres.tiling.activation_bytes_per_px`
    of the real SD3 VAE config in bf16 × the allocator overhead (untiled), and one tile plus the mid block on
    the whole latent (ours) — an estimate, labelled as such.
    """
    from pathlib import Path

    path = Path(json_path) if json_path else REPO_ROOT / BENCH_JSON
    if path.is_file():
        data = json.loads(path.read_text())
        env = data["environment"]
        rows = [{"size": r["size"], "variant": r["variant"], "peak GiB": r["peak_gib"]}
                for r in data["vae"] if "peak_gib" in r]
        return rows, f"measured: {env.get('gpu', env['device'])}, torch {env['torch']}, {env['date']}"
    return _analytic_memory_rows(), "analytic estimate (no GPU measurements committed yet)"


def _analytic_memory_rows() -> list[dict]:
    import torch
    from diffusers import AutoencoderKL

    from ..highres.tiling import ALLOCATOR_OVERHEAD, activation_bytes_per_px

    with torch.device("meta"):
        vae = AutoencoderKL(**get_preset("large").component_configs()["vae"])
    per_px = activation_bytes_per_px(vae, "decode", torch.bfloat16) * ALLOCATOR_OVERHEAD
    weights = sum(p.numel() for p in vae.parameters()) * 2
    tile = TileConfig()
    rows = []
    for size in (512, 1024, 2048, 4096, 8192):
        plan = plan_tiles(vae, size, size, tile)
        mid = 4 * 512 * (size // 8) ** 2 * 2  # x, normed, K, V of the mid-block attention on the whole latent
        rows.append({"size": size, "variant": "untiled", "peak GiB": round((weights + per_px * size**2) / 2**30, 2)})
        rows.append({"size": size, "variant": "ours (1 GiB tiles)",
                     "peak GiB": round((weights + per_px * plan.tile_px**2 + mid + 3 * 4 * size**2) / 2**30, 2)})
    return rows


def plot_memory(rows: list[dict], source: str):
    """Peak GiB vs image side, one line per variant, log-log (memory ∝ area is a slope of 2)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    for variant in dict.fromkeys(r["variant"] for r in rows):
        pts = sorted((r["size"], r["peak GiB"]) for r in rows if r["variant"] == variant)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=variant)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("image side (px)")
    ax.set_ylabel("peak GiB (decode)")
    ax.set_title(f"SD3 VAE decode memory — {source}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig

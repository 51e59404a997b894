"""Issue 17 on the GPU: SD3.5 Large Turbo vs Large per image, and LoRA merged vs on a side path.

One process, one real-size transformer (random N(0, 0.02) weights; Large and Large Turbo share the
architecture, so one model serves both):

1. **Turbo vs Large** — the transformer loop of one 1024² image: Large = 28 steps × a CFG step (batch 2),
   Turbo = 4 steps × a guidance-free step (batch 1); BF16 eager, then FP8 compute (torchao dynamic row-wise +
   per-block compile), each step timed with CUDA events (median of ``--repeats`` after ``--warmup``).
2. **LoRA, merge vs side** — a rank-16 random LoRA on every attention projection (to_q/k/v, to_out.0,
   add_q/k/v_proj, to_add_out: 8 Linears × 38 blocks), on BF16 eager and on FP8 compute: ms per Large step,
   bytes added on the GPU, bytes kept on the host for exact unloading, seconds to load; and a check that
   unloading restored every weight and scale bit for bit.

Command (GPU machine, wheels carried as in docs/benchmarks.md)::

    python -m sd35fp8_helpers.benchmarks.turbo_lora --json docs/benchmarks/turbo-lora-h200.json

The JSON is rewritten after every measurement, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ATTENTION_PROJECTIONS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                         "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")


def random_lora_file(transformer, path: Path, rank: int = 16, seed: int = 0) -> Path:
    """A PEFT-layout LoRA on every attention projection: down N(0, 1/in), up N(0, 0.02) (a trained LoRA's
    size, not zero: the merged weights really change)."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator("cpu").manual_seed(seed)
    tensors = {}
    for name, module in transformer.named_modules():
        if name.endswith(ATTENTION_PROJECTIONS) and hasattr(module, "in_features"):
            tensors[f"transformer.{name}.lora_A.weight"] = (torch.randn(rank, module.in_features, generator=g)
                                                            / module.in_features ** 0.5).to(torch.bfloat16)
            tensors[f"transformer.{name}.lora_B.weight"] = (torch.randn(module.out_features, rank, generator=g)
                                                            * 0.02).to(torch.bfloat16)
    save_file(tensors, str(path))
    return path


def _time(model, inputs, warmup: int, repeats: int, cuda: bool) -> tuple[float, float, list[float]]:
    """(first call s, median ms, all ms) of ``model(**inputs)``."""
    import torch

    def sync():
        if cuda:
            torch.cuda.synchronize()

    with torch.inference_mode():
        sync()
        t0 = time.perf_counter()
        model(**inputs)
        sync()
        first = time.perf_counter() - t0
        for _ in range(max(warmup - 1, 0)):
            model(**inputs)
        ms = []
        for _ in range(repeats):
            if cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                model(**inputs)
                b.record()
                b.synchronize()
                ms.append(round(a.elapsed_time(b), 3))
            else:
                t = time.perf_counter()
                model(**inputs)
                ms.append(round((time.perf_counter() - t) * 1000, 3))
    return first, statistics.median(ms), ms


def _weights_snapshot(transformer) -> dict[str, Any]:
    """A copy of every weight/scale payload (torchao tensors by their qdata and scale), on the model's device:
    an H200 copies 15 GiB in milliseconds, a trip through host memory would take seconds."""
    out = {}
    for name, t in list(transformer.named_parameters()) + list(transformer.named_buffers()):
        if hasattr(t, "qdata"):
            out[name + ".qdata"], out[name + ".scale"] = t.qdata.detach().clone(), t.scale.detach().clone()
        else:
            out[name] = t.detach().clone()
    return out


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8) if a[k].element_size() == 1 else a[k],
                                                    b[k].view(torch.uint8) if b[k].element_size() == 1 else b[k])
                                        for k in a)


def run(preset: str, height: int, width: int, warmup: int, repeats: int, json_path: Path | None,
        stages: tuple[str, ...], rank: int) -> dict[str, Any]:
    import tempfile

    import torch

    from ..lora import load_lora_, unload_lora_
    from ..pipeline.loading import default_device
    from ..precision.compute import fp8_compute_support
    from ..precision.quantize import FP8Config, module_bytes, quantize_
    from ..presets import get_preset
    from ..versions import library_versions
    from .fp8 import build_transformer, step_inputs

    device = default_device()
    cuda = device.startswith("cuda")
    large, turbo = get_preset(preset), get_preset(f"{preset}-turbo") if preset == "large" else get_preset(preset)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu", "versions": library_versions(optional=True),
        "date": time.strftime("%Y-%m-%d"), "command": "python -m sd35fp8_helpers.benchmarks.turbo_lora "
        + " ".join(sys.argv[1:]), "preset": preset, "height": height, "width": width, "lora_rank": rank,
        "steps": {"large": large.default_steps, "turbo": turbo.default_steps}, "turbo_vs_large": [], "lora": []}

    def save():
        if json_path:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(result, indent=1) + "\n")

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    model = build_transformer(preset, device)
    inputs = {b: step_inputs(model, height, width, device, batch=b) for b in (1, 2)}
    lora_file = random_lora_file(model, Path(tempfile.mkdtemp()) / "rank16-attention.safetensors", rank)
    result["lora_file_bytes"] = lora_file.stat().st_size

    def turbo_vs_large(precision: str) -> None:
        row: dict[str, Any] = {"precision": precision, "weights_gib": module_bytes(model) / 2**30}
        for label, p in (("large", large), ("turbo", turbo)):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            first, ms, all_ms = _time(model, inputs[p.step_batch], warmup, repeats, cuda)
            row[label] = {"batch": p.step_batch, "steps": p.default_steps, "first_call_s": round(first, 2),
                          "ms_per_step": ms, "ms_all": all_ms, "s_per_image": round(ms * p.default_steps / 1000, 3),
                          "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
            log(f"{precision} {label}: {ms:.1f} ms/step (batch {p.step_batch}), first call {first:.1f} s")
        row["turbo_speedup_per_image"] = row["large"]["s_per_image"] / row["turbo"]["s_per_image"]
        result["turbo_vs_large"].append(row)
        save()

    def lora_modes(precision: str) -> None:
        _, base_ms, _ = _time(model, inputs[2], warmup, repeats, cuda)
        base = _weights_snapshot(model)
        for mode in ("merge", "side"):
            if cuda:
                torch.cuda.synchronize()
                allocated = torch.cuda.memory_allocated()
            report = load_lora_(model, lora_file, mode=mode, name="bench")
            added = (torch.cuda.memory_allocated() - allocated) if cuda else report.device_bytes
            first, ms, all_ms = _time(model, inputs[2], warmup, repeats, cuda)
            t0 = time.perf_counter()
            unload_lora_(model, "bench")
            unload_s = time.perf_counter() - t0
            exact = _same(base, _weights_snapshot(model))
            result["lora"].append({"precision": precision, "mode": mode, "layers": report.layers, "rank": report.rank,
                                   "load_s": round(report.seconds, 3), "unload_s": round(unload_s, 3),
                                   "first_call_s": round(first, 2), "ms_per_step": ms, "ms_all": all_ms,
                                   "ms_per_step_without_lora": base_ms, "overhead": ms / base_ms - 1,
                                   "device_bytes_measured": added, "device_bytes_adapters": report.device_bytes,
                                   "host_bytes_for_unload": report.host_bytes, "unload_bit_exact": exact})
            log(f"{precision} LoRA {mode}: {ms:.1f} ms/step vs {base_ms:.1f} without, +{added / 2**20:.1f} MiB on "
                f"the device, load {report.seconds:.2f} s, unload exact: {exact}")
            save()

    if "bf16" in stages:
        turbo_vs_large("bf16")
        lora_modes("bf16")
    if "fp8-compute" in stages:
        can, why = fp8_compute_support(device)
        if not can:
            result["fp8_compute"] = f"skipped: {why}"
            save()
        else:
            quantize_(model, FP8Config(mode="compute"))
            turbo_vs_large("fp8-compute")
            lora_modes("fp8-compute")
    save()
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="large")
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--stages", nargs="+", default=["bf16", "fp8-compute"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    run(args.preset, args.height, args.width, args.warmup, args.repeats, Path(args.json) if args.json else None,
        tuple(args.stages), args.rank)
    return 0


if __name__ == "__main__":
    sys.exit(main())

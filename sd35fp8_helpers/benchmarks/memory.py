"""GPU benchmark behind notebook 03 and ``sd35fp8 plan``: every strategy at real size, measured vs predicted.

Run on the GPU machine (random weights at real size; nothing is downloaded)::

    python3 -m sd35fp8_helpers.benchmarks.memory --out docs/benchmarks/memory.json

1. Calibration micro-runs (bf16): each text encoder's activation peak, the VAE decode at 512² and 1024²
   (and tiled), the transformer's step peak at two token counts per preset → a :class:`Calibration`.
2. Per preset, the whole ladder on one real-size pipeline (``Strategy.apply(exact=True)`` between rungs):
   a warm-up image (1 step), then a measured one (``--steps``, stage by stage), seconds per image
   extrapolated to 28 steps; peak allocated vs :func:`~sd35fp8_helpers.memory.plan.predict` with the new calibration.
3. Emulated cards (``torch.cuda.set_per_process_memory_fraction``): Large in 12 GiB and Medium in 8 GiB with
   the planner's recommendation, full 28 steps, wall time.
4. Host RSS at load of a saved Medium transformer: fp32 default vs ``torch_dtype=bf16`` vs ``device_map="cuda"``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

from ..constants import BENCHMARKS_DIR

GIB = 2 ** 30


def build_pipeline(preset: str, device: str = "cuda"):
    """A real-size SD3.5 pipeline with random weights built directly on ``device`` in bf16 (tiny's tokenizers)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        StableDiffusion3Pipeline,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    from ..pipeline.loading import load_pipeline
    from ..presets import get_preset, instantiate_transformer

    p = get_preset(preset)
    tiny = load_pipeline("tiny", device="cpu")  # only for its tokenizers (ids fit the real vocabularies)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            parts = dict(text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**p.clip_l)),
                         text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**p.clip_g)),
                         text_encoder_3=T5EncoderModel(T5Config(**p.t5)), vae=AutoencoderKL(**p.vae))
        parts["transformer"] = instantiate_transformer(p, device=device)
    finally:
        torch.set_default_dtype(default)
    pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(**p.scheduler),
                                    tokenizer=tiny.tokenizer, tokenizer_2=tiny.tokenizer_2,
                                    tokenizer_3=tiny.tokenizer_3, **parts)
    return pipe.to(device, torch.bfloat16)


def _peak_above(fn, device="cuda") -> float:
    import torch

    from ..memory.strategies import free_memory, measure

    free_memory()
    base = torch.cuda.memory_allocated()
    with torch.no_grad(), measure(device) as m:
        fn()
    return float(m.gpu_peak_allocated - base)


def calibrate_shared(any_pipe) -> dict:
    """Activation terms of the text encoders and the VAE (shared by both presets), on a bf16 pipeline."""
    import torch

    from ..memory.strategies import cuda_context_bytes
    ids77 = torch.zeros(2, 77, dtype=torch.long, device="cuda")
    ids256 = torch.zeros(2, 256, dtype=torch.long, device="cuda")
    enc = {"clip_l": _peak_above(lambda: any_pipe.text_encoder(ids77, output_hidden_states=True)),
           "clip_g": _peak_above(lambda: any_pipe.text_encoder_2(ids77, output_hidden_states=True)),
           "t5": _peak_above(lambda: any_pipe.text_encoder_3(ids256))}
    vae = any_pipe.vae
    px = {}
    for side in (512, 1024):
        lat = torch.randn(1, 16, side // 8, side // 8, device="cuda", dtype=torch.bfloat16)
        px[side] = _peak_above(lambda: vae.decode(lat))
    per_px = (px[1024] - px[512]) / (1024 ** 2 - 512 ** 2)
    return dict(encoder_act=enc, vae_decode_per_pixel=per_px, vae_decode_base=px[512] - per_px * 512 ** 2,
                cuda_context=float(cuda_context_bytes()))


def calibrate_transformer(transformer) -> tuple[float, float]:
    """(base, bytes per token) of the transformer's step peak above its weights: CFG batch at 512² and 1024²."""
    import torch

    from ..memory.plan import TEXT_TOKENS

    points = {}
    for side in (512, 1024):
        n = (side // 16) ** 2
        x = torch.randn(2, 16, side // 8, side // 8, device="cuda", dtype=torch.bfloat16)
        ctx = torch.randn(2, TEXT_TOKENS, 4096, device="cuda", dtype=torch.bfloat16)
        pooled = torch.randn(2, 2048, device="cuda", dtype=torch.bfloat16)
        t = torch.full((2,), 500.0, device="cuda")
        points[2 * (n + TEXT_TOKENS)] = _peak_above(lambda: transformer(x, ctx, pooled, t, return_dict=False))
    (t1, p1), (t2, p2) = sorted(points.items())
    per_token = (p2 - p1) / (t2 - t1)
    return p1 - per_token * t1, per_token


def run_ladder(preset: str, pipe, cal, steps: int, log, device: str = "cuda", side: int = 1024,
               rungs: list[str] | None = None) -> list[dict]:
    """Every strategy on one pipeline, in ladder order; T5-less rungs use a sibling pipeline sharing modules."""
    from diffusers import StableDiffusion3Pipeline

    from ..memory.plan import predict
    from ..memory.strategies import (
        STRATEGIES,
        free_memory,
        generate_by_stage,
        get_strategy,
        misplaced_modules,
    )
    from ..pipeline.generation import GenerationSettings

    rows = []
    settings = GenerationSettings("a photo of a red fox in the snow", steps=steps, height=side, width=side,
                                  guidance_scale=4.5)
    warm = replace(settings, steps=1)
    for s in [get_strategy(name) for name in rungs] if rungs else STRATEGIES:  # NAME_tiled variants too
        target = pipe
        if s.drop_t5:
            target = StableDiffusion3Pipeline(**{**pipe.components, "text_encoder_3": None, "tokenizer_3": None})
            target._sd35fp8_strategy = pipe._sd35fp8_strategy
            target._sd35fp8_device = pipe._sd35fp8_device
        row = {"preset": preset, "strategy": s.name}
        if s.drop_t5:  # the sibling shares modules: take T5 off the GPU as dropping it would
            pipe.text_encoder_3.to("cpu")
            free_memory()
        try:
            t0 = time.perf_counter()
            row["changes"] = s.apply(target, device, exact=True)
            row["apply_s"] = round(time.perf_counter() - t0, 2)
            generate_by_stage(target, warm)
            run = generate_by_stage(target, settings)
            pred = predict(preset, s, 1024, 1024, calibration=cal)
            row.update(measured_gib=(run.gpu_peak_allocated or 0) / GIB, reserved_gib=(run.gpu_peak_reserved or 0) / GIB,
                       predicted_gib=pred.gpu_peak / GIB, host_peak_gib=run.host_peak_rss / GIB,
                       predicted_host_gib=pred.host_ram / GIB,
                       s_per_step=run.seconds_per_step, s_per_image_28=run.seconds_per_image(28),
                       step_s=[round(b - a, 4) for a, b in zip(run.step_ends, run.step_ends[1:])],
                       stages={k: v.as_dict() for k, v in run.stages.items()},
                       predicted_stages={k: v / GIB for k, v in pred.stage_peaks.items()},
                       misplaced=misplaced_modules(target))
            row["error_pct"] = 100 * (row["predicted_gib"] - row["measured_gib"]) / max(row["measured_gib"], 1e-9)
        except Exception as exc:  # one rung failing must not hide the others
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        log(row)
        rows.append(row)
    return rows


def run_emulated(preset: str, pipe, budget_gib: float, cal, log) -> dict:
    """The planner's recommendation for a ``budget_gib`` card, run inside an emulated card of that size."""
    from ..memory.plan import plan
    from ..memory.strategies import emulated_card, get_strategy, measure
    from ..pipeline.generation import GenerationSettings, generate

    rec = plan(budget_gib, preset, 1024, 1024, calibration=cal).recommended
    row = {"preset": preset, "budget_gib": budget_gib, "strategy": rec.strategy, "predicted_gib": rec.gpu_peak / GIB}
    try:
        get_strategy(rec.strategy).apply(pipe, "cuda", exact=True)
        settings = GenerationSettings("a photo of a red fox in the snow", steps=28, height=1024, width=1024)
        with emulated_card(int(budget_gib * GIB)):
            generate(pipe, replace(settings, steps=1), progress=False)
            with measure("cuda") as m:
                generate(pipe, settings, progress=False)
        row.update(fits=True, measured_gib=m.gpu_peak_allocated / GIB, reserved_gib=m.gpu_peak_reserved / GIB,
                   s_per_image=m.seconds)
    except Exception as exc:
        row.update(fits=False, error=f"{type(exc).__name__}: {str(exc)[:300]}")
    log(row)
    return row


_LOAD_PROBE = """
import sys, json, torch, psutil, threading
from diffusers import SD3Transformer2DModel
proc = psutil.Process(); peak = [proc.memory_info().rss]; base = peak[0]; done = threading.Event()
def sample():
    while not done.wait(0.005): peak[0] = max(peak[0], proc.memory_info().rss)
threading.Thread(target=sample, daemon=True).start()
mode = sys.argv[2]
kw = {"fp32": {}, "bf16": {"torch_dtype": torch.bfloat16}, "device_map": {"torch_dtype": torch.bfloat16, "device_map": "cuda"}}[mode]
m = SD3Transformer2DModel.from_pretrained(sys.argv[1], **kw)
m = m.to("cuda"); torch.cuda.synchronize(); done.set()
print(json.dumps({"mode": mode, "host_peak_gib": peak[0] / 2**30, "host_base_gib": base / 2**30,
                  "gpu_gib": torch.cuda.memory_allocated() / 2**30}))
"""


def load_probe(log) -> list[dict]:
    """Host peak RSS when loading a saved Medium transformer three ways (fresh subprocess each)."""
    import torch

    from ..presets import instantiate_transformer

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = instantiate_transformer("medium", device="cuda", dtype=torch.bfloat16)
        model.save_pretrained(tmp, safe_serialization=True)
        del model
        torch.cuda.empty_cache()
        for mode in ("fp32", "bf16", "device_map"):
            out = subprocess.run([sys.executable, "-c", _LOAD_PROBE, tmp, mode], capture_output=True, text=True)
            row = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else \
                {"mode": mode, "error": out.stderr[-300:]}
            log(row)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    import psutil
    import torch

    from ..display import quiet_libraries
    from ..memory.plan import Calibration
    from ..memory.strategies import free_memory

    quiet_libraries()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="memory.json")
    ap.add_argument("--presets", nargs="*", default=["large", "medium"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--skip-load", action="store_true")
    ap.add_argument("--rungs", nargs="*", default=None, help="only these strategies (default: the whole ladder)")
    ap.add_argument("--skip-emulated", action="store_true")
    args = ap.parse_args(argv)
    from ..versions import library_versions

    versions = library_versions(optional=True)
    device_name = torch.cuda.get_device_name()
    command = "python3 -m sd35fp8_helpers.benchmarks.memory " + " ".join(argv if argv is not None else sys.argv[1:])
    results: dict = {"device": device_name, "versions": versions, "date": datetime.date.today().isoformat(),
                     "command": command, "steps_measured": args.steps, "extrapolated_to": 28}

    def log(row):
        print(json.dumps(row, default=str), flush=True)

    t0 = time.perf_counter()
    results["ladder"], results["emulated"] = [], []
    shared, act_base, act_tok = None, {}, {}
    for preset in args.presets:  # one preset at a time: host RSS then belongs to this preset alone
        pipe = build_pipeline(preset)
        print(f"built {preset} in {time.perf_counter() - t0:.1f} s", flush=True)
        shared = shared or calibrate_shared(pipe)
        act_base[preset], act_tok[preset] = calibrate_transformer(pipe.transformer)
        cal = Calibration(device=device_name, date=results["date"], versions=versions, command=command,
                          transformer_act_base=dict(act_base), transformer_act_per_token=dict(act_tok),
                          host_baseline=float(psutil.Process().memory_info().rss), **shared)
        results["calibration"] = asdict(cal)
        log({"calibration": asdict(cal)})
        results["ladder"] += run_ladder(preset, pipe, cal, args.steps, log, rungs=args.rungs)
        if not args.skip_emulated:
            results["emulated"].append(run_emulated(preset, pipe, {"large": 12, "medium": 8}[preset], cal, log))
        del pipe
        free_memory()
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    if not args.skip_load:
        results["load"] = load_probe(log)
    results["wall_s"] = time.perf_counter() - t0
    Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    print(summary_table(results))
    return 0


def summary_table(results: dict) -> str:
    """Markdown table of the ladder and the emulated cards (what docs/benchmarks.md quotes)."""
    lines = ["| preset | strategy | predicted GiB | measured GiB | error | reserved GiB | s/step | s/image (28) | host GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results.get("ladder", []):
        if "error" in r:
            lines.append(f"| {r['preset']} | {r['strategy']} | — | failed: {r['error'][:80]} | | | | | |")
            continue
        lines.append(f"| {r['preset']} | {r['strategy']} | {r['predicted_gib']:.2f} | {r['measured_gib']:.2f} | "
                     f"{r['error_pct']:+.1f}% | {r['reserved_gib']:.2f} | {r['s_per_step']:.3f} | "
                     f"{r['s_per_image_28']:.2f} | {r['host_peak_gib']:.1f} |")
    lines += ["", "| preset | emulated card | strategy | predicted GiB | fits | measured GiB | reserved GiB | s/image (28 steps) |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results.get("emulated", []):
        lines.append(f"| {r['preset']} | {r['budget_gib']} GiB | {r['strategy']} | {r['predicted_gib']:.2f} | "
                     f"{r['fits']} | {r.get('measured_gib', 0):.2f} | {r.get('reserved_gib', 0):.2f} | "
                     f"{r.get('s_per_image', 0):.1f} |" + (f" {r['error'][:80]}" if "error" in r else ""))
    for r in results.get("load", []):
        lines.append(f"load {r.get('mode')}: " + json.dumps(r))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())


# --- reading the committed results (notebook 03) ----------------------------------------------------------

BENCHMARK_JSON = BENCHMARKS_DIR / "memory.json"


def load_results(path: str | Path | None = None) -> dict:
    """The GPU results committed in docs/benchmarks/memory.json (device, versions, date inside)."""
    return json.loads(Path(path or BENCHMARK_JSON).read_text())


def predicted_now_gib(row: dict) -> float:
    """What today's predictor (committed calibration) says for a measured rung: the model may be newer than the run."""
    from ..memory.plan import predict

    return predict(row["preset"], row["strategy"]).gpu_peak / GIB


def results_rows(results: dict) -> list[dict]:
    """The ladder as table rows: predicted (today's model) vs measured peak, s/step, s/image at 28 steps."""
    rows = []
    for r in results["ladder"]:
        if "error" in r:
            rows.append({"preset": r["preset"], "strategy": r["strategy"], "measured peak GiB": "failed",
                         "note": r["error"][:120]})
            continue
        now = predicted_now_gib(r)
        rows.append({"preset": r["preset"], "strategy": r["strategy"],
                     "predicted peak GiB": f"{now:.2f}", "measured peak GiB": f"{r['measured_gib']:.2f}",
                     "error": f"{100 * (now - r['measured_gib']) / r['measured_gib']:+.1f}%",
                     "predicted in that run": f"{r['predicted_gib']:.2f}", "s/step": f"{r['s_per_step']:.3f}",
                     "s/image (28 steps)": f"{r['s_per_image_28']:.1f}", "host peak GiB": f"{r['host_peak_gib']:.1f}"})
    return rows


def plot_results(results: dict):
    """Bar chart per preset: measured peak GPU memory (bars) and seconds per image (dots) for each rung."""
    import matplotlib.pyplot as plt

    presets = sorted({r["preset"] for r in results["ladder"]})
    fig, axes = plt.subplots(1, len(presets), figsize=(6 * len(presets), 3.8), squeeze=False)
    for ax, preset in zip(axes[0], presets):
        rows = [r for r in results["ladder"] if r["preset"] == preset and "error" not in r]
        names = [r["strategy"].replace("fp8_", "fp8\n").replace("_offload", "\noffload").replace("_tiled", "\ntiled")
                 for r in rows]
        ax.bar(names, [r["measured_gib"] for r in rows], color="tab:blue", label="measured peak GiB")
        ax.scatter(names, [predicted_now_gib(r) for r in rows], color="black", marker="_", s=400, label="predicted")
        ax.set_ylabel("GPU peak (GiB)")
        ax.set_title(f"SD3.5 {preset}, 1024², {results['device']}", fontsize=9)
        twin = ax.twinx()
        twin.plot(names, [r["s_per_image_28"] for r in rows], "o", color="tab:red", label="s/image (28 steps)")
        twin.set_ylabel("s/image", color="tab:red")
        twin.set_yscale("log")
        ax.tick_params(axis="x", labelsize=7)
    handles, labels = axes[0][0].get_legend_handles_labels()
    twin_handles, twin_labels = fig.axes[-1].get_legend_handles_labels()
    fig.legend(handles + twin_handles, labels + twin_labels, loc="upper center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    return fig


def calibration_literal(results: dict) -> str:
    """Python source for ``plan.CALIBRATION`` from a results JSON (activation terms + measured s/image)."""
    cal = dict(results["calibration"])
    seconds: dict = {}
    for r in results["ladder"]:
        if "error" not in r:
            seconds.setdefault(r["preset"], {})[r["strategy"]] = round(r["s_per_image_28"], 2)
    cal["seconds_per_image"] = seconds
    fields = ",\n    ".join(f"{k}={v!r}" for k, v in cal.items())
    return f"CALIBRATION = Calibration(\n    {fields},\n)"

"""The issue-16 GPU run, in one process and one wall-clock budget (device time is scarce).

Run on the GPU machine (random weights at real size; nothing downloaded)::

    python3 -m sd35fp8_helpers.benchmarks.fp8_suite --out OUT --budget 430

In order, each stage writing its JSON into ``OUT`` as it goes (a run stopped by its time limit keeps what it
measured; a stage that does not fit its share of the budget records its variants as skipped):

1. ``smoke-<gpu>.json`` — the static FP8 matmul on this GPU against float64 (tensor-wise and row-wise weight
   scales, with and without fast accumulation) on one Large-sized layer, and the report of a compute-mode
   Comfy load (tiny file) — does it name T5 as FP8 storage?
2. ``fp8-large-<gpu>.json`` — one Large CFG step at 1024²: bf16 eager, torchao dynamic row-wise, static
   per-tensor (plain, fast accumulation, + fused QKV), all compiled per block; a kernel-time profile of the
   last.
3. ``fp8-medium-<gpu>.json`` — Medium: bf16, dynamic, and the fastest static variant of step 2.
4. ``pipeline-large-<gpu>.json`` — ``sd35fp8 bench --pipeline`` for Large with that variant (its warm start
   from the on-disk inductor cache is the warm-start figure of the run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

LARGE_VARIANTS = ("bf16", "fp8-compute", "fp8-static", "fp8-static-fast", "fp8-static-fast-qkv")
MEDIUM_VARIANTS = ("bf16", "fp8-compute")
"""Medium also runs the fastest static variant of the Large run."""
SHARES = {"large": 0.33, "medium": 0.52}
"""When each stage must have started its last variant, as fractions of the budget; the rest: the pipeline."""


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def smoke(device: str) -> dict:
    """The static scaled-mm math on this GPU vs float64, eager, on one Large feed-forward-sized layer."""
    import torch

    from ..precision.static import static_linear_class

    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(8192, 2432, device=device, generator=g, dtype=torch.bfloat16)
    lin = torch.nn.Linear(2432, 9728, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02, generator=g)
    with torch.no_grad():
        ref = (x.double() @ lin.weight.double().t() + lin.bias.double())
    out = {}
    for ws in ("tensor", "row"):
        for fast in (False, True):
            lin.register_buffer("scale_input", x.abs().amax().float() / 448, persistent=False)
            layer = static_linear_class().from_module(lin, weight_scales=ws, fast_accum=fast)
            with torch.inference_mode():
                y = layer(x).double()
            out[f"{ws}{'+fast' if fast else ''}"] = float((y - ref).norm() / ref.norm())
    with torch.inference_mode():
        out["bf16"] = float((lin(x).double() - ref).norm() / ref.norm())
    return {"rel_err_vs_float64": out}


def comfy_compute_report(device: str) -> dict:
    """A tiny all-in-one Comfy file loaded with mode="compute": the report rows (T5 should say FP8 storage)."""
    from ..pipeline.loading import load_pipeline
    from ..precision.comfy import load_comfy_pipeline, save_comfy_checkpoint

    with tempfile.TemporaryDirectory() as d:
        path = save_comfy_checkpoint(load_pipeline("tiny", device="cpu"), Path(d) / "tiny.safetensors",
                                     text_encoders=True)
        pipe = load_comfy_pipeline(path, device=device, mode="compute")
    return {"report": str(pipe.sd35fp8_fp8), "rows": pipe.sd35fp8_fp8.rows()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", type=float, default=430, help="seconds for everything")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--skip", nargs="*", default=[], choices=["smoke", "large", "medium", "pipeline"])
    args = ap.parse_args(argv)
    start = time.monotonic()
    end = start + args.budget
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="sd35fp8-inductor-"))  # cold first
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import torch

    from .fp8 import run_bench

    gpu = torch.cuda.get_device_name(0).split()[-1].lower()  # "h200"
    command = "python3 -m sd35fp8_helpers.benchmarks.fp8_suite " + " ".join(sys.argv[1:] if argv is None else argv)

    if "smoke" not in args.skip:
        data: dict = {"device": torch.cuda.get_device_name(0)}
        for name, fn in (("static_matmul", smoke), ("comfy_compute", comfy_compute_report)):
            try:
                data[name] = fn(args.device)
            except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                data[name] = {"failed": f"{type(e).__name__}: {str(e)[:500]}"}
            _log(f"smoke {name}: {json.dumps(data[name])[:600]}")
        (out / f"smoke-{gpu}.json").write_text(json.dumps(data, indent=1) + "\n")

    best = "fp8-static-fast-qkv"
    if "large" not in args.skip:
        _log("Large steps")
        large = run_bench("large", variants=LARGE_VARIANTS, device=args.device, profile=(best,),
                          command=command, json_path=out / f"fp8-large-{gpu}.json",
                          deadline=start + SHARES["large"] * args.budget)
        _log("\n" + large.table())
        fastest = min((v for v in large.variants if v.status == "ok" and v.variant.startswith("fp8-static")),
                      key=lambda v: v.ms_per_step, default=None)
        best = fastest.variant if fastest else best
    if "medium" not in args.skip and time.monotonic() < end:
        _log("Medium steps")
        medium = run_bench("medium", variants=MEDIUM_VARIANTS + (best,), device=args.device, command=command,
                           json_path=out / f"fp8-medium-{gpu}.json", deadline=start + SHARES["medium"] * args.budget)
        _log("\n" + medium.table())
    if "pipeline" not in args.skip and time.monotonic() < end - 60:
        from . import pipeline
        from .fp8 import STATIC_CONFIGS

        config = dict(mode="compute", text_encoder_3=True, **STATIC_CONFIGS[best])
        _log(f"Large whole image with {best}: {config}")
        result = pipeline.run_pipeline_bench("large", steps=28, device=args.device, batches=(1, 4),
                                             json_path=out / f"pipeline-large-{gpu}.json", command=command,
                                             warm_start=True, deadline=end, fp8_config=config)
        _log("\n" + result.table())
    _log(f"done in {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How long does one image of the embedded scene model take on this machine? (issue 13's CPU target: ≤ 2 s)

``python -m sd35fp8_helpers.benchmarks.scene_latency [--repeats 5] [--json docs/benchmarks/scene-latency-cpu.json]``
loads the shipped ``scenes`` model the way every notebook does (``load_pipeline``), makes one warm-up image, then
times ``repeats`` single images (batch 1, the model's own 16 steps, guidance 4, 128²) with
:func:`~sd35fp8_helpers.pipeline.generation.generate` — what a learner waits for in the playground — in BF16
weights (a CPU computes in float32) and in FP8 storage. Wall clock; median and range are reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from ..constants import BENCHMARKS_DIR

DEFAULT_JSON = BENCHMARKS_DIR / "scene-latency-cpu.json"
PROMPTS = ("a large red circle on the left, on a blue background",
           "a small white triangle at the top, on a green background")
PRECISIONS = ("bf16", "fp8-storage")


def measure(precision: str, repeats: int, device: str = "cpu") -> dict[str, Any]:
    """Seconds for each of ``repeats`` single images at the model's defaults (after one warm-up image)."""
    from ..pipeline.defaults import default_settings
    from ..pipeline.generation import generate
    from ..pipeline.loading import load_pipeline
    from ..precision.quantize import apply_precision_

    pipe = load_pipeline("scenes", device=device)
    if precision != "bf16":
        apply_precision_(pipe, precision)
    generate(pipe, default_settings(pipe, PROMPTS[0], 0), progress=False)  # warm-up: allocator, kernels
    seconds = []
    for i in range(repeats):
        settings = default_settings(pipe, PROMPTS[i % len(PROMPTS)], i + 1)
        start = time.perf_counter()
        generate(pipe, settings, progress=False)
        seconds.append(time.perf_counter() - start)
    return {"precision": precision, "steps": settings.steps, "size": [settings.width, settings.height],
            "seconds": [round(s, 3) for s in seconds], "median_s": round(statistics.median(seconds), 3),
            "min_s": round(min(seconds), 3), "max_s": round(max(seconds), 3)}


def main(argv: list[str] | None = None) -> int:
    import os

    import torch

    from ..versions import library_versions

    ap = argparse.ArgumentParser(prog="python -m sd35fp8_helpers.benchmarks.scene_latency",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = ap.parse_args(argv)
    rows = [measure(p, args.repeats) for p in PRECISIONS]
    out = {"device": f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)",
           "date": time.strftime("%Y-%m-%d"), "versions": library_versions(),
           "command": "python -m sd35fp8_helpers.benchmarks.scene_latency " + " ".join(sys.argv[1:]), "rows": rows}
    print(f"{out['device']}, {out['date']}: one image of the scene model at its defaults (batch 1)")
    print(f"{'precision':<12} {'steps':>5} {'size':>8} {'median s':>9} {'min s':>6} {'max s':>6}")
    for r in rows:
        print(f"{r['precision']:<12} {r['steps']:>5} {'×'.join(map(str, r['size'])):>8} {r['median_s']:>9.2f} "
              f"{r['min_s']:>6.2f} {r['max_s']:>6.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``bench``: one CFG transformer step timed per precision variant, or (``--pipeline``) whole images
(run on the GPU machine)."""

from __future__ import annotations

import os
import sys


def bench_arguments(p) -> None:
    from ..benchmarks.fp8 import DEFAULT_VARIANTS, VARIANTS
    from ..presets import PRESETS

    p.add_argument("--preset", default="tiny", choices=list(PRESETS),
                   help="large-turbo: one step is batch 1 (guidance 0, no CFG), 4 steps per image")
    p.add_argument("--random-weights", action="store_true",
                   help="random N(0, 0.02) weights at real size (always the case: no download)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="steps per image for the s/image column")
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS))
    p.add_argument("--device", default=None)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warm-start", action="store_true",
                   help="re-run compiled variants in a second process with the inductor cache on disk")
    p.add_argument("--cache-dir", default=None, help="inductor cache folder (default: a fresh one, so the "
                                                     "first call is cold)")
    p.add_argument("--t5", action="store_true", help="also measure T5-XXL bytes in bf16 and FP8 storage")
    p.add_argument("--json", default=None, help="write the results here ('-' = stdout)")
    p.add_argument("--pipeline", action="store_true",
                   help="whole images instead of one step: text encoders + --steps steps + VAE decode, bf16 eager "
                        "vs FP8 (static scales, compiled), batch 1 and 4, first call, a size change with "
                        "recompiles counted, and a warm start from the on-disk compile cache")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 4], help="--pipeline: images per prompt to time")
    p.add_argument("--profile", nargs="*", default=[], choices=list(VARIANTS),
                   help="also profile one step of these variants (CUDA kernel time by kind)")


def bench(args) -> int:
    import tempfile

    if args.cache_dir or "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        # Set before torch is imported: a fresh folder makes this process's first compile cold; the
        # --warm-start child inherits it and finds the compiled artifacts there.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = args.cache_dir or tempfile.mkdtemp(prefix="sd35fp8-inductor-")
    command = "sd35fp8 bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:])
    if args.pipeline:
        from ..benchmarks.pipeline import run_pipeline_bench

        if any(b < 1 for b in args.batches):
            from ..errors import InvalidInput

            raise InvalidInput("--batches", args.batches, "must all be >= 1", fix="e.g. --batches 1 4")
        presult = run_pipeline_bench(args.preset, steps=args.steps, device=args.device, batches=tuple(args.batches),
                                     json_path=args.json, command=command, warm_start=args.warm_start)
        print(presult.to_json() if args.json == "-" else presult.table())
        return 0
    from ..benchmarks.fp8 import run_bench

    result = run_bench(args.preset, height=args.height, width=args.width, steps=args.steps,
                       variants=tuple(args.variants), device=args.device, warmup=args.warmup,
                       repeats=args.repeats, warm_start=args.warm_start, t5=args.t5, command=command,
                       json_path=args.json, profile=tuple(args.profile))
    if args.json == "-":
        print(result.to_json())
        return 0
    print(result.table())
    return 0

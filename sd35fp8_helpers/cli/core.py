"""The core commands: ``doctor``, ``tiny``, ``generate``, ``notebooks``."""

from __future__ import annotations

import argparse
import json
import sys

from ..constants import DEFAULT_MODEL
from ..errors import Sd35fp8Error

# --- doctor ---------------------------------------------------------------------------------------

def doctor_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--model", default="tiny", help="model whose disk needs to check (tiny, large, medium, a repo id)")


def doctor(args: argparse.Namespace) -> int:
    from ..doctor.checks import run_doctor

    report = run_doctor(args.model)
    print(report.to_json() if args.json else report.to_text())
    return 0 if report.ok else 1


# --- tiny -----------------------------------------------------------------------------------------

def tiny_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", help="folder to write (diffusers layout)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")


def tiny(args: argparse.Namespace) -> int:
    from ..pipeline.tiny import save_tiny_model

    print(save_tiny_model(args.out_dir, args.seed, overwrite=args.overwrite))
    return 0


# --- generate -------------------------------------------------------------------------------------

def generate_arguments(p: argparse.ArgumentParser) -> None:
    from ..memory.strategies import strategy_names
    from ..vocabulary import PRECISIONS

    p.add_argument("--model", default=DEFAULT_MODEL, help="scenes (the embedded trained model), tiny (random weights), a diffusers folder, or a hub repo id")
    p.add_argument("--prompt", help="what to draw")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="default: the model's own (tiny: 4, Large: 28)")
    p.add_argument("--guidance", type=float, default=None, help="default: the model's own")
    p.add_argument("--height", type=int, default=None, help="multiple of 16; default: the model's native size")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--precision", default=None, choices=list(PRECISIONS),
                   help="bf16 = as loaded; FP8 storage runs anywhere, FP8 compute needs capability >= 8.9 "
                        "(default: bf16, or the PNG's with --from-png)")
    p.add_argument("--memory", default=None, choices=strategy_names(), metavar="STRATEGY",
                   help="a rung of the memory ladder (sd35fp8 plan ranks them; NAME_tiled adds VAE tiling); "
                        "default: resident, or the PNG's with --from-png")
    p.add_argument("--lora", default=None, metavar="NAME",
                   help="a LoRA by name: shipped with the package, or NAME.safetensors in $SD35FP8_HOME/loras "
                        "(kept on a side path: the model's weights are not changed)")
    p.add_argument("--lora-scale", type=float, default=None, help="strength of --lora (default 1.0)")
    p.add_argument("--from-png", default=None, help="reproduce an image saved by sd35fp8 from its PNG metadata "
                                                    "(settings incl. LoRA, model, precision and memory strategy)")
    p.add_argument("--out", default=None, help="PNG to write (default: outputs/images/<seed>.png)")


def generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..constants import settings
    from ..memory.strategies import DEFAULT_STRATEGY, parse_strategy
    from ..pipeline.generation import GenerationSettings, read_png_metadata
    from ..pipeline.generation import generate as render
    from ..pipeline.loading import default_device, load_pipeline
    from ..precision.quantize import apply_precision_

    model, meta = args.model, {}
    if args.from_png:
        meta = read_png_metadata(args.from_png)
        gen = GenerationSettings(**meta["settings"])
        model = meta.get("model", model) if args.model == DEFAULT_MODEL else args.model
    else:
        if not args.prompt:
            raise Sd35fp8Error("--prompt is required (or --from-png FILE)", fix='sd35fp8 generate --prompt "a cat"')
        gen = None
    if args.lora:  # a wrong name fails here, in one line, before the model loads
        from ..pipeline.generation import check_settings

        check_settings(GenerationSettings("check", lora=args.lora, lora_scale=args.lora_scale or 1.0))
    precision = args.precision or (meta.get("precision") if meta.get("precision", "").startswith("fp8-") else "bf16")
    device = args.device or default_device()
    strategy = parse_strategy(args.memory or meta.get("memory") or DEFAULT_STRATEGY, device)  # before any loading
    pipe = load_pipeline(model, device=device)
    apply_precision_(pipe, precision)
    if strategy.name != "resident":
        strategy.apply(pipe, pipe.device)
    if gen is None:
        from ..pipeline.defaults import model_defaults

        d = model_defaults(pipe)
        gen = GenerationSettings(args.prompt, args.negative_prompt, args.seed, args.steps or d.steps,
                                 d.guidance_scale if args.guidance is None else args.guidance,
                                 args.height or d.height, args.width or d.width)
    if args.lora is not None or args.lora_scale is not None:  # on top of a PNG's settings too
        from dataclasses import replace

        gen = replace(gen, lora=gen.lora if args.lora is None else args.lora,
                      lora_scale=gen.lora_scale if args.lora_scale is None else args.lora_scale)
    result = render(pipe, gen)  # its precision is read from the pipeline (a strategy may have added FP8)
    result.extra["memory"] = strategy.name
    out = Path(args.out) if args.out else settings().output_dir / "images" / f"seed{gen.seed}.png"
    result.save(out)
    lora = f", LoRA {gen.lora} × {gen.lora_scale:g}" if gen.lora else ""
    print(f"wrote {out} ({gen.width}x{gen.height}, {gen.steps} steps, seed {gen.seed}, "
          f"{result.precision} on {result.device}{lora}, {result.seconds:.2f} s)")
    return 0


# --- notebooks ------------------------------------------------------------------------------------

def notebooks_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--out", default=None, help="output folder (default: outputs/, ignored by git)")
    p.add_argument("--only", nargs="*", help="run only notebooks whose file name contains one of these")
    p.add_argument("--notebooks", default=None, help="folder of NN_*.ipynb notebooks (default: the repo's notebooks/)")
    p.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="extra papermill parameter (VALUE parsed as JSON when it can be)")


def notebooks(args: argparse.Namespace) -> int:
    from ..onboarding.notebooks import run_all, summary_table

    extra = {}
    for name, value in args.parameter:
        try:
            extra[name] = json.loads(value)
        except json.JSONDecodeError:
            extra[name] = value
    runs = run_all(model=args.model, out=args.out, folder=args.notebooks, only=args.only, extra=extra)
    print("\n" + summary_table(runs))
    failed = [r for r in runs if r.status != "ok"]
    for r in failed:
        print(f"FAILED {r.notebook}: {r.error}\n       executed copy with the traceback: {r.output}", file=sys.stderr)
    return 1 if failed else 0



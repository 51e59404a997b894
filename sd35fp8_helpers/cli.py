"""The ``sd35fp8`` command line: the same jobs as the notebooks, for people and scripts.

Sub-commands are registered with :func:`command`; a feature module adds its own by defining
``register_cli(add)`` and being listed in :data:`EXTENSIONS`. Errors that sd35fp8 raises on purpose print
one readable line (what went wrong, then the fix) and exit 1; a missing optional package prints the exact
``pip install`` line.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Callable

from .errors import Sd35fp8Error

Handler = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Handler]] = {}

EXTENSIONS: tuple[str, ...] = ("sd35fp8_helpers.verify", "sd35fp8_helpers.hub", "sd35fp8_helpers.fp8",
                               "sd35fp8_helpers.bench", "sd35fp8_helpers.comfy", "sd35fp8_helpers.plan",
                               "sd35fp8_helpers.onboarding", "sd35fp8_helpers.report",
                               "sd35fp8_helpers.serve", "sd35fp8_helpers.demo")
"""Modules that add sub-commands through a ``register_cli(command)`` function."""


def command(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None):
    """Register ``handler(args) -> exit code`` as ``sd35fp8 NAME``."""
    def wrap(handler: Handler) -> Handler:
        _COMMANDS[name] = (help, arguments, handler)
        return handler
    return wrap


# --- doctor ---------------------------------------------------------------------------------------

def _doctor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--model", default="tiny", help="model whose disk needs to check (tiny, large, medium, a repo id)")


@command("doctor", "check this machine for SD3.5 in FP8; exit 1 if a check fails", _doctor_args)
def _doctor(args: argparse.Namespace) -> int:
    from .env import run_doctor

    report = run_doctor(args.model)
    print(report.to_json() if args.json else report.to_text())
    return 0 if report.ok else 1


# --- tiny -----------------------------------------------------------------------------------------

def _tiny_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", help="folder to write (diffusers layout)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")


@command("tiny", "write the embedded tiny SD3.5 pipeline to a folder", _tiny_args)
def _tiny(args: argparse.Namespace) -> int:
    from .tiny import save_tiny_model

    print(save_tiny_model(args.out_dir, args.seed, overwrite=args.overwrite))
    return 0


# --- generate -------------------------------------------------------------------------------------

def _generate_args(p: argparse.ArgumentParser) -> None:
    from .fp8 import PRECISIONS

    p.add_argument("--model", default="tiny", help="tiny, a diffusers folder, or a hub repo id")
    p.add_argument("--prompt", help="what to draw")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="default: the model's own (tiny: 4, Large: 28)")
    p.add_argument("--guidance", type=float, default=4.5)
    p.add_argument("--height", type=int, default=None, help="multiple of 16; default: the model's native size")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--precision", default=None, choices=list(PRECISIONS),
                   help="bf16 = as loaded; FP8 storage runs anywhere, FP8 compute needs capability >= 8.9 "
                        "(default: bf16, or the PNG's with --from-png)")
    p.add_argument("--memory", default=None, choices=["none", "vae-tiling", "cpu-offload"],
                   help="memory strategy (default: none, or the PNG's with --from-png)")
    p.add_argument("--from-png", default=None, help="reproduce an image saved by sd35fp8 from its PNG metadata "
                                                    "(settings, model, precision and memory strategy)")
    p.add_argument("--out", default=None, help="PNG to write (default: outputs/images/<seed>.png)")


@command("generate", "generate one image and save it with its settings in the PNG", _generate_args)
def _generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .constants import settings
    from .generation import GenerationSettings, generate, read_png_metadata
    from .fp8 import apply_precision_
    from .models import load_pipeline

    model, meta = args.model, {}
    if args.from_png:
        meta = read_png_metadata(args.from_png)
        gen = GenerationSettings(**meta["settings"])
        model = meta.get("model", model) if args.model == "tiny" else args.model
    else:
        if not args.prompt:
            raise Sd35fp8Error("--prompt is required (or --from-png FILE)", fix='sd35fp8 generate --prompt "a cat"')
        gen = None
    precision = args.precision or (meta.get("precision") if meta.get("precision", "").startswith("fp8-") else "bf16")
    memory = args.memory or meta.get("memory", "none")
    pipe = load_pipeline(model, device=args.device)
    apply_precision_(pipe, precision)
    if memory == "vae-tiling":
        pipe.vae.enable_tiling()
    elif memory == "cpu-offload":
        pipe.enable_model_cpu_offload()
    if gen is None:
        from .presets import LARGE, TINY

        native = pipe.transformer.config.sample_size * pipe.vae_scale_factor
        steps = args.steps or (TINY if pipe.sd35fp8_source.is_tiny else LARGE).default_steps
        gen = GenerationSettings(args.prompt, args.negative_prompt, args.seed, steps, args.guidance,
                                 args.height or native, args.width or native)
    result = generate(pipe, gen, precision=precision)
    result.extra["memory"] = memory
    out = Path(args.out) if args.out else settings().output_dir / "images" / f"seed{gen.seed}.png"
    result.save(out)
    print(f"wrote {out} ({gen.width}x{gen.height}, {gen.steps} steps, seed {gen.seed}, "
          f"{result.precision} on {result.device}, {result.seconds:.2f} s)")
    return 0


# --- notebooks ------------------------------------------------------------------------------------

def _notebooks_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny")
    p.add_argument("--out", default=None, help="output folder (default: outputs/, ignored by git)")
    p.add_argument("--only", nargs="*", help="run only notebooks whose file name contains one of these")
    p.add_argument("--notebooks", default=None, help="folder of NN_*.ipynb notebooks (default: the repo's notebooks/)")
    p.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="extra papermill parameter (VALUE parsed as JSON when it can be)")


@command("notebooks", "execute every notebook in order with papermill (the main job)", _notebooks_args)
def _notebooks(args: argparse.Namespace) -> int:
    from .notebooks import run_all, summary_table

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


# --- entry point ----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    for module in EXTENSIONS:
        importlib.import_module(module).register_cli(command)
    parser = argparse.ArgumentParser(prog="sd35fp8", description="Stable Diffusion 3.5 in FP8, step by step.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, arguments, handler) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        arguments(p)
        p.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .display import quiet_libraries

    quiet_libraries()
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except Sd35fp8Error as exc:
        print(f"sd35fp8 {args.command}: error: {exc.one_line}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        print(f"sd35fp8 {args.command}: error: missing package {exc.name!r}; install it with: "
              f"pip install -e . (from the repository root)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"sd35fp8 {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

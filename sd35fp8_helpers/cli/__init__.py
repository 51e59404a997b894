"""The ``sd35fp8`` command line: the same jobs as the notebooks, for people and scripts.

Every sub-command is one row of :data:`COMMANDS`: its name, a one-line help and ``"module:function"``.
Nothing is imported until a command runs: ``sd35fp8 --help`` reads only this table (no torch, no
diffusers: 0.2 s instead of 10), and ``sd35fp8 verify …`` imports only :mod:`.weights`. A command module
defines ``NAME(args) -> exit code`` and ``NAME_arguments(parser)``.

Errors that sd35fp8 raises on purpose print one readable line (what went wrong, then the fix) and exit 1; a
missing optional package prints the exact ``pip install`` line; a closed pipe (``sd35fp8 … | head``) ends
quietly.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import Sd35fp8Error

Handler = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    target: str  # "package.module:function"; its arguments come from "function_arguments" in the same module

    def load(self) -> tuple[Callable[[argparse.ArgumentParser], None], Handler]:
        module_name, function = self.target.split(":")
        module = importlib.import_module(module_name)
        return getattr(module, f"{function}_arguments", lambda p: None), getattr(module, function)


_C = "sd35fp8_helpers.cli."
COMMANDS: tuple[Command, ...] = (
    Command("doctor", "check this machine for SD3.5 in FP8; exit 1 if a check fails", _C + "core:doctor"),
    Command("tiny", "write the embedded tiny SD3.5 pipeline (random weights) to a folder", _C + "core:tiny"),
    Command("generate", "generate one image and save it with its settings in the PNG", _C + "core:generate"),
    Command("notebooks", "execute every notebook in order with papermill (the main job)", _C + "core:notebooks"),
    Command("verify", "check a model folder without loading it: pointers, truncated/corrupt safetensors, pickles, "
                      "missing components, sha256; exit 1 if not loadable", _C + "weights:verify"),
    Command("download", "download from the hub after a disk preflight; verify; one-line errors", _C + "weights:download"),
    Command("quantize", "write an FP8 (storage) copy of a model as a diffusers folder", _C + "precision:quantize"),
    Command("comfy-inspect", "say what a Comfy (scaled-FP8) SD3.5 single file holds, from its header",
            _C + "precision:comfy_inspect"),
    Command("plan", "rank memory strategies for a card: predicted peak, speed, what fits", _C + "memory:plan"),
    Command("bench", "time the SD3.5 transformer step in bf16 / FP8 storage / FP8 compute", _C + "benchmarks:bench"),
    Command("setup", "from nothing to a verified first image: doctor → disk → fetch → verify → load → smoke",
            _C + "onboarding:setup"),
    Command("report", "a shareable environment report (Markdown + JSON); --compare another one", _C + "onboarding:report"),
    Command("serve", "serve an OpenAI-style images API (/v1/images/generations) with keys, queue and metrics",
            _C + "serving:serve"),
    Command("api-key", "make a new API key for `sd35fp8 serve`; store only its hash", _C + "serving:api_key"),
    Command("worker", "take image jobs from the Redis queue (one process per GPU: --gpus all)",
            _C + "serving:worker"),
    Command("batch", "fan a prompt file out over the queue's workers: PNGs + manifest; re-runs skip what is done",
            _C + "serving:batch"),
    Command("train-tiny", "train the embedded scene model (SD3.5 classes, captioned synthetic scenes; GPU: ~6 min)",
            _C + "training:train_tiny"),
    Command("demo", "open a Gradio page to generate images (personal use; see `serve` for a team API)",
            _C + "interactive:demo"),
)
"""Every sub-command, in the order ``--help`` lists them."""


def _chosen(argv: list[str]) -> str | None:
    """The sub-command named on the command line (the first word that is not an option), if any."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser, with arguments only for the chosen command (so other commands' modules stay unimported)."""
    argv = sys.argv[1:] if argv is None else argv
    chosen = _chosen(argv)
    parser = argparse.ArgumentParser(prog="sd35fp8", description="Stable Diffusion 3.5 in FP8, step by step.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for c in COMMANDS:
        p = sub.add_parser(c.name, help=c.help, description=c.help)
        if c.name == chosen:
            arguments, handler = c.load()
            arguments(p)
            p.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    from ..display import quiet_libraries

    quiet_libraries()
    try:
        code = args.handler(args)
        sys.stdout.flush()  # inside the try: a reader that went away (`| head`) is noticed here, not at exit
        return code
    except Sd35fp8Error as exc:
        print(f"sd35fp8 {args.command}: error: {exc.one_line}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        print(f"sd35fp8 {args.command}: error: missing package {exc.name!r}; install it with: "
              f"pip install -e . (from the repository root)", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # `sd35fp8 … | head` closed the pipe: stop quietly, and keep Python from complaining at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"sd35fp8 {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

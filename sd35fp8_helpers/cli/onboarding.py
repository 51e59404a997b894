"""``setup`` and ``report``: a new team member from nothing to a proven, comparable setup."""

from __future__ import annotations

from ..vocabulary import PRECISION_CHOICES


def setup_arguments(p) -> None:
    p.add_argument("model", help="hub repo id, git URL, local folder, Comfy FP8 .safetensors file, or tiny")
    p.add_argument("--dir", default="sd35fp8-setup", help="where the model, state and smoke image go")
    p.add_argument("--precision", default="auto", choices=PRECISION_CHOICES)
    p.add_argument("--include", nargs="*", default=[], help="hub: only files matching these patterns")
    p.add_argument("--base", default=None, help="Comfy files: the diffusers model giving configs/VAE (default: "
                                               "inferred from the file: the Large or Medium repo, or tiny)")
    p.add_argument("--device", default=None)
    p.add_argument("--dry-run", action="store_true", help="say what would happen; write nothing")
    p.add_argument("--json", action="store_true", help="print the stage results as JSON at the end")

def setup(args) -> int:
    from pathlib import Path

    from ..onboarding.setup import SetupConfig, run_setup

    config = SetupConfig(args.model, Path(args.dir), args.precision, tuple(args.include), args.base,
                         args.device, args.dry_run)
    result = run_setup(config, echo=(lambda _: None) if args.json else print)
    if args.json:
        print(result.to_json())
    return result.exit_code


def report_arguments(p) -> None:
    p.add_argument("--dir", default=None, help="a folder written by `sd35fp8 setup` (model, hashes, smoke image)")
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md (default: print Markdown)")
    p.add_argument("--compare", default=None, metavar="THEIRS.json", help="list the differences that matter")

def report(args) -> int:
    import json
    from pathlib import Path

    from ..errors import Sd35fp8Error
    from ..onboarding.report import build_report, compare, to_markdown, write_report

    try:
        built = build_report(args.dir)
    except FileNotFoundError as exc:
        raise Sd35fp8Error(str(exc), fix="sd35fp8 setup tiny --dir DIR, then sd35fp8 report --dir DIR") from exc
    if args.out:
        json_path, md_path = write_report(built, args.out)
        print(f"wrote {json_path} and {md_path}")
    elif not args.compare:
        print(to_markdown(built))
    if args.compare:
        theirs = json.loads(Path(args.compare).read_text())
        diffs = compare(built, theirs)
        print("\n".join(str(d) for d in diffs) if diffs else "no differences that matter")
        return 1 if diffs else 0
    return 0

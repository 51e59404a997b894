"""``plan``: which memory strategy fits a card, predicted from the real configs and a GPU calibration."""

from __future__ import annotations


def plan_arguments(p) -> None:
    from ..memory.plan import DEFAULT_MARGIN

    p.add_argument("--vram", type=float, required=True, help="GPU memory of the card, GiB (nvidia-smi)")
    p.add_argument("--preset", default="large", help="large, medium or large-turbo (no CFG: batch 1 per step)")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--ram", type=float, default=None, help="host RAM, GiB: rules out offloading that would not fit")
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN, help="safety margin on the peak (0.1 = 10%%)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def plan(args) -> int:
    from ..memory.plan import plan as rank

    result = rank(args.vram, args.preset, args.height, args.width, args.batch, ram_gib=args.ram, margin=args.margin)
    print(result.to_json() if args.json else result.to_text())
    return 0 if result.recommended is not None else 1

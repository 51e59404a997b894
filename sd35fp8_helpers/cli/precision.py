"""``quantize`` and ``comfy-inspect``: FP8 checkpoints written once, Comfy files understood from their header."""

from __future__ import annotations


def quantize_arguments(p) -> None:
    from ..precision.policies import POLICIES

    p.add_argument("model", help="tiny, a diffusers folder, or a hub repo id")
    p.add_argument("out_dir", help="folder to write (diffusers layout + FP8 safetensors + sd35fp8_fp8.json)")
    p.add_argument("--policy", default="all-linear", choices=sorted(POLICIES))
    p.add_argument("--no-t5", action="store_true", help="leave T5-XXL in bf16")
    p.add_argument("--clip", action="store_true", help="CLIP-L/G in FP8 storage too")
    p.add_argument("--device", default="cpu", help="where to quantise (cpu is fine: it is a one-off)")


def quantize(args) -> int:
    import torch

    from ..pipeline.loading import load_pipeline
    from ..precision.checkpoint import save_quantized
    from ..precision.quantize import FP8Config, quantize_

    dtype = torch.float32 if args.model == "tiny" else torch.bfloat16
    pipe = load_pipeline(args.model, device=args.device, dtype=dtype)
    report = quantize_(pipe, FP8Config(mode="storage", policy=args.policy, text_encoder_3=not args.no_t5,
                                       clip=args.clip))
    out = save_quantized(pipe, args.out_dir)
    print(report)
    print(f"wrote {out} (load it with load_pipeline({str(out)!r}) or --model {out})")
    return 0


def comfy_inspect_arguments(p) -> None:
    p.add_argument("file", help="a Comfy single-file checkpoint (.safetensors)")


def comfy_inspect(args) -> int:
    from ..precision.comfy import inspect_comfy_file

    print(inspect_comfy_file(args.file))
    return 0

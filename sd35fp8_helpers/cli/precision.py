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
    p.add_argument("--calibrate", metavar="PROMPTS", default=None,
                   help="a text file, one prompt per line: run them through the FP8 model, record each FP8 layer's "
                        "activation range and store static scales (scale_input) with the checkpoint, for FP8 "
                        "compute with activation_scales='static' (no amax pass per matmul)")
    p.add_argument("--calibrate-steps", type=int, default=4, help="denoising steps per calibration prompt")
    p.add_argument("--calibrate-size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"), default=None,
                   help="image size to calibrate at (default: the model's native size)")


def quantize(args) -> int:
    import torch

    from ..pipeline.loading import load_pipeline
    from ..precision.checkpoint import save_quantized
    from ..precision.quantize import FP8Config, quantize_

    prompts = None
    if args.calibrate is not None:  # a bad prompts file fails here, before minutes of loading
        from ..precision.calibration import read_prompts

        prompts = read_prompts(args.calibrate)
        if args.calibrate_steps < 1:
            from ..errors import InvalidInput

            raise InvalidInput("--calibrate-steps", args.calibrate_steps, "must be >= 1",
                               fix="use the steps you generate with (e.g. 28), or 4")
    dtype = torch.float32 if args.model == "tiny" else torch.bfloat16
    pipe = load_pipeline(args.model, device=args.device, dtype=dtype)
    report = quantize_(pipe, FP8Config(mode="storage", policy=args.policy, text_encoder_3=not args.no_t5,
                                       clip=args.clip))
    if prompts is not None:
        from ..precision.calibration import calibrate_

        height, width = args.calibrate_size or (None, None)
        calibrate_(pipe, prompts, steps=args.calibrate_steps, height=height, width=width)
    out = save_quantized(pipe, args.out_dir)
    print(report)
    print(f"wrote {out} (load it with load_pipeline({str(out)!r}) or --model {out})")
    if prompts is not None:
        print("static activation scales stored: use them with quantize_(pipe, FP8Config(mode='compute', "
              "activation_scales='static')) on a GPU with FP8 compute")
    return 0


def comfy_inspect_arguments(p) -> None:
    p.add_argument("file", help="a Comfy single-file checkpoint (.safetensors)")


def comfy_inspect(args) -> int:
    from ..precision.comfy import inspect_comfy_file

    print(inspect_comfy_file(args.file))
    return 0

"""``train-tiny``: train the embedded scene model (the recipe in ``sd35fp8_helpers.training.train_tiny``)."""

from __future__ import annotations


def train_tiny_arguments(p) -> None:
    p.add_argument("out_dir", help="folder to write (diffusers layout, safetensors, loss curve, sd35fp8_scenes.json)")
    p.add_argument("--smoke", action="store_true", help="a few CPU steps of every stage (< 60 s): proves the recipe runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scenes", type=int, help="number of training scenes")
    p.add_argument("--vae-seconds", type=float, help="VAE wall-clock budget")
    p.add_argument("--seconds", type=float, help="transformer wall-clock budget")
    p.add_argument("--batch", type=int)
    p.add_argument("--lr", type=float, help="transformer peak learning rate (one-cycle)")
    p.add_argument("--device", default="auto")


def train_tiny(args) -> int:
    from ..training.train_tiny import main

    argv = [str(args.out_dir)] + (["--smoke"] if args.smoke else []) + ["--seed", str(args.seed), "--device", args.device]
    for flag, value in (("--scenes", args.scenes), ("--vae-seconds", args.vae_seconds), ("--seconds", args.seconds),
                        ("--batch", args.batch), ("--lr", args.lr)):
        if value is not None:
            argv += [flag, str(value)]
    return main(argv)

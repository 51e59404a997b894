"""Train a small LoRA on the embedded scene model that teaches it :mod:`.concepts`' new shape (the diamond).

Recipe (the base model's own objective, :mod:`sd35fp8_helpers.training.train_tiny`): rectified flow —
``x_t = (1 − σ)·x₀ + σ·ε`` with logit-normal σ, the transformer predicts ``ε − x₀`` — on latents of the
model's own VAE and captions through its own ``encode_prompt`` (32 T5 tokens, as it was trained). Only the
LoRA trains: rank 4 on the attention projections of every block (image and text streams), ``up`` starting at
zero so step 0 is the base model exactly. Half of each batch is the concept (diamonds), half ordinary
scenes from the base model's training stream with their captions, so the LoRA learns "diamond" without
forgetting the other shapes; 10% of captions are dropped (as in the base training) so guidance still works.

The result is written in the diffusers/PEFT layout (``transformer.<module>.lora_A/B.weight``, alpha in the
``lora_adapter_metadata``), i.e. exactly what :func:`~.apply.load_lora_` reads and diffusers writes.

The shipped ``diamond`` came from (H200, 2291 steps of batch 64 in its 150 s budget; on 2 CPU cores a batch-16
step takes about 0.5 s, too slow to teach it)::

    python -m sd35fp8_helpers.lora.train --device cuda --steps 4000 --seconds 150 --batch 64 --out diamond.safetensors

(those are :class:`LoraTrainConfig`'s defaults; a ``diamond.train.json`` with the loss per step lands beside it).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
           "attn.add_v_proj", "attn.to_add_out", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
"""Linears that get a LoRA: every attention projection (joint attention, both streams, and dual attention)."""


@dataclass
class LoraTrainConfig:
    """The defaults are the shipped ``diamond``'s recipe (on the H200 its 150 s budget ended it at 2291 steps)."""

    rank: int = 4
    steps: int = 4000
    seconds: float = 150.0
    batch: int = 64
    lr: float = 2e-3
    n_concept: int = 768
    n_regular: int = 768
    cfg_dropout: float = 0.1
    seed: int = 0
    targets: tuple[str, ...] = TARGETS
    threads: int = 2
    device: str = "cpu"


@dataclass
class LoraTrainResult:
    path: str
    config: dict[str, Any]
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    bytes: int = 0


def _trainable_class():
    import torch
    from torch import nn

    class TrainableLora(nn.Module):
        def __init__(self, base: nn.Linear, rank: int) -> None:
            super().__init__()
            self.base = base.requires_grad_(False)
            device = base.weight.device
            self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device))
            self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's init: ΔW = 0 at step 0

        def forward(self, x):
            return self.base(x) + (x @ self.lora_A.T) @ self.lora_B.T

    return TrainableLora


def _encode_images(pipe, images, device: str = "cpu") -> Any:
    import numpy as np
    import torch

    x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in images])).permute(0, 3, 1, 2)
    x = (x / 127.5 - 1).to(device)
    with torch.inference_mode():
        mean = torch.cat([pipe.vae.encode(x[i:i + 128]).latent_dist.mean for i in range(0, len(x), 128)])
    cfg = pipe.vae.config
    return ((mean - cfg.shift_factor) * cfg.scaling_factor).float()


def _encode_texts(pipe, texts: list[str], length: int, device: str = "cpu") -> tuple[Any, Any]:
    import torch

    with torch.inference_mode():
        e, _, p, _ = pipe.encode_prompt(prompt=texts, prompt_2=None, prompt_3=None, device=device,
                                        do_classifier_free_guidance=False, max_sequence_length=length)
    return e.float(), p.float()


def build_data(pipe, cfg: LoraTrainConfig) -> dict[str, Any]:
    """Latents and text embeddings: ``n_concept`` concept scenes + ``n_regular`` ordinary training scenes."""
    import torch

    from ..pipeline.defaults import model_defaults
    from ..scenes.dataset import scene_sample
    from .concepts import random_concept_scene, render_concept, training_caption

    rng = random.Random(f"lora-train:{cfg.seed}")
    images, texts = [], []
    for i in range(cfg.n_concept):
        scene = random_concept_scene(rng)
        images.append(render_concept(scene, seed=f"lora:{cfg.seed}:{i}"))
        texts.append(training_caption(scene, rng))
    for i in range(cfg.n_regular):  # a seed the base model's training did not start from
        sample = scene_sample(10_000 + cfg.seed, i, two_object_fraction=0.3)
        images.append(sample.image)
        texts.append(sample.caption)
    length = model_defaults(pipe).max_sequence_length or 256
    embeds, pooled = _encode_texts(pipe, texts + [""], length, cfg.device)
    return {"latents": _encode_images(pipe, images, cfg.device), "embeds": embeds[:-1], "pooled": pooled[:-1],
            "empty": (embeds[-1:], pooled[-1:]),
            "concept": torch.arange(len(texts), device=cfg.device) < cfg.n_concept,
            "captions": texts}


def train_lora(pipe, cfg: LoraTrainConfig, out: str | Path, *, log=print) -> LoraTrainResult:
    """Train the concept LoRA on ``pipe`` (the scene model, on CPU) and write it to ``out`` (safetensors)."""
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    from ..precision.storage import replace_module

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    data = build_data(pipe, cfg)
    log(f"data: {len(data['latents'])} latents, {time.perf_counter() - start:.0f} s")
    torch.backends.cuda.matmul.allow_tf32 = True
    model = pipe.transformer.float().train()
    cls = _trainable_class()
    wrapped = {}
    for name, module in list(model.named_modules()):
        if name.endswith(cfg.targets) and isinstance(module, torch.nn.Linear):
            wrapped[name] = cls(module, cfg.rank)
            replace_module(model, name, wrapped[name])
    params = [p for w in wrapped.values() for p in (w.lora_A, w.lora_B)]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator(cfg.device).manual_seed(cfg.seed + 1)
    concept_idx = torch.nonzero(data["concept"]).flatten()
    regular_idx = torch.nonzero(~data["concept"]).flatten()
    empty_e, empty_p = data["empty"]
    losses: list[float] = []
    step = 0
    t0 = time.perf_counter()
    while step < cfg.steps and time.perf_counter() - t0 < cfg.seconds:
        progress = max(step / cfg.steps, (time.perf_counter() - t0) / cfg.seconds)  # whichever ends first
        lr = cfg.lr * min(1.0, (step + 1) / 20) * (0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
        for group in opt.param_groups:
            group["lr"] = lr
        half = cfg.batch // 2
        idx = torch.cat([concept_idx[torch.randint(len(concept_idx), (half,), generator=gen, device=cfg.device)],
                         regular_idx[torch.randint(len(regular_idx), (cfg.batch - half,), generator=gen,
                                                   device=cfg.device)]])
        x0, embeds, pooled = data["latents"][idx], data["embeds"][idx], data["pooled"][idx]
        drop = torch.rand(len(idx), generator=gen, device=cfg.device) < cfg.cfg_dropout
        embeds = torch.where(drop[:, None, None], empty_e.expand_as(embeds), embeds)
        pooled = torch.where(drop[:, None], empty_p.expand_as(pooled), pooled)
        noise = torch.randn(x0.shape, generator=gen, device=cfg.device)
        sigma = torch.sigmoid(torch.randn(len(idx), generator=gen, device=cfg.device))
        s = sigma[:, None, None, None]
        pred = model(hidden_states=(1 - s) * x0 + s * noise, encoder_hidden_states=embeds,
                     pooled_projections=pooled, timestep=sigma * 1000).sample
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        step += 1
        if step % 50 == 0:
            log(f"step {step}: loss {float(sum(losses[-50:])) / 50:.4f} ({time.perf_counter() - t0:.0f} s)")
    seconds = time.perf_counter() - t0
    losses = [float(v) for v in losses]
    tensors = {}
    for name, w in wrapped.items():
        tensors[f"transformer.{name}.lora_A.weight"] = w.lora_A.detach().cpu().to(torch.bfloat16).contiguous()
        tensors[f"transformer.{name}.lora_B.weight"] = w.lora_B.detach().cpu().to(torch.bfloat16).contiguous()
        replace_module(model, name, w.base)
    model.eval().requires_grad_(False)
    meta = {"transformer.r": cfg.rank, "transformer.lora_alpha": cfg.rank,
            "transformer.target_modules": sorted(set(cfg.targets))}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta, sort_keys=True)})
    return LoraTrainResult(str(out), {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
                           step, seconds, losses, out.stat().st_size)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="train the concept LoRA on the embedded scene model")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=LoraTrainConfig.steps)
    ap.add_argument("--seconds", type=float, default=LoraTrainConfig.seconds)
    ap.add_argument("--batch", type=int, default=LoraTrainConfig.batch)
    ap.add_argument("--rank", type=int, default=LoraTrainConfig.rank)
    ap.add_argument("--lr", type=float, default=LoraTrainConfig.lr)
    ap.add_argument("--threads", type=int, default=LoraTrainConfig.threads)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    from ..pipeline.loading import load_pipeline

    cfg = LoraTrainConfig(rank=args.rank, steps=args.steps, seconds=args.seconds, batch=args.batch, lr=args.lr,
                          threads=args.threads, device=args.device)
    import torch

    pipe = load_pipeline("scenes", device=args.device, dtype=torch.float32)
    result = train_lora(pipe, cfg, args.out, log=lambda m: print(m, file=sys.stderr, flush=True))
    record = {**asdict(result), "command": "python -m sd35fp8_helpers.lora.train " + " ".join(sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d")}
    record["losses"] = [round(v, 5) for v in result.losses]
    Path(args.out).with_suffix(".train.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "losses"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train the embedded scene model: an SD3-style VAE, then an ``SD3Transformer2DModel``, on captioned scenes.

``python -m sd35fp8_helpers.training.train_tiny OUT_DIR [--smoke]`` (or ``sd35fp8 train-tiny OUT_DIR``) writes a
``StableDiffusion3Pipeline`` folder in diffusers layout (safetensors only) that draws what its prompt names.

The recipe, and why:

1. **Data** — ``n_scenes`` scenes from :mod:`sd35fp8_helpers.scenes` (seeded; half with two objects), rendered
   once at 128², 128×192 and 192×128 (so non-square sizes are trained, not hoped for). Rendering runs in worker
   processes; sample *i* depends on (seed, i) only, so the data are the same with any number of workers.
2. **VAE** — ``AutoencoderKL`` in SD3's layout (16 latent channels, no quant convs, 8× down), trained on
   reconstruction: L1 + MSE + an edge term (L1 of image gradients: flat shapes live or die by their edges)
   and a small KL term. Its ``shift_factor`` and ``scaling_factor`` are then *measured* — the mean and
   1/std of the data's latents — as Stability did for SD3, so the transformer sees unit-variance latents.
3. **Text** — tiny CLIP-L, CLIP-G and T5 (random, frozen; :mod:`.text`); every caption is encoded once with
   the pipeline's own ``encode_prompt`` (T5 at :data:`~.text.T5_TOKENS` tokens), so training and inference see
   identical embeddings.
4. **Transformer** — rectified flow as ``FlowMatchEulerDiscreteScheduler`` samples it: x_σ = (1 − σ)·x₀ + σ·ε,
   timestep 1000·σ, the model predicts ε − x₀; σ is logit-normal (SD3's choice: most effort at mid noise).
   10% of captions are replaced by the empty prompt's embedding, so classifier-free guidance works. AdamW
   with a one-cycle schedule, bf16 autocast on GPU, and an exponential moving average of the weights (what
   ships: it averages away the last steps' noise).
5. **Budget** — each phase stops at its step count or its wall-clock budget, whichever comes first, so a
   run on a shared GPU ends in time; checkpoints are written as it goes.

The result's ``loss.json`` / ``loss.png`` hold both loss curves; ``sd35fp8_scenes.json`` the training record
and the settings the model expects at inference (``max_sequence_length`` above all).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCENE_MARKER = "sd35fp8_scenes.json"
"""Sidecar file of a trained scene model: training record and the inference settings it expects."""


@dataclass
class TrainConfig:
    """Everything that determines a training run (the defaults are the shipped model's recipe)."""

    out_dir: Path
    seed: int = 0
    n_scenes: int = 96_000
    buckets: tuple[tuple[int, int, float], ...] = ((128, 128, 0.6), (128, 192, 0.2), (192, 128, 0.2))
    """(height, width, share of the scenes) of each training size."""
    two_object_fraction: float = 0.5
    # VAE
    vae_channels: tuple[int, ...] = (32, 64, 128, 128)
    vae_layers_per_block: int = 1
    vae_steps: int = 5000
    vae_batch: int = 64
    vae_lr: float = 1e-3
    vae_seconds: float = 100.0
    vae_kl_weight: float = 1e-6
    # transformer
    layers: int = 6
    heads: int = 6
    head_dim: int = 32
    dual_attention_layers: tuple[int, ...] = (0, 1)
    steps: int = 20_000
    batch: int = 1024
    lr: float = 1e-3
    warmup_fraction: float = 0.05
    seconds: float = 360.0
    cfg_dropout: float = 0.1
    ema_decay: float = 0.998
    # inference defaults written into the model
    sample_steps: int = 16
    guidance_scale: float = 4.0
    scheduler_shift: float = 1.0
    # machinery
    device: str = "auto"
    workers: int = 0
    """Rendering processes (0: one per CPU core, up to 16)."""
    checkpoint_seconds: float = 60.0
    checkpoint_dir: Path | None = None
    """Where a copy of the EMA transformer is written every ``checkpoint_seconds`` (e.g. ``$OUT``)."""
    log_every: int = 50
    smoke: bool = False

    @classmethod
    def smoke_test(cls, out_dir: str | os.PathLike, **overrides: Any) -> TrainConfig:
        """A CPU run of every stage in well under a minute: the real architecture, a handful of steps.

        Bounded by steps, not seconds (the time budgets are generous), so a busy machine makes it slower,
        never different."""
        values: dict[str, Any] = dict(out_dir=Path(out_dir), n_scenes=96, buckets=((32, 32, 0.5), (32, 48, 0.5)),
                                      vae_steps=12, vae_batch=4, vae_lr=2e-3, vae_seconds=300.0, steps=30, batch=8,
                                      lr=1e-3, seconds=300.0, ema_decay=0.9, sample_steps=2, workers=1,
                                      log_every=4, smoke=True)
        values.update(overrides)
        return cls(**values)


@dataclass
class PhaseLog:
    """One training phase: its loss per step, steps done, seconds taken, and why it stopped."""

    name: str
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    stopped_by: str = "steps"

    @property
    def steps(self) -> int:
        return len(self.losses)

    def smoothed(self, window: int = 50) -> list[float]:
        """Running mean over ``window`` steps (what the plot shows)."""
        out, acc = [], 0.0
        for i, v in enumerate(self.losses):
            acc += v
            if i >= window:
                acc -= self.losses[i - window]
            out.append(acc / min(i + 1, window))
        return out

    @property
    def final_loss(self) -> float:
        """Mean loss of the last 10% of steps (a single step's loss is too noisy to quote)."""
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return float(sum(tail) / len(tail)) if tail else math.nan


@dataclass
class TrainResult:
    """What :func:`train_tiny` produced: the model folder, both phases, the measured latent statistics."""

    out_dir: Path
    vae: PhaseLog
    transformer: PhaseLog
    shift_factor: float
    scaling_factor: float
    parameters: dict[str, int]
    size_bytes: int
    seconds: float
    device: str
    versions: dict[str, str]

    def summary(self) -> str:
        return (f"trained scene model at {self.out_dir} ({self.size_bytes / 1e6:.1f} MB) on {self.device} in "
                f"{self.seconds / 60:.1f} min: VAE {self.vae.steps} steps (loss {self.vae.final_loss:.4f}), "
                f"transformer {self.transformer.steps} steps (loss {self.transformer.final_loss:.4f}), "
                f"shift {self.shift_factor:.4f}, scaling {self.scaling_factor:.4f}")


# ---- data --------------------------------------------------------------------------------------------------

def _render_range(args: tuple[int, int, int, int, int, float]) -> tuple[bytes, list[str], list[dict]]:
    import numpy as np

    from ..scenes.dataset import scene_sample

    seed, start, stop, height, width, two = args
    images, captions, specs = [], [], []
    for i in range(start, stop):
        s = scene_sample(seed, i, width, height, two_object_fraction=two)
        images.append(np.asarray(s.image, dtype=np.uint8))
        captions.append(s.caption)
        specs.append(s.spec.to_dict())
    return np.stack(images).tobytes(), captions, specs


@dataclass
class Bucket:
    """All training scenes of one size: uint8 images (N, H, W, 3), captions, and later latents/embeddings."""

    height: int
    width: int
    images: Any
    captions: list[str]
    latents: Any = None
    prompt_embeds: Any = None
    pooled: Any = None
    share: float = 1.0


def render_buckets(cfg: TrainConfig) -> list[Bucket]:
    """Render ``cfg.n_scenes`` scenes split over the size buckets; bucket *k* takes its own index range."""
    import numpy as np

    workers = cfg.workers or min(16, os.cpu_count() or 1)
    buckets, start = [], 0
    for height, width, share in cfg.buckets:
        n = max(1, round(cfg.n_scenes * share))
        chunk = max(1, math.ceil(n / (workers * 4)))
        jobs = [(cfg.seed, start + a, start + min(a + chunk, n), height, width, cfg.two_object_fraction)
                for a in range(0, n, chunk)]
        if workers > 1:
            import multiprocessing as mp

            with mp.get_context("fork" if sys.platform == "linux" else "spawn").Pool(workers) as pool:
                parts = pool.map(_render_range, jobs)
        else:
            parts = [_render_range(j) for j in jobs]
        images = np.concatenate([np.frombuffer(p[0], dtype=np.uint8).reshape(-1, height, width, 3) for p in parts])
        captions = [c for p in parts for c in p[1]]
        buckets.append(Bucket(height, width, images, captions, share=share))
        start += n
    return buckets


# ---- models ------------------------------------------------------------------------------------------------

def vae_config(cfg: TrainConfig) -> dict[str, Any]:
    """SD3's VAE layout (16 latent channels, no quant convs, four blocks = 8× down) at the configured widths."""
    n = len(cfg.vae_channels)
    return dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
                up_block_types=["UpDecoderBlock2D"] * n, block_out_channels=list(cfg.vae_channels),
                layers_per_block=cfg.vae_layers_per_block, latent_channels=16, norm_num_groups=8,
                use_quant_conv=False, use_post_quant_conv=False, sample_size=128, force_upcast=False)


def transformer_config(cfg: TrainConfig) -> dict[str, Any]:
    """``SD3Transformer2DModel`` as Medium is built (RMS qk-norm, dual attention in the first layers), narrow.

    ``sample_size`` 16 latents = 128 px native; ``pos_embed_max_size`` 32 allows one pass up to 512 px.
    """
    from .text import CLIP_CONFIG, T5_CONFIG

    hidden = cfg.heads * cfg.head_dim
    return dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=cfg.layers,
                attention_head_dim=cfg.head_dim, num_attention_heads=cfg.heads,
                joint_attention_dim=T5_CONFIG["d_model"], caption_projection_dim=hidden,
                pooled_projection_dim=2 * CLIP_CONFIG["projection_dim"], pos_embed_max_size=32,
                dual_attention_layers=tuple(cfg.dual_attention_layers), qk_norm="rms_norm")


def one_cycle(progress: float, warmup_fraction: float) -> float:
    """Learning-rate factor at ``progress`` ∈ [0, 1] of a phase: linear warm-up, then cosine to zero.

    Progress is the larger of steps done / steps and seconds spent / seconds, so a phase cut short by its
    wall-clock budget still anneals to zero instead of stopping at a high learning rate.
    """
    if progress < warmup_fraction:
        return max(progress / warmup_fraction, 1e-3)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup_fraction) / (1 - warmup_fraction))))


def _set_lr(opt, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def _to_unit(images_u8, device):
    import torch

    x = torch.as_tensor(images_u8).to(device, non_blocking=True)
    return x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, mininterval=5.0, file=sys.stdout, dynamic_ncols=False, ncols=100)


def train_vae(cfg: TrainConfig, buckets: list[Bucket], device: str) -> tuple[Any, PhaseLog]:
    """Train the VAE on every bucket's images (it is convolutional: sizes mix freely between steps)."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL

    torch.manual_seed(cfg.seed + 1)
    vae = AutoencoderKL(**vae_config(cfg)).to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    rng = random.Random(f"vae:{cfg.seed}")
    log, start = PhaseLog("vae"), time.perf_counter()
    amp = device.startswith("cuda")
    bar = _progress(cfg.vae_steps, "VAE")
    pending: list[Any] = []
    for step in range(cfg.vae_steps):
        progress = max(step / cfg.vae_steps, (time.perf_counter() - start) / cfg.vae_seconds)
        if progress >= 1:
            log.stopped_by = "time"
            break
        _set_lr(opt, cfg.vae_lr * one_cycle(progress, cfg.warmup_fraction))
        b = rng.choices(buckets, weights=[bk.share for bk in buckets])[0]
        idx = sorted(rng.sample(range(len(b.images)), min(cfg.vae_batch, len(b.images))))
        x = _to_unit(b.images[idx], device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample.float()
        kl = 0.5 * (post.mean.float() ** 2 + post.var.float() - 1 - post.logvar.float()).mean()
        edge = (F.l1_loss(rec[..., 1:, :] - rec[..., :-1, :], x[..., 1:, :] - x[..., :-1, :])
                + F.l1_loss(rec[..., 1:] - rec[..., :-1], x[..., 1:] - x[..., :-1]))
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 0.5 * edge + cfg.vae_kl_weight * kl * 1e3
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        pending.append(loss.detach())
        if len(pending) == cfg.log_every:  # one device sync per log_every steps, not per step
            log.losses += torch.stack(pending).float().cpu().tolist()
            pending.clear()
            bar.set_postfix(loss=f"{log.smoothed()[-1]:.4f}")
        bar.update(1)
    log.losses += [float(v) for v in pending]
    bar.close()
    log.seconds = time.perf_counter() - start
    return vae.eval().requires_grad_(False), log


def encode_buckets(vae, buckets: list[Bucket], device: str, batch: int = 256) -> tuple[float, float]:
    """Encode every image to its latent mean; return (shift, scaling) measured on all latents."""
    import torch

    with torch.inference_mode():
        for b in buckets:
            parts = [vae.encode(_to_unit(b.images[i:i + batch], device)).latent_dist.mean.float()
                     for i in range(0, len(b.images), batch)]
            b.latents = torch.cat(parts)
        flat = torch.cat([b.latents.flatten() for b in buckets])
        shift = float(flat.mean())
        scaling = float(1.0 / (flat - shift).std())
    return shift, scaling


def encode_captions(pipe, buckets: list[Bucket], device: str, batch: int = 512) -> tuple[Any, Any]:
    """Every caption through the pipeline's own ``encode_prompt``; returns the empty prompt's (embeds, pooled)."""
    import torch

    from .text import T5_TOKENS

    def enc(texts: list[str]):
        e, _, p, _ = pipe.encode_prompt(prompt=texts, prompt_2=None, prompt_3=None, device=device,
                                        do_classifier_free_guidance=False, max_sequence_length=T5_TOKENS)
        return e.float(), p.float()

    with torch.inference_mode():
        for b in buckets:
            embeds, pooled = zip(*(enc(b.captions[i:i + batch]) for i in range(0, len(b.captions), batch)),
                                 strict=True)
            b.prompt_embeds, b.pooled = torch.cat(embeds), torch.cat(pooled)
        return enc([""])


def train_transformer(cfg: TrainConfig, buckets: list[Bucket], empty: tuple[Any, Any], shift: float,
                      scaling: float, device: str) -> tuple[Any, PhaseLog]:
    """Rectified-flow training of the transformer; returns the EMA weights' model and the loss log."""
    import copy

    import torch
    import torch.nn.functional as F
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(cfg.seed)
    model = SD3Transformer2DModel(**transformer_config(cfg)).to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    decay_params = [p for p in params if p.ndim >= 2]
    other = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay_params, "weight_decay": 0.01}, {"params": other, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.99), fused=device.startswith("cuda"))
    gen = torch.Generator(device).manual_seed(cfg.seed + 7)
    rng = random.Random(f"transformer:{cfg.seed}")
    empty_embeds, empty_pooled = empty
    amp = device.startswith("cuda")
    log, start, last_ckpt = PhaseLog("transformer"), time.perf_counter(), time.perf_counter()
    ema_params, model_params = list(ema.parameters()), list(model.parameters())
    bar = _progress(cfg.steps, "transformer")
    pending: list[Any] = []
    for step in range(cfg.steps):
        progress = max(step / cfg.steps, (time.perf_counter() - start) / cfg.seconds)
        if progress >= 1:
            log.stopped_by = "time"
            break
        _set_lr(opt, cfg.lr * one_cycle(progress, cfg.warmup_fraction))
        b = rng.choices(buckets, weights=[bk.share for bk in buckets])[0]
        n = len(b.latents)
        idx = torch.randint(0, n, (min(cfg.batch, n),), generator=gen, device=device)
        x0 = (b.latents[idx] - shift) * scaling
        embeds, pooled = b.prompt_embeds[idx], b.pooled[idx]
        drop = torch.rand(len(idx), generator=gen, device=device) < cfg.cfg_dropout
        embeds = torch.where(drop[:, None, None], empty_embeds.expand_as(embeds), embeds)
        pooled = torch.where(drop[:, None], empty_pooled.expand_as(pooled), pooled)
        noise = torch.randn(x0.shape, generator=gen, device=device)
        sigma = torch.sigmoid(torch.randn(len(idx), generator=gen, device=device))  # logit-normal(0, 1)
        s = sigma[:, None, None, None]
        xt = (1 - s) * x0 + s * noise
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            pred = model(hidden_states=xt, encoder_hidden_states=embeds, pooled_projections=pooled,
                         timestep=sigma * 1000).sample
        loss = F.mse_loss(pred.float(), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, model_params, 1 - decay)
        pending.append(loss.detach())
        if len(pending) == cfg.log_every:
            log.losses += torch.stack(pending).float().cpu().tolist()
            pending.clear()
            bar.set_postfix(loss=f"{log.smoothed()[-1]:.4f}")
        bar.update(1)
        if cfg.checkpoint_dir and time.perf_counter() - last_ckpt > cfg.checkpoint_seconds:
            _checkpoint(ema, cfg.checkpoint_dir, log)
            last_ckpt = time.perf_counter()
    log.losses += [float(v) for v in pending]
    bar.close()
    log.seconds = time.perf_counter() - start
    return ema, log


def _checkpoint(model, folder: Path, log: PhaseLog) -> None:
    """The EMA transformer so far, bf16 safetensors (overwritten each time: the newest is what matters)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.bfloat16).cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = folder / ".transformer-checkpoint.safetensors.partial"
    save_file(state, str(tmp), metadata={"steps": str(log.steps)})
    tmp.replace(folder / "transformer-checkpoint.safetensors")


# ---- saving ------------------------------------------------------------------------------------------------

def plot_losses(logs: list[PhaseLog], path: Path) -> Path:
    """Both loss curves (raw and smoothed, log scale) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(logs), figsize=(5 * len(logs), 3.2), squeeze=False)
    for ax, log in zip(axes[0], logs, strict=True):
        ax.plot(log.losses, color="0.8", lw=0.6, label="per step")
        ax.plot(log.smoothed(), color="C0", lw=1.5, label="mean of 50")
        ax.set_yscale("log")
        ax.set_title(f"{log.name}: {log.steps} steps, {log.seconds:.0f} s, final {log.final_loss:.4f}", fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("loss")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def write_manifest(folder: Path) -> Path:
    """``sha256sums.txt`` over every file of the folder (what ``load_pipeline`` and ``sd35fp8 verify`` check)."""
    from ..weights.verify import MANIFEST_NAME
    from ..weights.verify import write_manifest as _write

    hashes = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.name != MANIFEST_NAME:
            hashes[f.relative_to(folder).as_posix()] = hashlib.sha256(f.read_bytes()).hexdigest()
    return _write(folder, hashes)


def save_pipeline(pipe, out: Path, record: dict[str, Any]) -> int:
    """Write the pipeline (transformer and VAE in bf16, text encoders fp32) atomically; returns its bytes."""
    import torch

    from ..display import quiet_loading_bars

    quiet_loading_bars()
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        pipe.transformer.to(torch.bfloat16)
        pipe.vae.to(torch.bfloat16)
        pipe.save_pretrained(staging, safe_serialization=True)
        pipe.transformer.float()
        pipe.vae.float()
        (staging / SCENE_MARKER).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        for name in ("loss.json", "loss.png"):
            if (out / name).is_file():
                shutil.copy2(out / name, staging / name)
        write_manifest(staging)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _folder_size(out)


def _versions() -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "python": sys.version.split()[0]}


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({os.cpu_count()} cores)"


def train_tiny(config: TrainConfig) -> TrainResult:
    """Train the scene model end to end and save it to ``config.out_dir`` (see the module docstring)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from .text import T5_TOKENS, build_text_components

    t0, cpu0 = time.perf_counter(), time.process_time()
    device = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = Path(config.out_dir)
    print(f"[data] rendering {config.n_scenes} scenes at {[(h, w) for h, w, _ in config.buckets]}", flush=True)
    buckets = render_buckets(config)
    print(f"[data] {sum(len(b.images) for b in buckets)} scenes in {time.perf_counter() - t0:.1f} s", flush=True)

    vae, vae_log = train_vae(config, buckets, device)
    shift, scaling = encode_buckets(vae, buckets, device)
    vae.register_to_config(shift_factor=shift, scaling_factor=scaling)
    print(f"[vae] {vae_log.steps} steps in {vae_log.seconds:.0f} s, loss {vae_log.final_loss:.4f}; "
          f"latent shift {shift:.4f}, scaling {scaling:.4f}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        text = build_text_components(config.seed, Path(tmp))
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=config.scheduler_shift)
        pipe = StableDiffusion3Pipeline(transformer=None, vae=vae, scheduler=scheduler, **text)
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            getattr(pipe, name).to(device)
        empty = encode_captions(pipe, buckets, device)
        for b in buckets:
            b.images = None  # pixels are no longer needed: free the memory for the transformer phase
        transformer, tr_log = train_transformer(config, buckets, empty, shift, scaling, device)
        print(f"[transformer] {tr_log.steps} steps in {tr_log.seconds:.0f} s ({tr_log.stopped_by}), "
              f"loss {tr_log.final_loss:.4f}", flush=True)
        pipe.transformer = transformer
        pipe.register_modules(transformer=transformer)
        pipe.to("cpu")

        out.mkdir(parents=True, exist_ok=True)
        (out / "loss.json").write_text(json.dumps({log.name: {"losses": [round(v, 6) for v in log.losses],
                                                              "seconds": round(log.seconds, 1),
                                                              "stopped_by": log.stopped_by,
                                                              "final_loss": log.final_loss}
                                                   for log in (vae_log, tr_log)}) + "\n")
        plot_losses([vae_log, tr_log], out / "loss.png")
        seconds = time.perf_counter() - t0
        parameters = {name: sum(p.numel() for p in getattr(pipe, name).parameters())
                      for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")}
        cfg_dict = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
        record = {
            "format": 1,
            "inference": {"max_sequence_length": T5_TOKENS, "steps": config.sample_steps,
                          "guidance_scale": config.guidance_scale, "height": 128, "width": 128},
            "training": {"config": cfg_dict, "device": _device_name(device), "versions": _versions(),
                         "date": time.strftime("%Y-%m-%d", time.gmtime()), "minutes": round(seconds / 60, 2),
                         "cpu_seconds": round(time.process_time() - cpu0, 1), "threads": torch.get_num_threads(),
                         "vae_steps": vae_log.steps, "vae_final_loss": vae_log.final_loss,
                         "transformer_steps": tr_log.steps, "transformer_final_loss": tr_log.final_loss,
                         "shift_factor": shift, "scaling_factor": scaling, "parameters": parameters,
                         "command": "python -m sd35fp8_helpers.training.train_tiny " + " ".join(sys.argv[1:])},
        }
        size = save_pipeline(pipe, out, record)
    result = TrainResult(out, vae_log, tr_log, shift, scaling, parameters, size, seconds, _device_name(device),
                         _versions())
    print(result.summary(), flush=True)
    return result


def load_scene_record(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The ``sd35fp8_scenes.json`` record of a trained scene model folder (``None`` for other models)."""
    path = Path(folder) / SCENE_MARKER
    return json.loads(path.read_text()) if path.is_file() else None


def main(argv: list[str] | None = None) -> int:
    """``python -m sd35fp8_helpers.training.train_tiny OUT_DIR [--smoke] [--seconds S] …``"""
    parser = argparse.ArgumentParser(prog="train-tiny", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--smoke", action="store_true", help="a few CPU steps of every stage (< 60 s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scenes", type=int, help="number of training scenes")
    parser.add_argument("--vae-steps", type=int)
    parser.add_argument("--vae-seconds", type=float)
    parser.add_argument("--steps", type=int, help="transformer steps")
    parser.add_argument("--seconds", type=float, help="transformer wall-clock budget")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--layers", type=int, help="transformer blocks")
    parser.add_argument("--heads", type=int, help="attention heads of 32 channels (width = 32 × heads)")
    parser.add_argument("--lr", type=float, help="transformer peak learning rate (one-cycle)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--checkpoint-dir", type=Path)
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in dict(seed=args.seed, n_scenes=args.scenes, vae_steps=args.vae_steps,
                                       vae_seconds=args.vae_seconds, steps=args.steps, seconds=args.seconds,
                                       batch=args.batch, layers=args.layers, heads=args.heads, lr=args.lr,
                                       device=args.device, checkpoint_dir=args.checkpoint_dir).items()
                 if v is not None}
    cfg = TrainConfig.smoke_test(args.out_dir, **overrides) if args.smoke else TrainConfig(args.out_dir, **overrides)
    train_tiny(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

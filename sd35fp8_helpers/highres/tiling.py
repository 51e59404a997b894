"""Tiled VAE decoding and encoding for the SD3 ``AutoencoderKL``: any size, the memory of one tile, one tone.

Why VAE memory grows with area
    The decoder's last stages run at full resolution with 256 → 128 channels. Untiled, about 768 activation
    values per *output pixel* are alive at the peak (the last up block's first resnet: its input, the
    GroupNorm output and the SiLU output, 3 × 256 channels) — 1.5 KiB per pixel in bf16, so memory is
    proportional to width × height: measured on an H100, 2.6 GiB at 1024², 9.7 GiB at 2048², 38 GiB at 4096²
    (shared/REFERENCE.md §10). :func:`activation_bytes_per_px` derives the figure from any VAE config.

Why naive tiles show seams and tone shifts
    Decoding tiles independently changes two things near every border: (1) convolutions at a tile's edge see
    zero padding instead of their neighbours, and (2) every GroupNorm normalises with *that tile's* mean and
    variance — a tile of sky and a tile of forest get different brightness and contrast. diffusers'
    ``enable_tiling()`` blends 25 % overlaps, which hides (1) but not (2) ("tone variation", its docs say).

What :func:`decode_tiled` does instead (the idea of the A1111 "Tiled Diffusion & VAE" extension, rewritten)
    1. ``conv_in`` and the mid block run once on the whole latent — 1/64 of the pixels, so cheap — with its
       global self-attention computed exactly, in query chunks.
    2. The up blocks run tile by tile, **layer-synchronously**: every tile advances to its next GroupNorm,
       reports count/mean/M2 per group over its *core* (the part of the image it owns; cores partition the
       image), and parks its activations (on CPU when computing on a GPU). Once all tiles have reported, the
       statistics of the whole image are sent back and each tile continues. Every tile is normalised exactly
       as the untiled decoder would normalise it, so there is no tone shift at all.
    3. Each tile computes ``pad_px`` of extra context beyond its window; neighbouring windows overlap by
       ``overlap_px`` and are blended with a linear feather, which hides what little the truncated context
       changes.

Memory: one tile's activations (:func:`activation_bytes_per_px` × tile area) + the mid block on the whole
latent (about 4 × 512 channels × H/8 × W/8 values: 1 GiB at 4096² in bf16) + the output image. The price:
every GroupNorm is a barrier, so activations travel to the CPU and back ~25 times per decode. Measured on an
H100 (docs/benchmarks.md): 4096² in 1.61 GiB and 31.5 s with 2.2 % error vs untiled, where untiled needs
38.2 GiB / 5.7 s and diffusers' tiling 2.73 GiB / 3.5 s with 4.9 % error (9.4 % at our 512-px tile size).

Example (like ``pipe.vae.decode(latents).sample``, at any size):
    >>> import torch
    >>> from sd35fp8_helpers import load_pipeline
    >>> pipe = load_pipeline("tiny", device="cpu")
    >>> latents = torch.randn(1, 16, 40, 56)                      # a 320 × 448 px image
    >>> decode_tiled(pipe.vae, latents, TileConfig(tile_px=256, progress=False)).shape
    torch.Size([1, 3, 320, 448])
    >>> str(plan_tiles(pipe.vae, 320, 448, TileConfig(tile_px=256)))
    '20 tiles (4 × 5) of up to 256 px over 320 × 448 px'
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import InvalidTilingInput

Direction = Literal["decode", "encode"]
Box = tuple[int, int, int, int]
"""(y0, y1, x0, x1) in latent units (one latent = 8 × 8 pixels for SD3)."""

DEFAULT_TILE_MEMORY = 1 << 30
"""Activation bytes one tile may use when ``tile_px`` is not given (1 GiB → ~700 px tiles in bf16)."""

ALLOCATOR_OVERHEAD = 1.6
"""Measured peak ÷ analytic live activations: 38.2 GiB measured at 4096² bf16 untiled (REFERENCE §10) is
2.44 KiB per pixel against 1.5 KiB counted by :func:`activation_bytes_per_px` (convolution workspaces and
caching-allocator slack). Used only to pick a tile size from a memory budget."""

_MIN_CORE_LATENTS = 2


@dataclass(frozen=True)
class TileConfig:
    """How to tile the VAE. Sizes are in output pixels and must be multiples of 8 (one latent).

    tile_px:         side of the region one tile computes (its pixels + overlap + context). ``None`` picks
                     the largest tile whose activations fit ``tile_memory``.
    overlap_px:      width of the feathered band shared by two neighbouring tiles (multiple of 16).
    pad_px:          extra context each tile computes beyond its band, then throws away (multiple of 8).
    tile_memory:     activation budget in bytes for one tile (used when ``tile_px`` is None).
    sync_group_norm: normalise with whole-image statistics (True) or per-tile ones (False: naive tiling,
                     kept for comparisons and the seam test's control).
    offload:         park tiles' activations in (pinned) CPU memory between GroupNorms when computing on
                     CUDA (``None``/True); False keeps them on the GPU (all tiles at once: untiled memory).
    progress:        tqdm bar over tiles × layers.
    """

    tile_px: int | None = None
    overlap_px: int = 32
    pad_px: int = 64
    tile_memory: int = DEFAULT_TILE_MEMORY
    sync_group_norm: bool = True
    offload: bool | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        fix = "use e.g. TileConfig(tile_px=512, overlap_px=32, pad_px=64) (the defaults, with a tile size)"
        if self.tile_px is not None and (not isinstance(self.tile_px, int) or self.tile_px < 8 or self.tile_px % 8):
            raise InvalidTilingInput("tile_px", self.tile_px, "must be a positive multiple of 8 px (one latent)",
                                     fix=fix)
        if not isinstance(self.overlap_px, int) or self.overlap_px < 0 or self.overlap_px % 16:
            raise InvalidTilingInput("overlap_px", self.overlap_px,
                                     "must be a multiple of 16 px >= 0 (half of it on each side of a border, "
                                     "in whole latents)", fix=fix)
        if not isinstance(self.pad_px, int) or self.pad_px < 0 or self.pad_px % 8:
            raise InvalidTilingInput("pad_px", self.pad_px, "must be a multiple of 8 px >= 0", fix=fix)
        if self.tile_px is not None and self.core_latents(self.tile_px) < _MIN_CORE_LATENTS:
            need = self.overlap_px + 2 * self.pad_px + 8 * _MIN_CORE_LATENTS
            raise InvalidTilingInput("tile_px", self.tile_px,
                                     f"leaves no pixels of its own after overlap_px={self.overlap_px} and "
                                     f"pad_px={self.pad_px} on both sides; need tile_px >= {need}",
                                     fix="use a larger tile_px or a smaller overlap_px / pad_px")
        if self.tile_memory <= 0:
            raise InvalidTilingInput("tile_memory", self.tile_memory, "must be a positive number of bytes")

    def core_latents(self, tile_px: int) -> int:
        """Latents an interior tile owns, once overlap and context on both sides are taken away."""
        return tile_px // 8 - self.overlap_px // 8 - 2 * (self.pad_px // 8)


@dataclass(frozen=True)
class Tile:
    """One tile. ``core``: the part it owns (cores partition the image); ``window``: core + half the overlap
    on interior sides (where its output is blended in); ``region``: window + context (what it computes)."""

    core: Box
    window: Box
    region: Box


@dataclass(frozen=True)
class TilePlan:
    """Tiles covering a ``height × width`` latent (× ``factor`` px), and where their borders lie."""

    height: int
    width: int
    factor: int
    tile_px: int
    tiles: tuple[Tile, ...]

    @property
    def borders_px(self) -> tuple[list[int], list[int]]:
        """Interior tile borders in pixels: (rows, columns). The seam metric looks there."""
        rows = sorted({t.core[1] for t in self.tiles if t.core[1] < self.height})
        cols = sorted({t.core[3] for t in self.tiles if t.core[3] < self.width})
        return [r * self.factor for r in rows], [c * self.factor for c in cols]

    def __len__(self) -> int:
        return len(self.tiles)

    def __str__(self) -> str:
        ny = len({t.core[:2] for t in self.tiles})
        return (f"{len(self.tiles)} tiles ({ny} × {len(self.tiles) // ny}) of up to {self.tile_px} px over "
                f"{self.height * self.factor} × {self.width * self.factor} px")


# --- public API -------------------------------------------------------------------------------------------

def activation_bytes_per_px(vae, direction: Direction = "decode", dtype: Any = None) -> float:
    """Peak live activation bytes per output (decode) or input (encode) pixel of the tiled stages.

    Derived by walking the blocks: a resnet holds its input, the GroupNorm output and the SiLU output
    (3 × its input channels) at the peak; an upsampler holds its input and two tensors at twice the size.
    Real SD3 VAE: 768 values per pixel when decoding (the last block's first resnet, 3 × 256 channels),
    1.5 KiB in bf16. Multiply by :data:`ALLOCATOR_OVERHEAD` for what a CUDA allocator really reserves.
    """
    import torch

    element = torch.tensor([], dtype=dtype or vae.dtype).element_size()
    factor = _vae_factor(vae)
    blocks = vae.decoder.up_blocks if direction == "decode" else vae.encoder.down_blocks
    scale, peak = (1 if direction == "decode" else factor), 0.0
    for block in blocks:
        px = (scale / factor) ** 2  # pixels of this stage per output (input) pixel
        for r in block.resnets:
            c_in, c_out = r.in_channels, r.out_channels or r.in_channels
            peak = max(peak, px * max(3 * c_in, 2 * c_in + c_out, c_in + 3 * c_out))
        for up in getattr(block, "upsamplers", None) or []:
            peak = max(peak, px * up.channels * 9)  # input + interpolated + conv output, both 4× the area
            scale *= 2
        for down in getattr(block, "downsamplers", None) or []:
            peak = max(peak, px * down.channels * 1.5)
            scale //= 2
    return peak * element


def plan_tiles(vae, height_px: int, width_px: int, config: TileConfig = TileConfig(),
               direction: Direction = "decode") -> TilePlan:
    """The tiles :func:`decode_tiled` / :func:`encode_tiled` would use for an image of this size."""
    factor = _vae_factor(vae)
    for name, value in (("height", height_px), ("width", width_px)):
        _check_pixels(name, value, factor)
    tile_px = config.tile_px or _tile_px_for_budget(vae, config, direction)
    core = config.core_latents(tile_px)
    half, pad = config.overlap_px // 16, config.pad_px // 8
    h, w = height_px // factor, width_px // factor
    tiles = []
    for y0, y1 in _split(h, core):
        for x0, x1 in _split(w, core):
            window = _grow((y0, y1, x0, x1), half, h, w)
            tiles.append(Tile((y0, y1, x0, x1), window, _grow(window, pad, h, w)))
    return TilePlan(h, w, factor, tile_px, tuple(tiles))


def decode_tiled(vae, latents, config: TileConfig = TileConfig()):
    """``vae.decode(latents).sample``, computed tile by tile with whole-image GroupNorm statistics.

    ``latents`` are what ``vae.decode`` takes (for SD3: ``latents / scaling_factor + shift_factor``). The
    result has the VAE's dtype and device, shape ``(B, 3, 8·h, 8·w)``, values about in [-1, 1].

    Example: see the module docstring.
    """
    import torch

    if latents.ndim != 4 or latents.shape[1] != vae.config.latent_channels:
        raise InvalidTilingInput("latents.shape", tuple(latents.shape),
                                 f"is not (batch, {vae.config.latent_channels}, height, width)",
                                 fix="pass the latents vae.decode would take (unpack/unscale them first)")
    factor = _vae_factor(vae)
    plan = plan_tiles(vae, latents.shape[-2] * factor, latents.shape[-1] * factor, config, "decode")
    dec = vae.decoder
    with torch.no_grad():
        z = latents.to(vae.dtype)
        if vae.post_quant_conv is not None:
            z = vae.post_quant_conv(z)
        z = _mid_block(dec.mid_block, dec.conv_in(z), config.tile_memory)
        z = z.to(next(iter(dec.up_blocks.parameters())).dtype)
        out = _run_tiles(plan, z, 1, lambda x, run: _decode_tile(dec, x, run), config,
                         dec.conv_out.out_channels, _count_norms(dec.up_blocks) + 1, "VAE decode")
    return out.to(vae.dtype)


def encode_tiled(vae, images, config: TileConfig = TileConfig()):
    """``vae.encode(images).latent_dist``, computed tile by tile with whole-image GroupNorm statistics.

    ``images``: ``(B, 3, H, W)`` in [-1, 1], H and W multiples of 8. Returns diffusers'
    ``DiagonalGaussianDistribution`` (``.mode()``, ``.sample(generator)``), exactly like ``vae.encode``.
    """
    import torch
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    if images.ndim != 4 or images.shape[1] != vae.config.in_channels:
        raise InvalidTilingInput("images.shape", tuple(images.shape),
                                 f"is not (batch, {vae.config.in_channels}, height, width)",
                                 fix="pass images as a (B, 3, H, W) tensor in [-1, 1] (pipe.image_processor.preprocess)")
    plan = plan_tiles(vae, images.shape[-2], images.shape[-1], config, "encode")
    enc = vae.encoder
    with torch.no_grad():
        x = images.to(vae.dtype)
        h = _run_tiles(plan, x, plan.factor, lambda t, run: _encode_tile(enc, t, run), config,
                       enc.down_blocks[-1].resnets[-1].out_channels, _count_norms(enc.down_blocks),
                       "VAE encode").to(vae.dtype)
        h = _mid_block(enc.mid_block, h, config.tile_memory)
        h = enc.conv_out(enc.conv_act(enc.conv_norm_out(h)))
        if vae.quant_conv is not None:
            h = vae.quant_conv(h)
    return DiagonalGaussianDistribution(h)


def decode_with_diffusers(vae, latents, tile_px: int | None = None):
    """``vae.decode(latents).sample`` untiled (``tile_px=None``), or with diffusers' own ``enable_tiling()`` at
    ``tile_px`` (25 % blended overlaps, per-tile GroupNorm) — the references :func:`decode_tiled` is compared
    with. Tiling is switched off again afterwards."""
    import torch

    if tile_px is None:
        with torch.no_grad():
            return vae.decode(latents).sample
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size = tile_px, tile_px // _vae_factor(vae)
    try:
        with torch.no_grad():
            return vae.decode(latents).sample
    finally:
        vae.disable_tiling()


# --- planning ---------------------------------------------------------------------------------------------

def _vae_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _check_pixels(name: str, value: int, factor: int) -> None:
    from ..pipeline.generation import _nearest_multiples

    if not isinstance(value, int) or value < factor:
        raise InvalidTilingInput(name, value, f"must be a whole number of pixels >= {factor}")
    if value % factor:
        raise InvalidTilingInput(name, value, f"is not a multiple of {factor} px (the VAE works on "
                                 f"{factor}×{factor} pixel blocks); nearest valid: "
                                 f"{_nearest_multiples(value, factor)}",
                                 fix="resize or crop the image to a multiple of 8 px first")


def _tile_px_for_budget(vae, config: TileConfig, direction: Direction) -> int:
    per_px = activation_bytes_per_px(vae, direction) * ALLOCATOR_OVERHEAD
    side = int(math.sqrt(config.tile_memory / per_px)) // 8 * 8
    return max(side, config.overlap_px + 2 * config.pad_px + 8 * _MIN_CORE_LATENTS)


def _count_norms(module) -> int:
    import torch

    return sum(isinstance(m, torch.nn.GroupNorm) for m in module.modules())


def _split(length: int, core: int) -> list[tuple[int, int]]:
    """Cut ``length`` into the fewest near-equal pieces of at most ``core`` (no runt last tile)."""
    n = max(1, math.ceil(length / core))
    edges = [round(i * length / n) for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _grow(box: Box, by: int, h: int, w: int) -> Box:
    y0, y1, x0, x1 = box
    return max(0, y0 - by), min(h, y1 + by), max(0, x0 - by), min(w, x1 + by)


def _feather(tile: Tile, factor: int, device) -> Any:
    """Weights over the tile's window (pixels at ``factor``): linear ramps across each shared band."""
    import torch

    def ramp(w0, w1, c0, c1):
        n = (w1 - w0) * factor
        pos = torch.arange(n, device=device, dtype=torch.float32) + 0.5
        up = pos / (2 * (c0 - w0) * factor) if c0 > w0 else torch.ones(n, device=device)
        down = (n - pos) / (2 * (w1 - c1) * factor) if w1 > c1 else torch.ones(n, device=device)
        return torch.minimum(up, down).clamp(max=1.0)

    (cy0, cy1, cx0, cx1), (wy0, wy1, wx0, wx1) = tile.core, tile.window
    return ramp(wy0, wy1, cy0, cy1)[:, None] * ramp(wx0, wx1, cx0, cx1)[None, :]


# --- layer-synchronous execution ---------------------------------------------------------------------------

Stats = tuple[int, Any, Any]
"""(count, mean, M2) per (batch, group), float64 on the device: what a tile reports at a GroupNorm barrier."""


@dataclass
class _TileRun:
    """One tile while the pass runs: where its core lies at the current resolution, and where it parks."""

    tile: Tile
    scale: int  # pixels per latent at the current stage (decode: 1 → 8; encode: 8 → 1)
    sync: bool
    offload: bool = False

    def core_view(self, x):
        (cy0, cy1, cx0, cx1), (ry0, _, rx0, _) = self.tile.core, self.tile.region
        s = self.scale
        return x[:, :, (cy0 - ry0) * s:(cy1 - ry0) * s, (cx0 - rx0) * s:(cx1 - rx0) * s]

    def group_norm(self, gn, box: list) -> Generator[Stats, Any, list]:
        """Normalise ``box[0]`` with whole-image statistics: report this tile's, wait, apply everyone's.

        ``box`` holds the only references to the tile's live tensors (``[x]`` or ``[x, residual]``); it is
        emptied while the tile waits, so parking really frees GPU memory. Returns the list, normalised.
        """
        if not self.sync:
            return [gn(box[0]), *box[1:]]
        stats = _partial_stats(self.core_view(box[0]), gn.num_groups)
        same = len(box) > 1 and box[1] is box[0]
        tensors = box[:1] if same else list(box)
        box.clear()
        if self.offload:
            device = tensors[0].device
            tensors = [_park(t) for t in tensors]
            mean, var = yield stats
            tensors = [t.to(device, non_blocking=True) for t in tensors]
        else:
            mean, var = yield stats
        if same:
            tensors.append(tensors[0])
        return [_apply_group_norm(tensors[0], gn, mean, var), *tensors[1:]]


def _park(t):
    """Copy a CUDA tensor to pinned CPU memory without waiting: torch caches pinned blocks, and the copy
    back is ordered after this one on the same stream."""
    import torch

    buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
    return buf.copy_(t, non_blocking=True)


def _run_tiles(plan: TilePlan, source, in_scale: int, tile_fn: Callable, config: TileConfig,
               out_channels: int, barriers: int, desc: str):
    """Run ``tile_fn([region of source], run)`` generators in lock-step; blend their outputs into one canvas."""
    import torch
    from tqdm.auto import tqdm

    device = source.device
    offload = device.type == "cuda" and config.offload is not False  # parking is for accelerators only
    out_scale = plan.factor if in_scale == 1 else 1
    b = source.shape[0]
    canvas = torch.zeros(b, out_channels, plan.height * out_scale, plan.width * out_scale, device=device,
                         dtype=torch.float32)
    weight = torch.zeros(plan.height * out_scale, plan.width * out_scale, device=device)
    runs, gens = [], []
    for tile in plan.tiles:
        y0, y1, x0, x1 = (v * in_scale for v in tile.region)
        run = _TileRun(tile, in_scale, config.sync_group_norm, offload)
        runs.append(run)
        gens.append(tile_fn([source[:, :, y0:y1, x0:x1]], run))
    rounds = barriers + 1 if config.sync_group_norm else 1
    bar = tqdm(total=len(gens) * rounds, desc=f"{desc}: {len(gens)} tiles × {rounds} stages",
               disable=not config.progress, leave=False)
    replies: list[Any] = [None] * len(gens)
    live = list(range(len(gens)))
    while live:
        reports, still = [], []
        for i in live:
            try:
                reports.append(gens[i].send(replies[i]))
                still.append(i)
            except StopIteration as done:
                _blend(canvas, weight, runs[i].tile, done.value, out_scale)
            bar.update()
        if still and len(still) != len(live):
            raise RuntimeError("tiles reached different GroupNorm barriers (the VAE blocks differ per tile?)")
        if reports:
            merged = _merge(reports)
            for i in still:
                replies[i] = merged
        live = still
    bar.close()
    return canvas.div_(weight)


def _blend(canvas, weight, tile: Tile, y, s: int) -> None:
    (wy0, wy1, wx0, wx1), (ry0, _, rx0, _) = tile.window, tile.region
    crop = y[:, :, (wy0 - ry0) * s:(wy1 - ry0) * s, (wx0 - rx0) * s:(wx1 - rx0) * s]
    w = _feather(tile, s, canvas.device)
    canvas[:, :, wy0 * s:wy1 * s, wx0 * s:wx1 * s].add_(crop.float() * w)
    weight[wy0 * s:wy1 * s, wx0 * s:wx1 * s].add_(w)


def _partial_stats(core, groups: int) -> Stats:
    import torch

    b, c, h, w = core.shape
    per = c // groups
    means, variances = [], []
    for g in range(groups):  # one group at a time: the float32 copy stays 1/groups of the tile
        var, mean = torch.var_mean(core[:, g * per:(g + 1) * per].float(), dim=(1, 2, 3), correction=0)
        means.append(mean)
        variances.append(var)
    n = per * h * w  # stays on the device: no synchronisation per tile
    return n, torch.stack(means, 1).double(), torch.stack(variances, 1).double() * n


def _merge(reports: list[Stats]):
    """Chan et al.'s parallel mean/variance: exact whole-image statistics from per-tile ones."""
    n = sum(r[0] for r in reports)
    mean = sum(r[0] * r[1] for r in reports) / n
    m2 = sum(r[2] + r[0] * (r[1] - mean) ** 2 for r in reports)
    return mean, m2 / n


def _apply_group_norm(x, gn, mean, var):
    import torch

    b, c = x.shape[:2]
    per = c // gn.num_groups
    scale = (var + gn.eps).rsqrt().repeat_interleave(per, 1)
    shift = -mean.repeat_interleave(per, 1) * scale
    if gn.affine:
        w = gn.weight.detach().double()
        scale, shift = scale * w, shift * w + gn.bias.detach().double()
    scale = scale.float()[:, :, None, None]
    shift = shift.float()[:, :, None, None]
    if x.dtype == torch.float32:
        return torch.addcmul(shift, x, scale)
    out = torch.empty_like(x)
    step = max(1, c // 8)  # float32 math in chunks: the temporary stays 1/4 of the tile's size
    for c0 in range(0, c, step):
        sl = slice(c0, c0 + step)
        out[:, sl] = torch.addcmul(shift[:, sl], x[:, sl].float(), scale[:, sl])
    return out


# --- the blocks, as generators that stop at every GroupNorm ------------------------------------------------

def _resnet(block, box: list, run: _TileRun):
    """diffusers' ``ResnetBlock2D.forward`` (no time embedding, no resampling), with synchronised norms.

    Tensors travel in one-element lists (``box``) and local names are dropped before every barrier: a
    suspended generator frame must not keep a GPU tensor alive while the tile is parked.
    """
    if block.time_emb_proj is not None or block.upsample is not None or block.downsample is not None:
        raise NotImplementedError("tiling supports the VAE's plain resnets only")
    x = box.pop()
    box = [x, x]
    del x
    h, x = yield from run.group_norm(block.norm1, box)
    box = [block.conv1(block.nonlinearity(h)), x]
    del h, x
    h, x = yield from run.group_norm(block.norm2, box)
    h = block.conv2(block.dropout(block.nonlinearity(h)))
    if block.conv_shortcut is not None:
        x = block.conv_shortcut(x)
    h.add_(x)
    return h.div_(block.output_scale_factor) if block.output_scale_factor != 1 else h


def _decode_tile(decoder, box: list, run: _TileRun):
    for block in decoder.up_blocks:
        for resnet in block.resnets:
            box = [(yield from _resnet(resnet, box, run))]
        for upsampler in block.upsamplers or []:
            box = [upsampler(box.pop())]
            run.scale *= 2
    x, = yield from run.group_norm(decoder.conv_norm_out, box)
    return decoder.conv_out(decoder.conv_act(x))


def _encode_tile(encoder, box: list, run: _TileRun):
    box = [encoder.conv_in(box.pop())]
    for block in encoder.down_blocks:
        for resnet in block.resnets:
            box = [(yield from _resnet(resnet, box, run))]
        for downsampler in block.downsamplers or []:
            box = [downsampler(box.pop())]
            run.scale //= 2
    return box.pop()


def _mid_block(mid, x, memory: int):
    """``UNetMidBlock2D.forward`` on the whole latent, attention in query chunks (exact, bounded memory)."""
    x = mid.resnets[0](x, None)
    for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
        if attn is not None:
            x = _attention(attn, x, memory)
        x = resnet(x, None)
    return x


def _attention(attn, x, memory: int):
    """diffusers' ``AttnProcessor2_0`` for the VAE's spatial self-attention, with queries in chunks.

    Each query's softmax only needs all keys, so chunking queries is exact; scores for one chunk are
    ``chunk × tokens`` values whatever kernel SDPA picks. Outputs overwrite the normalised input in place
    (each chunk's queries are computed before its slot is overwritten): peak ≈ x + normed + K + V.
    """
    import torch.nn.functional as F

    if attn.norm_q is not None or attn.norm_k is not None or attn.spatial_norm is not None:
        raise NotImplementedError("tiling supports the VAE's plain mid-block attention only")
    b, c, hh, ww = x.shape
    n = hh * ww
    h = x.view(b, c, n)
    h = (attn.group_norm(h) if attn.group_norm is not None else h.clone()).transpose(1, 2).contiguous()
    k, v = attn.to_k(h), attn.to_v(h)
    heads = attn.heads
    d = k.shape[-1] // heads
    k = k.view(b, n, heads, d).transpose(1, 2)
    v = v.view(b, n, heads, d).transpose(1, 2)
    chunk = max(64, min(n, memory // (n * 8 * heads)))
    residual = x.view(b, c, n).transpose(1, 2)
    for s in range(0, n, chunk):
        q = attn.to_q(h[:, s:s + chunk]).view(b, -1, heads, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, heads * d).to(q.dtype)
        o = attn.to_out[1](attn.to_out[0](o))
        if attn.residual_connection:
            o = o + residual[:, s:s + chunk]
        h[:, s:s + chunk] = o / attn.rescale_output_factor
    del k, v
    return h.transpose(1, 2).reshape(b, c, hh, ww)

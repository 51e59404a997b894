"""Tiled VAE, tiled denoising, upscale-refine and the seam metric — on the tiny model, on CPU.

The tiny VAE is the real SD3 architecture (4 blocks, 8x downsampling, mid-block attention, GroupNorm with
4 groups) at small channel counts, so every code path of the real-size tiling runs here.
"""

from __future__ import annotations

import pytest
import torch

from sd35fp8_helpers.errors import InvalidGenerationInput, InvalidTilingInput
from sd35fp8_helpers.highres.seams import SEAM_TOLERANCE, seam_ratio
from sd35fp8_helpers.highres.tiled_diffusion import (
    TiledDiffusionConfig,
    generate_tiled,
    plan_windows,
    upscale_refine,
    window_batch_size,
)
from sd35fp8_helpers.highres.tiling import TileConfig, decode_tiled, encode_tiled, plan_tiles
from sd35fp8_helpers.pipeline.generation import GenerationSettings, read_png_metadata

EXACT = 1e-4
"""Relative error allowed when each tile's context covers the decoder's receptive field after the mid block
(tile 256 px, pad 64 px here): what is left is float32 round-off of computing GroupNorm statistics per tile
and merging them (measured 1e-6) — 1e-4 leaves two orders of margin and still fails any real seam (naive
tiling: 0.39)."""

NAIVE_VAE = TileConfig(tile_px=128, overlap_px=0, pad_px=0, sync_group_norm=False, progress=False)
NAIVE = TiledDiffusionConfig(window_px=128, overlap_px=0, weighting="uniform", vae=NAIVE_VAE)
"""The control: every 128-px tile generated and decoded on its own, then pasted side by side."""

QUIET = TileConfig(tile_px=256, progress=False)


@pytest.fixture(scope="module")
def vae(tiny_model_dir):
    """Our own copy of the tiny VAE (enable_tiling mutates it)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(tiny_model_dir / "vae").eval()


@pytest.fixture(scope="module")
def latents():
    """Non-square (320 × 448 px) and not a multiple of any tile size used below."""
    return torch.randn(1, 16, 40, 56, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def untiled(vae, latents):
    with torch.no_grad():
        return vae.decode(latents).sample


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_tiled_decode_matches_untiled(vae, latents, untiled):
    plan = plan_tiles(vae, 320, 448, QUIET)
    assert len(plan) > 1 and plan.borders_px[0] and plan.borders_px[1]  # really tiled, in both directions
    out = decode_tiled(vae, latents, QUIET)
    assert out.shape == untiled.shape == (1, 3, 320, 448)
    assert _rel(out, untiled) < EXACT


def test_tiled_decode_beats_diffusers_tiling_at_equal_tile_size(vae, latents, untiled):
    ours = decode_tiled(vae, latents, TileConfig(tile_px=128, overlap_px=16, pad_px=24, progress=False))
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size = 128, 16
    try:
        with torch.no_grad():
            theirs = vae.decode(latents).sample
    finally:
        vae.disable_tiling()
    ours_err, theirs_err = _rel(ours, untiled), _rel(theirs, untiled)
    assert ours_err < theirs_err / 5, (ours_err, theirs_err)  # measured 0.014 vs 0.33


def test_whole_image_group_norm_is_what_removes_tone_shifts(vae, latents, untiled):
    synced = decode_tiled(vae, latents, TileConfig(tile_px=128, overlap_px=0, pad_px=0, progress=False))
    naive = decode_tiled(vae, latents, NAIVE_VAE)
    assert _rel(synced, untiled) < _rel(naive, untiled)


def test_tile_size_from_memory_budget(vae):
    small = plan_tiles(vae, 1024, 1024, TileConfig(tile_memory=4 << 20))
    large = plan_tiles(vae, 1024, 1024, TileConfig(tile_memory=64 << 20))
    assert small.tile_px < large.tile_px and len(small) > len(large)


def test_encode_tiled_matches_untiled_and_round_trips(vae):
    images = torch.rand(1, 3, 328, 200, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        ref = vae.encode(images).latent_dist.mean
    dist = encode_tiled(vae, images, TileConfig(tile_px=256, progress=False))
    assert len(plan_tiles(vae, 328, 200, QUIET, "encode")) > 1
    assert _rel(dist.mean, ref) < EXACT
    back = decode_tiled(vae, dist.mode(), QUIET)
    assert back.shape == images.shape


@pytest.mark.parametrize("kwargs, message", [
    (dict(tile_px=100), "tile_px=100 must be a positive multiple of 8 px"),
    (dict(overlap_px=8), "overlap_px=8 must be a multiple of 16 px"),
    (dict(pad_px=4), "pad_px=4 must be a multiple of 8 px"),
    (dict(tile_px=128), "tile_px=128 leaves no pixels of its own after overlap_px=32 and pad_px=64 on both "
                        "sides; need tile_px >= 176"),
    (dict(tile_memory=0), "tile_memory=0 must be a positive number of bytes"),
])
def test_invalid_tile_config(kwargs, message):
    with pytest.raises(InvalidTilingInput, match=message.replace("(", r"\(")):
        TileConfig(**kwargs)


def test_invalid_sizes_name_the_nearest_valid_one(vae):
    with pytest.raises(InvalidTilingInput) as e:
        encode_tiled(vae, torch.zeros(1, 3, 64, 1001), QUIET)
    assert "width=1001 is not a multiple of 8 px" in str(e.value) and "nearest valid: 1000 or 1008" in str(e.value)
    with pytest.raises(InvalidTilingInput, match=r"latents.shape=\(1, 4, 8, 8\) is not \(batch, 16, height, width\)"):
        decode_tiled(vae, torch.zeros(1, 4, 8, 8), QUIET)


def test_invalid_tiled_generation_inputs(tiny_pipe):
    with pytest.raises(InvalidTilingInput, match="window_px=512 is over this model's single-pass limit of 256 px"):
        plan_windows(tiny_pipe, 512, 512, TiledDiffusionConfig(window_px=512))
    with pytest.raises(InvalidTilingInput, match="overlap_px=24 must be a multiple of 16 px"):
        TiledDiffusionConfig(overlap_px=24)
    with pytest.raises(InvalidTilingInput, match="weighting='cosine' must be 'gaussian' or 'uniform'"):
        TiledDiffusionConfig(weighting="cosine")
    with pytest.raises(InvalidGenerationInput, match="height=1000 is not a multiple of 16; nearest valid: 992 or 1008"):
        generate_tiled(tiny_pipe, GenerationSettings("a fox", height=1000, width=512))
    with pytest.raises(InvalidTilingInput, match=r"strength=0 must be in \(0, 1\]"):
        upscale_refine(tiny_pipe, None, GenerationSettings("a fox", height=256, width=256), strength=0)


@pytest.fixture(scope="module")
def beyond_one_pass(tiny_pipe):
    """384 × 512: beyond the tiny transformer's 256-px single-pass limit — one tiled run and its naive control."""
    settings = GenerationSettings("a watercolor fox", seed=0, steps=4, height=384, width=512)
    steps = []
    tiled = generate_tiled(tiny_pipe, settings, TiledDiffusionConfig(vae=QUIET), progress=False,
                           on_step=lambda i, n: steps.append((i, n)))
    naive = generate_tiled(tiny_pipe, settings, NAIVE, progress=False)
    return tiled, naive, steps


def test_tiled_generation_beyond_one_pass_is_seamless(beyond_one_pass, tmp_path):
    tiled, _, steps = beyond_one_pass
    assert tiled.image.size == (512, 384)
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    edges = tiled.extra["tiled"]["edges_px"]
    report = seam_ratio(tiled.image, edges["rows"], edges["cols"])
    assert report.seamless, report
    meta = read_png_metadata(tiled.save(tmp_path / "tiled.png"))
    assert meta["settings"]["width"] == 512 and meta["tiled"]["windows"] == tiled.extra["tiled"]["windows"]


def test_naive_tiling_fails_the_same_check(beyond_one_pass):
    tiled, naive, _ = beyond_one_pass
    assert naive.image.size == (512, 384)
    report = seam_ratio(naive.image, [128, 256], [128, 256, 384])
    assert not report.seamless and report.ratio > 1 + SEAM_TOLERANCE, report  # measured 1.30


def test_untiled_decode_has_no_seams_where_tiles_would_be(vae, latents, untiled):
    rows, cols = plan_tiles(vae, 320, 448, QUIET).borders_px
    assert seam_ratio(untiled, rows, cols).seamless  # the metric does not see seams that are not there


def test_seam_ratio_needs_borders():
    with pytest.raises(ValueError, match="needs at least one border"):
        seam_ratio(torch.zeros(3, 64, 64))


def test_window_batching_does_not_change_the_result(tiny_pipe):
    settings = GenerationSettings("a fox", seed=3, steps=1, height=256, width=384)
    one = generate_tiled(tiny_pipe, settings, TiledDiffusionConfig(window_batch=1, vae=QUIET), progress=False)
    plan = plan_windows(tiny_pipe, 256, 384)
    assert window_batch_size(tiny_pipe, plan, TiledDiffusionConfig(), cfg=True) == len(plan)  # tiny: all at once
    batched = generate_tiled(tiny_pipe, settings, TiledDiffusionConfig(vae=QUIET), progress=False)
    import numpy as np

    diff = np.abs(np.asarray(one.image, dtype=float) - np.asarray(batched.image, dtype=float))
    assert diff.max() <= 1  # uint8 rounding of float32 noise


def test_upscale_refine(tiny_pipe):
    from sd35fp8_helpers.pipeline.generation import generate

    small = generate(tiny_pipe, GenerationSettings("a lighthouse", seed=1, steps=4), progress=False).image
    steps = []
    big = upscale_refine(tiny_pipe, small, GenerationSettings("a lighthouse", seed=1, steps=4, height=384,
                                                              width=384),
                         strength=0.5, config=TiledDiffusionConfig(vae=QUIET), progress=False,
                         on_step=lambda i, n: steps.append(i))
    assert big.image.size == (384, 384) and steps == [1, 2]  # 4 steps × strength 0.5
    edges = big.extra["tiled"]["edges_px"]
    assert seam_ratio(big.image, edges["rows"], edges["cols"]).seamless
    assert big.extra["tiled"]["source_size"] == [128, 128]

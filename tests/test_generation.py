"""Generation: inputs checked before any model work, seeds reproduce, steps are reported, PNGs carry settings."""

from __future__ import annotations

import numpy as np
import pytest

from sd35fp8_helpers.errors import InvalidGenerationInput
from sd35fp8_helpers.pipeline.generation import (
    GenerationSettings,
    check_settings,
    generate,
    pipeline_limits,
    read_png_metadata,
    settings_from_png,
)


@pytest.mark.parametrize("changes,argument,message", [
    ({"prompt": ""}, "prompt", "prompt='' is empty"),
    ({"prompt": "   "}, "prompt", "is empty"),
    ({"height": 1000}, "height", "height=1000 is not a multiple of 16; nearest valid: 992 or 1008"),
    ({"width": 8}, "width", "width=8 must be a whole number of pixels >= 16"),
    ({"width": 130}, "width", "nearest valid: 128 or 144"),
    ({"height": 4096}, "height", "height=4096 is over this model's single-pass limit of 3072 px"),
    ({"steps": 0}, "steps", "steps=0 must be a whole number from 1 to 1000"),
    ({"steps": 10**6}, "steps", "steps=1000000 must be a whole number from 1 to 1000"),
    ({"seed": -1}, "seed", "seed=-1 must be a whole number from 0 to 2**64-1"),
    ({"seed": 2**64}, "seed", "seed=18446744073709551616 must be a whole number from 0 to 2**64-1"),
    ({"guidance_scale": -2.0}, "guidance_scale", "must be a finite number from 0 to 100"),
    ({"guidance_scale": float("nan")}, "guidance_scale", "guidance_scale=nan must be a finite number"),
    ({"guidance_scale": float("inf")}, "guidance_scale", "guidance_scale=inf must be a finite number"),
])
def test_each_invalid_input_names_argument_value_and_fix(changes, argument, message):
    s = GenerationSettings(**{"prompt": "a cat", "height": 1024, "width": 1024, **changes})
    with pytest.raises(InvalidGenerationInput) as info:
        check_settings(s, multiple=16, max_side=3072)
    assert info.value.argument == argument
    assert message in str(info.value)


def test_over_the_limit_points_to_tiling():
    with pytest.raises(InvalidGenerationInput, match="tiled generation"):
        check_settings(GenerationSettings("a cat", height=4096, width=1024), max_side=3072)


def test_valid_settings_pass():
    check_settings(GenerationSettings("a cat", height=1024, width=1536), multiple=16, max_side=3072)


def test_tiny_pipeline_limits(tiny_pipe):
    assert pipeline_limits(tiny_pipe) == (16, 256)


def test_invalid_size_fails_before_any_model_work(tiny_pipe):
    calls = []
    hook = tiny_pipe.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(InvalidGenerationInput, match="single-pass limit of 256 px"):
            generate(tiny_pipe, GenerationSettings("a cat", height=512, width=128), progress=False)
    finally:
        hook.remove()
    assert calls == []


def test_same_seed_same_image_other_seed_other_image(tiny_pipe):
    run = lambda seed: np.asarray(generate(tiny_pipe, GenerationSettings("a red fox", seed=seed, steps=2),
                                           progress=False).image)
    a, b, c = run(1), run(1), run(2)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.std() > 1  # not a blank image


def test_non_square_size_and_step_callback(tiny_pipe):
    seen = []
    result = generate(tiny_pipe, GenerationSettings("a cat", steps=3, height=96, width=160),
                      on_step=lambda step, total: seen.append((step, total)), progress=False)
    assert result.image.size == (160, 96)
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert result.precision == "bf16" and result.extra["compute_dtype"] == "float32" and result.device == "cpu"


def test_png_metadata_round_trip(tiny_pipe, tmp_path):
    s = GenerationSettings("a lighthouse at dusk", negative_prompt="blurry", seed=11, steps=2,
                           guidance_scale=3.0, height=112, width=144)
    result = generate(tiny_pipe, s, progress=False)
    path = result.save(tmp_path / "sub" / "x.png")
    meta = read_png_metadata(path)
    assert settings_from_png(path) == s
    assert meta["precision"] == "bf16" and meta["compute_dtype"] == "float32"  # a PRECISIONS name, never a dtype
    assert set(meta["versions"]) == {"torch", "diffusers", "transformers"}
    assert [p.name for p in path.parent.iterdir()] == ["x.png"]  # no partial file left beside it


def test_png_without_metadata_is_a_clear_error(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    with pytest.raises(ValueError, match="carries no sd35fp8 metadata"):
        read_png_metadata(tmp_path / "plain.png")


def test_unknown_or_mismatched_precision_is_refused_before_any_model_work(tiny_pipe):
    """Notebook 02 used to pass precision="fp8": the PNG recorded a name nothing knows and re-rendered in BF16."""
    s = GenerationSettings("a red circle", steps=1, height=64, width=64)
    with pytest.raises(InvalidGenerationInput, match=r"(?s)precision='fp8' is not one of .*did you mean 'fp8-storage'"):
        generate(tiny_pipe, s, progress=False, precision="fp8")
    with pytest.raises(InvalidGenerationInput, match="does not match the pipeline, which is in bf16"):
        generate(tiny_pipe, s, progress=False, precision="fp8-storage")  # the pipeline was never quantised
    assert generate(tiny_pipe, s, progress=False).precision == "bf16"  # read from the pipeline itself


def test_precision_is_read_from_an_fp8_pipeline(tiny_model_dir):
    from sd35fp8_helpers import apply_precision_, load_pipeline
    from sd35fp8_helpers.pipeline.generation import precision_label_of

    pipe = load_pipeline(str(tiny_model_dir), device="cpu")
    apply_precision_(pipe, "fp8-storage")
    result = generate(pipe, GenerationSettings("a red circle", steps=1, height=64, width=64), progress=False)
    assert result.precision == "fp8-storage" and precision_label_of(pipe) == "FP8 storage"


def test_png_with_foreign_or_broken_metadata_is_a_clear_error(tmp_path):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("sd35fp8", '{"settings": {"prompt": "x", "colour": "red"}}')  # written by someone else's tool
    Image.new("RGB", (8, 8)).save(tmp_path / "foreign.png", pnginfo=info)
    with pytest.raises(InvalidGenerationInput, match="cannot be read") as err:
        read_png_metadata(tmp_path / "foreign.png")
    assert "--prompt" in err.value.fix


def test_vae_tiling_engages_at_the_native_size(tiny_model_dir):
    """diffusers' default tile is the VAE's sample size, so `enable_tiling()` did nothing at native size."""
    from sd35fp8_helpers import load_pipeline
    from sd35fp8_helpers.pipeline.decode import vae_tile_px

    pipe = load_pipeline(str(tiny_model_dir), device="cpu")
    s = GenerationSettings("a red circle", steps=2, height=128, width=96)
    plain = np.asarray(generate(pipe, s, progress=False).image, dtype=np.float32)
    pipe.vae.enable_tiling()
    tiled = np.asarray(generate(pipe, s, progress=False).image, dtype=np.float32)
    assert pipe.vae.tile_sample_min_size == vae_tile_px(128, 96) == 32  # < 96: tiles along both axes
    assert tiled.shape == plain.shape == (128, 96, 3)  # whole latent overlaps: no oversized tiled output
    assert not np.array_equal(plain, tiled)  # the tiled decoder really ran (its blended seams differ)

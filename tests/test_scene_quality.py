"""The quality table on the CPU: 32 fixed prompts through the shipped scene model, BF16 vs FP8 storage vs a tiled
decode, judged from pixels. Thresholds come from the full 360-prompt × 2-seed run
(docs/benchmarks/scene-quality-cpu.json) with room for 32 prompts' sampling noise: one image is 1/16 of an
attribute here."""

from __future__ import annotations

import json
import math

import pytest

from sd35fp8_helpers.benchmarks.scene_quality import load_report, run_scene_quality, variants

ONE_IMAGE = 1 / 16 + 1e-9


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    return run_scene_quality("scenes", device="cpu", single=16, two=16, seeds=(0,),
                             only=("fp8-storage all-linear", "memory resident_tiled"),
                             json_path=out / "q.json", cache=out / "cache", batch_size=16)


def test_bf16_draws_the_shape_position_and_size_asked(report):
    """What the v2 model does reliably (full CPU run: shape 98%, position 99%, size 99%); colour it swaps with the
    background about one time in five (79%), so its threshold is lower."""
    for attribute in ("single.shape", "single.position", "single.size"):
        assert report.accuracy("bf16", attribute) >= 14 / 16, attribute
    assert report.accuracy("bf16", "single.colour") >= 9 / 16
    assert report.results["bf16"].identical == 32 and math.isinf(report.results["bf16"].psnr_db)


def test_fp8_storage_keeps_the_picture(report):
    fp8, bf16 = report.results["fp8-storage all-linear"], report.results["bf16"]
    assert fp8.transformer_bytes < 0.35 * bf16.transformer_bytes  # float8 + a scale per row vs float32 on CPU
    assert fp8.psnr_db >= 36 and fp8.ssim >= 0.97, (fp8.psnr_db, fp8.ssim)  # full run: 40.0 dB, 0.987
    assert fp8.identical == 0  # it is not the same computation: the checks below could fail
    assert fp8.same_reading >= 0.75, fp8.same_reading  # full run: 89% of 720 images read exactly alike
    for attribute in bf16.rates:  # 16 images per kind: two images either way is sampling noise
        assert abs(fp8.rates[attribute]["accuracy"] - bf16.rates[attribute]["accuracy"]) <= 2 * ONE_IMAGE, attribute


def test_tiled_decode_changes_pixels_and_says_so(report):
    tiled = report.results["memory resident_tiled"]
    assert tiled.identical == 0 and tiled.psnr_db < 40  # why *_tiled rungs are not lossless
    assert tiled.seconds_per_image == 0.0  # decoded from the bf16 latents: no second denoising


def test_report_round_trips_and_skips_what_the_device_cannot_run(report, tmp_path):
    path = tmp_path / "q.json"
    path.write_text(json.dumps(report.to_json(), default=float))
    again = load_report(path)
    assert again.rows() == report.rows()
    (compute,) = [v for v in variants("cpu") if v.name == "fp8-compute"]
    assert "capability" in compute.available

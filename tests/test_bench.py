"""The benchmark on the tiny preset (CPU) and the quality report: they run, measure and write what they claim."""

from __future__ import annotations

import json

import pytest

from sd35fp8_helpers.benchmarks.fp8 import VARIANTS, load_results, plot_results, run_bench
from sd35fp8_helpers.errors import Sd35fp8Error


def test_tiny_bench_times_bf16_and_storage_and_skips_compute_with_the_reason(tmp_path):
    out = tmp_path / "fp8-tiny.json"
    result = run_bench("tiny", height=64, width=64, steps=4, variants=("bf16", "fp8-storage", "fp8-compute"),
                       device="cpu", warmup=1, repeats=2, t5=True, json_path=out)
    bf16, storage, compute = result.variants
    assert bf16.status == storage.status == "ok" and bf16.speedup == 1.0
    assert storage.weights_gib < 0.7 * bf16.weights_gib
    assert 0 < storage.rel_err_vs_bf16 < 0.05 and len(storage.ms_all) == 2
    assert storage.s_per_image == pytest.approx(storage.ms_per_step * 4 / 1000)
    assert compute.status.startswith("skipped: FP8 compute is not possible on cpu")
    assert result.text_encoder_3["fp8_gib"] < result.text_encoder_3["bf16_gib"]
    saved = json.loads(out.read_text())
    assert saved["device"].startswith("cpu") and saved["versions"]["torch"] and len(saved["variants"]) == 3
    table = result.table()
    assert "ms/step" in table and "fp8-compute: skipped" in table and "T5 encoder:" in table
    fig = plot_results(load_results(tmp_path))
    assert fig.axes[0].get_title().startswith("SD3.5 tiny 64² — cpu")


def test_unknown_variant_is_named():
    with pytest.raises(Sd35fp8Error, match="unknown variant"):
        run_bench("tiny", variants=("fp4",), device="cpu")
    assert set(VARIANTS) >= {"bf16", "bf16+compile", "fp8-storage", "fp8-compute"}


def test_cli_bench_prints_the_table_and_writes_json(cli, tmp_path):
    proc = cli("bench", "--preset", "tiny", "--height", "64", "--width", "64", "--variants", "bf16", "fp8-storage",
               "--repeats", "1", "--warmup", "1", "--json", str(tmp_path / "b.json"))
    assert proc.returncode == 0, proc.stderr
    assert "SD3.5 tiny transformer, 64x64, CFG batch 2, 333 text tokens" in proc.stdout
    assert json.loads((tmp_path / "b.json").read_text())["command"].startswith("sd35fp8 bench --preset tiny")


def test_quality_report_compares_policies_against_the_reference():
    from sd35fp8_helpers.precision.quality import quality_report

    report = quality_report("tiny", policies=("all-linear", "hybrid"), steps=2, size=64, device="cpu")
    ref, all_linear, hybrid = report.rows
    assert ref.latent_rel_err == 0 and ref.psnr_db == float("inf")
    assert 0 < all_linear.latent_rel_err < 0.05 and all_linear.psnr_db > 30
    assert all_linear.transformer_bytes < hybrid.transformer_bytes < ref.transformer_bytes
    assert "fp8 hybrid" in str(report)
    fig = report.plot()
    assert len(fig.axes) == 2 * 3 + 1  # images, heat-maps, colour bar


def test_static_variants_say_why_they_skip_on_cpu():
    result = run_bench("tiny", height=64, width=64, variants=("bf16", "fp8-static-fast", "fp8-static-fast-qkv"),
                       device="cpu", warmup=1, repeats=1)
    bf16, static, fused = result.variants
    assert bf16.status == "ok"
    assert static.status.startswith("skipped: FP8 compute is not possible on cpu") and fused.status == static.status


def test_static_variants_calibrate_on_inputs_other_than_the_timed_ones():
    from sd35fp8_helpers.benchmarks.fp8 import CALIBRATION_PASSES, build_transformer, calibrate_random

    model = build_transformer("tiny", "cpu")
    cal = calibrate_random(model, 64, 64, "cpu")
    assert cal.calls == len(CALIBRATION_PASSES) == 3 and cal.layers == 31
    assert 1 not in {seed for seed, _ in CALIBRATION_PASSES}  # the timed step uses input seed 1
    assert all(model.get_submodule(n).scale_input > 0 for n in cal.amax)


def test_cli_bench_pipeline_times_whole_images_and_writes_json(cli, tmp_path):
    out = tmp_path / "pipeline.json"
    proc = cli("bench", "--pipeline", "--preset", "tiny", "--steps", "2", "--batches", "1", "2", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "SD3.5 tiny whole image (2 steps, text encoders + VAE decode)" in proc.stdout
    data = json.loads(out.read_text())
    bf16, fp8 = data["variants"]
    assert [(c["label"], c["batch"]) for c in bf16["calls"]] == [("first call", 1), ("timed", 1), ("batch 2", 2)]
    assert all(c["seconds"] > 0 and c["s_per_image"] == pytest.approx(c["seconds"] / c["batch"]) for c in bf16["calls"])
    assert fp8["status"].startswith("skipped: FP8 compute is not possible on cpu") and not fp8["calls"]
    assert data["sizes"] == [[128, 128], [112, 144], [128, 128]]
    bad = cli("bench", "--pipeline", "--preset", "tiny", "--batches", "0")
    assert bad.returncode == 1 and "--batches=[0] must all be >= 1" in bad.stderr

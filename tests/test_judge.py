"""The pixel judge: right on ground truth (also blurred, noisy, JPEG'd), at chance on shuffled truths."""

from __future__ import annotations

import io
import math
from collections import deque

import numpy as np
import pytest
from PIL import Image, ImageFilter

from sd35fp8_helpers.scenes import vocabulary as V
from sd35fp8_helpers.scenes.dataset import evaluation_prompts, scene_sample
from sd35fp8_helpers.scenes.judge import (
    ATTRIBUTES,
    connected_components,
    judge,
    paired_psnr_ssim,
    prompt_adherence,
    score,
    ssim,
    wilson_interval,
)
from sd35fp8_helpers.scenes.render import render

SIZES = ((128, 128), (192, 128), (128, 192), (160, 96))
N = 300


def _samples(seed: int, n: int = N):
    return [scene_sample(seed, i, *SIZES[i % len(SIZES)]) for i in range(n)]


def _accuracies(verdicts) -> dict[str, float]:
    rates = score(verdicts)
    return {k: r.accuracy for k, r in rates.items()}


def _blur(img, i):
    return img.filter(ImageFilter.GaussianBlur(1.5 + (i % 3) * 0.5))


def _noise(img, i):
    arr = np.asarray(img, dtype=np.float64) + np.random.default_rng(i).normal(0, 10, (img.size[1], img.size[0], 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _jpeg(img, i):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=40)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _colour_shift(img, i):
    arr = np.asarray(img, dtype=np.float64) + np.random.default_rng(i).uniform(-15, 15, 3)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _everything(img, i):
    return _jpeg(_noise(_colour_shift(_blur(img, i), i), i), i)


def test_ground_truth_renders_score_at_least_99_percent_on_every_attribute():
    acc = _accuracies([judge(s.image, s.spec) for s in _samples(21)])
    assert {"single.colour", "single.shape", "single.position", "single.size", "single.background",
            "two.colour", "two.shape", "two.position", "two.both"} <= set(acc)
    assert min(acc.values()) >= 0.99, acc


@pytest.mark.parametrize("degrade", [_blur, _noise, _jpeg, _colour_shift, _everything])
def test_judge_survives_soft_edges_noise_jpeg_and_colour_shifts(degrade):
    samples = _samples(22, 160)
    acc = _accuracies([judge(degrade(s.image, i), s.spec) for i, s in enumerate(samples)])
    assert min(acc.values()) >= 0.97, acc


def test_shuffled_captions_score_near_chance():
    """Judging each render against another scene's truth must score what two random truths agree on."""
    samples = [s for s in _samples(23, 400) if len(s.spec.objects) == 1]
    others = samples[1:] + samples[:1]
    verdicts = [judge(s.image, o.spec) for s, o in zip(samples, others, strict=True)]
    acc = _accuracies(verdicts)
    for attr in ATTRIBUTES:
        agree = np.mean([getattr(s.spec.objects[0], attr) == getattr(o.spec.objects[0], attr)
                         for s, o in zip(samples, others, strict=True)])
        assert abs(acc[f"single.{attr}"] - agree) <= 0.03, (attr, acc[f"single.{attr}"], agree)
        assert acc[f"single.{attr}"] <= 1 / len(getattr(V, attr.upper() + "S")) + 0.15
    assert acc["single.all"] < 0.02


def test_connected_components_match_a_breadth_first_search():
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = rng.random((23, 31)) < 0.55
        labels, sizes = connected_components(mask)
        seen = np.zeros_like(mask)
        groups = []
        for y, x in zip(*np.nonzero(mask), strict=True):
            if seen[y, x]:
                continue
            q, members = deque([(y, x)]), []
            seen[y, x] = True
            while q:
                cy, cx = q.popleft()
                members.append((cy, cx))
                for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                    if 0 <= ny < 23 and 0 <= nx < 31 and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        q.append((ny, nx))
            groups.append(members)
        assert len(sizes) == len(groups)
        for members in groups:
            assert len({labels[p] for p in members}) == 1 and labels[members[0]] > 0
        assert sorted(sizes.tolist()) == sorted(len(g) for g in groups)
        assert (labels[~mask] == 0).all()


def test_wilson_interval_matches_published_values():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))


def test_ssim_of_constant_images_matches_the_formula():
    a, b = np.full((20, 20, 3), 0.2), np.full((20, 20, 3), 0.6)
    c1 = 0.01**2
    assert ssim(a, b) == pytest.approx((2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1), rel=1e-9)


def test_ssim_and_psnr_fall_as_noise_grows_and_are_symmetric():
    img = np.asarray(render(scene_sample(1, 0).spec).image, dtype=np.float64) / 255
    rng = np.random.default_rng(1)
    noisy = [np.clip(img + rng.normal(0, s, img.shape), 0, 1) for s in (0.01, 0.05, 0.2)]
    q = paired_psnr_ssim([img] * 3, noisy)
    assert q.ssim[0] > q.ssim[1] > q.ssim[2] and q.psnr[0] > q.psnr[1] > q.psnr[2]
    assert ssim(img, noisy[1]) == pytest.approx(ssim(noisy[1], img), rel=1e-12)
    same = paired_psnr_ssim([img], [img.copy()])
    assert same.identical == 1 and math.isinf(same.mean_psnr) and same.mean_ssim == pytest.approx(1.0)


def test_prompt_adherence_on_renders_reports_rates_with_intervals():
    prompts = evaluation_prompts("single")[:10] + evaluation_prompts("two")[:10]
    images = [render(p.spec, seed=s).image for p in prompts for s in (0, 1)]
    report = prompt_adherence(images, prompts, seeds=(0, 1))
    assert report.rates["single.colour"].total == 20 and report.rates["two.both"].total == 20
    assert report.accuracy("two.both") == 1.0 and report.accuracy("single.all") == 1.0
    assert "| single.shape | 20/20 | 100.0% |" in report.to_table()
    wrong = prompt_adherence(images[2:] + images[:2], prompts, seeds=(0, 1))  # every image one prompt off
    assert wrong.accuracy("single.all") < 0.5
    with pytest.raises(ValueError, match="prompts × 2 seeds"):
        prompt_adherence(images[:-1], prompts, seeds=(0, 1))


def test_prompt_adherence_runs_a_real_pipeline_and_batches_do_not_change_images():
    from sd35fp8_helpers.pipeline.tiny import build_tiny_pipeline
    from sd35fp8_helpers.scenes.judge import generate_images

    pipe = build_tiny_pipeline(seed=0)
    prompts = evaluation_prompts("single")[:2]
    kwargs = dict(num_inference_steps=2, guidance_scale=2.0, height=64, width=96)
    report = prompt_adherence(pipe, prompts, seeds=(3, 4), batch_size=4, **kwargs)
    assert len(report.records) == 4 and report.rates["single.colour"].total == 4
    one_by_one = generate_images(pipe, [prompts[0].text], [4], batch_size=1, **kwargs)[0]
    batched = generate_images(pipe, [prompts[0].text] * 2, [3, 4], batch_size=2, **kwargs)[1]
    assert one_by_one.size == (96, 64)
    assert np.abs(np.asarray(one_by_one, dtype=int) - np.asarray(batched, dtype=int)).max() <= 1

"""The playground widget, driven like a user would: set the controls, ``button.click()``, read the widgets.

Everything is real: the tiny ``StableDiffusion3Pipeline``, ipywidgets objects, PNG files on disk, the CLI as a
subprocess. Failures are real too (a pipeline not loaded by sd35fp8, a step callback that raises, files that
are not sd35fp8 PNGs) — no mocks.
"""

from __future__ import annotations

import io
import math
from datetime import datetime, timezone
from html import unescape
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sd35fp8_helpers.interactive.playground import (
    Playground,
    available_precisions,
    difference_heatmap,
    psnr,
    size_presets,
)
from sd35fp8_helpers.memory.strategies import offered_strategies, strategy_names
from sd35fp8_helpers.pipeline.generation import read_png_metadata

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def make_playground(tiny_pipe, tmp_path):
    """Playground(s) on the shared tiny pipeline (the playground never modifies it), saving under tmp_path."""
    def make(**kwargs) -> Playground:
        return Playground(tiny_pipe, output_dir=tmp_path, **kwargs)
    return make


def _pixels(png: bytes | memoryview | Path) -> np.ndarray:
    with Image.open(png if isinstance(png, Path) else io.BytesIO(bytes(png))) as img:
        return np.asarray(img.convert("RGB"))


def _error(pg: Playground) -> str:
    """The message line's text (an error must be visible there, and the button usable again)."""
    assert not pg.generate_button.disabled, "Generate must be re-enabled after an error"
    assert "sd35fp8-error" in pg.message.value and pg.status in unescape(pg.message.value), pg.message.value
    return pg.message.value


def test_generate_shows_image_progress_info_and_history(make_playground):
    seen = []
    pg = make_playground(on_step=lambda step, total: seen.append((step, total, pg.progress.value,
                                                                 pg.generate_button.disabled)))
    pg.prompt.value, pg.seed.value, pg.steps.value = "a lighthouse at dusk", 3, 5
    pg.generate_button.click()

    assert pg.message.value == "" and not pg.generate_button.disabled
    assert bytes(pg.image.value).startswith(PNG_SIGNATURE) and _pixels(pg.image.value).shape == (128, 128, 3)
    # the bar moved at every step (not only at the end), with Generate disabled meanwhile, and finished
    assert seen == [(i, 5, i, True) for i in range(1, 6)]
    assert (pg.progress.value, pg.progress.max, pg.progress.bar_style) == (5, 5, "success")
    assert pg.progress_text.value.endswith("step 5/5")
    for text in ("seed 3", "5 steps", "128×128", "as loaded (float32)", "memory: resident", "peak", "process peak RSS"):
        assert text in pg.info.value
    assert len(pg.history) == 1 and len(pg.gallery.children) == 1
    assert pg.history[0].path.is_file() and pg.history[0].peak.bytes > 0


def test_png_metadata_round_trips_and_cli_reproduces_identical_pixels(make_playground, tmp_path, cli):
    pg = make_playground()
    pg.prompt.value, pg.negative_prompt.value, pg.seed.value = "a red fox", "blurry", 11
    pg.size.value = (144, 112)
    (entry,) = pg.run()

    meta = read_png_metadata(entry.path)
    assert meta["settings"] == {"prompt": "a red fox", "negative_prompt": "blurry", "seed": 11, "steps": 4,
                                "guidance_scale": 4.5, "height": 112, "width": 144,
                                "lora": "", "lora_scale": 1.0}
    assert (meta["precision"], meta["memory"], meta["compute_dtype"]) == ("bf16", "resident", "float32")
    assert set(meta["versions"]) == {"torch", "diffusers", "transformers"}
    assert meta["peak_memory"]["kind"] == "process peak RSS"

    out = tmp_path / "again.png"
    done = cli("generate", "--from-png", str(entry.path), "--device", "cpu", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert np.array_equal(_pixels(out), _pixels(entry.path))


def test_vae_tiling_is_recorded_and_switched_on_for_one_generation(make_playground):
    pg = make_playground()
    pg.prompt.value, pg.size.value = "a red fox", (144, 112)  # wider than the tiny VAE's 128 px tile
    (plain,) = pg.run()
    pg.memory.value = "resident_tiled"  # the memory ladder's own name, as `sd35fp8 plan` and `generate` use it
    (tiled,) = pg.run()
    assert read_png_metadata(tiled.path)["memory"] == "resident_tiled" and "memory: resident_tiled" in pg.info.value
    assert not np.array_equal(_pixels(plain.path), _pixels(tiled.path)), "tiles decoded separately differ"
    assert not pg.pipe.vae.use_tiling, "the user's pipeline is left as it was"


def test_history_thumbnail_click_restores_settings(make_playground):
    pg = make_playground()
    pg.prompt.value, pg.seed.value, pg.size.value, pg.guidance.value = "first", 1, (64, 64), 2.0
    pg.generate_button.click()
    pg.prompt.value, pg.seed.value, pg.size.value, pg.guidance.value = "second", 2, (128, 128), 7.0
    pg.precision.value = "fp8-storage"
    pg.generate_button.click()
    assert [e.result.settings.prompt for e in pg.history] == ["first", "second"]

    oldest = pg.gallery.children[-1]  # newest first
    restore_button = oldest.children[1]
    assert restore_button.description == "#1 seed 1"
    restore_button.click()
    assert (pg.prompt.value, pg.seed.value, pg.guidance.value, pg.precision.value) == ("first", 1, 2.0, "bf16")
    assert (pg.width.value, pg.height.value, pg.size.value) == (64, 64, (64, 64))
    assert "settings restored from" in pg.message.value


def test_load_settings_from_uploaded_png_reproduces_the_image(make_playground):
    pg = make_playground()
    pg.prompt.value, pg.seed.value, pg.steps.value = "a paper boat", 42, 3
    (original,) = pg.run()
    fresh = make_playground()
    fresh.upload.value = ({"name": original.path.name, "type": "image/png", "size": original.path.stat().st_size,
                           "content": memoryview(original.path.read_bytes()),
                           "last_modified": datetime.now(timezone.utc)},)
    assert (fresh.prompt.value, fresh.seed.value, fresh.steps.value) == ("a paper boat", 42, 3)
    fresh.generate_button.click()
    assert np.array_equal(_pixels(fresh.image.value), _pixels(original.path))


def test_empty_prompt_is_a_message(make_playground):
    pg = make_playground()
    pg.prompt.value = "   "
    pg.generate_button.click()
    assert "prompt=&#x27; &#x27; is empty" in _error(pg) and "describe the image you want" in pg.message.value
    assert pg.history == [] and bytes(pg.image.value) == b""


def test_size_over_the_limit_and_off_grid_are_messages_history_kept(make_playground):
    pg = make_playground()
    pg.prompt.value = "a castle"
    pg.generate_button.click()
    pg.width.value = 272
    assert pg.size.value == "custom"
    pg.generate_button.click()
    assert "width=272 is over this model&#x27;s single-pass limit of 256 px" in _error(pg)
    assert "tiled generation" in pg.message.value
    pg.width.value, pg.height.value = 128, 130
    pg.generate_button.click()
    assert "height=130 is not a multiple of 16; nearest valid: 128 or 144" in _error(pg)
    assert len(pg.history) == 1 and len(pg.gallery.children) == 1


def test_exception_during_generation_is_a_message_and_the_next_run_works(make_playground):
    fail = {"at": 2}

    def on_step(step, total):
        if step == fail["at"]:
            raise RuntimeError(f"callback failed at step {step}")

    pg = make_playground(on_step=on_step)
    pg.prompt.value = "a kite"
    pg.generate_button.click()
    assert ("generation failed: RuntimeError: callback failed at step 2. The playground is still usable"
            in _error(pg))
    assert pg.progress.value == 2 and pg.progress.bar_style == "" and pg.history == []

    fail["at"] = None
    pg.generate_button.click()
    assert pg.message.value == "" and len(pg.history) == 1 and pg.progress.value == 4


def test_fp8_needs_a_pipeline_loaded_by_sd35fp8(tiny_pipe, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    bare = StableDiffusion3Pipeline(**tiny_pipe.components)  # assembled by hand: nothing says where weights are
    pg = Playground(bare, output_dir=tmp_path)
    pg.prompt.value, pg.precision.value = "a tree", "fp8-storage"
    pg.generate_button.click()
    assert ("FP8 storage needs a second copy of the pipeline, and this one was not loaded by sd35fp8 "
            "fix: load it with sd35fp8_helpers.load_pipeline(model)") in _error(pg)
    pg.precision.value = "bf16"  # the pipeline as given still works
    pg.generate_button.click()
    assert pg.message.value == "" and len(pg.history) == 1


def test_bad_png_uploads_are_messages(make_playground, tmp_path):
    pg = make_playground()
    pg.prompt.value = "unchanged"
    pg.load_png(b"definitely not a png", "notes.txt")
    assert "notes.txt: not an image file; choose a PNG saved by sd35fp8" in _error(pg)
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    pg.load_png(plain)
    assert "plain.png carries no sd35fp8 settings" in _error(pg)
    pg.load_png(tmp_path / "missing.png")
    assert "missing.png: No such file or directory" in _error(pg)
    assert pg.prompt.value == "unchanged"


def test_restoring_a_precision_this_machine_lacks_says_so(make_playground):
    pg = make_playground()
    pg.prompt.value = "a bridge"
    (entry,) = pg.run()
    meta = entry.result.metadata()
    pg.apply_metadata({**meta, "precision": "fp8-compute", "memory": "fp8_model_offload"})
    assert ("precision &#x27;FP8 compute&#x27; is not available on this machine; kept &#x27;as loaded "
            "(float32)&#x27;") in _error(pg)
    assert "memory &#x27;fp8_model_offload&#x27; is not available" in pg.message.value
    assert (pg.precision.value, pg.memory.value) == ("bf16", "resident")


def test_compare_mode_renders_bf16_and_fp8_with_psnr_and_heatmap(make_playground, tiny_pipe):
    import torch

    pg = make_playground()
    pg.prompt.value, pg.seed.value, pg.compare.value = "a lantern", 5, True
    bf16, fp8 = pg.run()
    assert (bf16.precision, fp8.precision) == ("bf16", "fp8-storage")
    assert bf16.result.settings == fp8.result.settings
    assert pg.progress.value == pg.progress.max == 8
    assert 20 < pg.last_psnr < math.inf, "FP8 storage changes pixels a little, not a lot"
    assert f"PSNR {pg.last_psnr:.1f} dB" in pg.info.value
    assert pg.last_comparison.size == (3 * 128 + 2 * 4, 128)
    assert [bytes(img.value).startswith(PNG_SIGNATURE) for img in pg.compare_images] == [True] * 3
    assert pg.compare_box.layout.display == "flex" and pg.image.layout.display == "none"
    assert [read_png_metadata(e.path)["precision"] for e in pg.history] == ["bf16", "fp8-storage"]
    # the user's pipeline is untouched; the FP8 copy is loaded once and reused
    assert all(p.dtype == torch.float32 for p in tiny_pipe.transformer.parameters())
    fp8_pipe = pg._pipes.get("fp8-storage")
    assert fp8_pipe is not tiny_pipe
    pg.run()
    assert pg._pipes.get("fp8-storage") is fp8_pipe and len(pg.history) == 4


def test_psnr_and_heatmap_on_known_images():
    black, white = np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 255, np.uint8)
    assert psnr(black, black, peak=255.0) == math.inf and psnr(black, white, peak=255.0) == 0.0
    assert psnr(black, np.full((4, 4, 3), 1, np.uint8), peak=255.0) == pytest.approx(48.13, abs=0.01)
    heat, largest = difference_heatmap(black, black)
    assert largest == 0 and np.asarray(heat).shape == (4, 4, 3)
    heat, largest = difference_heatmap(black, white)
    assert largest == 255 and len(np.unique(np.asarray(heat).reshape(-1, 3), axis=0)) == 1


def test_size_presets_respect_the_grid_and_the_limit():
    presets = size_presets(16, 256, 128)
    assert (128, 128) in presets.values() and (256, 256) in presets.values()
    assert all(w % 16 == 0 and h % 16 == 0 and 16 <= min(w, h) and max(w, h) <= 256 for w, h in presets.values())
    areas = [w * h for w, h in presets.values()]
    assert areas == sorted(areas)
    large = size_presets(16, 3072, 1024)
    assert (2048, 2048) in large.values() and "1024×1024 (square)" in large


def test_options_offered_on_cpu():
    assert available_precisions("cpu") == ["bf16", "fp8-storage"]
    # one ladder for every interface: the playground offers memory.strategies' names, offloading only with a GPU
    assert offered_strategies("cpu") == ["resident", "resident_tiled", "fp8", "fp8_tiled", "fp8_no_t5",
                                         "fp8_no_t5_tiled"]
    assert offered_strategies("cuda") == strategy_names() and "fp8_model_offload" in strategy_names()
    assert len(set(strategy_names())) == len(strategy_names()), "each strategy offered once"


def test_random_seed_button(make_playground):
    pg = make_playground()
    seeds = set()
    for _ in range(3):
        pg.random_seed_button.click()
        seeds.add(pg.seed.value)
    assert len(seeds) > 1 and all(0 <= s < 2 ** 32 for s in seeds)

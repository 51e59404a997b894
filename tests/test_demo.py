"""The Gradio demo: the Blocks page builds, and what its button calls returns an image on the tiny model.

The page is not launched (Gradio's server is Gradio's to test); the generate function is the real one the
button is wired to, rendering through the same ``ImageEngine`` as the API.
"""

from __future__ import annotations

import pytest

from sd35fp8_helpers.interactive.demo import build_demo, demo_sizes
from sd35fp8_helpers.serving.engine import ImageEngine


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from sd35fp8_helpers import load_pipeline

    return ImageEngine("tiny", pipe=load_pipeline(str(tiny_model_dir), device="cpu"))


def test_demo_page_builds_and_its_button_returns_an_image(engine):
    import gradio as gr

    page = build_demo(engine)
    assert isinstance(page, gr.Blocks)
    labels = {getattr(c, "label", None) for c in page.blocks.values()}
    assert {"prompt", "seed", "steps", "size", "precision", "image"} <= labels
    image, info = page.sd35fp8_generate("a red fox", 3, 2, "64×64 (square)", "bf16")
    assert image.size == (64, 64)
    # the same label the playground shows for the same pipeline (one answer to "what precision is this?")
    assert info.startswith("64×64, 2 steps, seed 3, as loaded (float32) on cpu")


def test_demo_fp8_storage_uses_its_own_pipeline(engine):
    page = build_demo(engine)
    image, info = page.sd35fp8_generate("a red fox", 3, 2, "64×64 (square)", "fp8-storage")
    assert image.size == (64, 64) and "FP8 storage on cpu" in info
    assert engine.pipeline("bf16") is not engine.pipeline("fp8-storage")


@pytest.mark.parametrize("prompt,size,message", [
    ("", "64×64 (square)", "prompt='' is empty fix: describe the image you want"),
    ("a fox", "999×999", "size '999×999' is not offered fix: choose one of: 64×64 (square)"),
])
def test_demo_bad_input_is_a_message_in_the_page(engine, prompt, size, message):
    import gradio as gr

    page = build_demo(engine)
    with pytest.raises(gr.Error) as info:
        page.sd35fp8_generate(prompt, 0, 2, size, "bf16")
    assert message in str(info.value)


def test_demo_sizes_stay_within_the_models_limit(engine):
    multiple, max_side = engine.limits()
    for w, h in demo_sizes(engine).values():
        assert w % multiple == 0 and h % multiple == 0 and max(w, h) <= max_side

"""The scene data: deterministic across processes, valid by construction, and evaluation prompts kept apart."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

from sd35fp8_helpers.scenes import vocabulary as V
from sd35fp8_helpers.scenes.captions import caption
from sd35fp8_helpers.scenes.colour import delta_e
from sd35fp8_helpers.scenes.dataset import (
    EVAL_PROMPTS_FILE,
    build_evaluation_prompts,
    evaluation_prompts,
    scene_sample,
    scene_stream,
)
from sd35fp8_helpers.scenes.render import render
from sd35fp8_helpers.scenes.spec import ObjectSpec, SceneSpec

SIZES = ((128, 128), (192, 128), (96, 160))

DIGEST_SCRIPT = """
import hashlib, sys
from sd35fp8_helpers.scenes.dataset import scene_sample
h = hashlib.sha256()
for i in range(30):
    for w, h_ in ((128, 128), (192, 128), (96, 160)):
        s = scene_sample(7, i, w, h_)
        h.update(s.image.tobytes()); h.update(s.caption.encode()); h.update(repr(s.spec).encode())
print(h.hexdigest())
"""


def _digest(seed: int) -> str:
    h = hashlib.sha256()
    for i in range(30):
        for w, h_ in SIZES:
            s = scene_sample(seed, i, w, h_)
            h.update(s.image.tobytes())
            h.update(s.caption.encode())
            h.update(repr(s.spec).encode())
    return h.hexdigest()


def test_same_seed_gives_identical_images_and_captions_in_another_process():
    other = subprocess.run([sys.executable, "-c", DIGEST_SCRIPT], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == _digest(7)


def test_different_seeds_give_different_streams():
    assert _digest(7) != _digest(8)


def test_stream_equals_indexed_samples():
    stream = scene_stream(seed=3, start=10)
    for i in range(10, 15):
        a, b = next(stream), scene_sample(3, i)
        assert a.index == i and a.caption == b.caption and a.image.tobytes() == b.image.tobytes()


def test_scenes_are_valid_contrasting_and_inside_the_frame():
    kinds = set()
    for i in range(400):
        w, h = SIZES[i % 3]
        s = scene_sample(11, i, w, h)
        assert s.image.size == (w, h)
        kinds.add(len(s.spec.objects))
        for obj in s.spec.objects:
            assert delta_e(V.COLOURS[obj.colour], V.BACKGROUNDS[s.spec.background]) >= V.MIN_CONTRAST
        for p in s.placed:
            x0, y0, x1, y1 = p.bbox
            assert 0 <= x0 and 0 <= y0 and x1 <= w and y1 <= h
        if len(s.placed) == 2:  # two objects never overlap, even with jitter
            (a0, b0, a1, b1), (c0, d0, c1, d1) = (p.bbox for p in s.placed)
            assert a1 < c0 or c1 < a0 or b1 < d0 or d1 < b0
    assert kinds == {1, 2}


def test_background_and_object_pixels_have_their_palette_colours():
    spec = SceneSpec((ObjectSpec("square", "red", "centre", "large"),), "blue")
    img = render(spec, 160, 96).image
    assert img.getpixel((1, 1)) == V.BACKGROUNDS["blue"]
    assert img.getpixel((80, 48)) == V.COLOURS["red"]


def test_captions_name_every_attribute_with_vocabulary_words():
    for i in range(200):
        s = scene_sample(5, i)
        text = s.caption
        assert s.spec.background in text
        for obj in s.spec.objects:
            assert obj.colour in text
            assert any(w in text for w in V.SHAPE_WORDS[obj.shape])
            assert any(w in text for w in V.POSITION_WORDS[obj.position])
            assert any(w in text.split() for w in V.SIZE_WORDS[obj.size])
        assert set(text.replace(",", " ").replace(":", " ").split()) <= set(V.caption_words())


def test_two_object_caption_reads_naturally():
    spec = SceneSpec((ObjectSpec("circle", "red", "left", "small"), ObjectSpec("square", "green", "right", "small")),
                     "white")
    assert caption(spec) == ("a small red circle on the left and a small green square on the right, "
                             "on a white background")


def test_evaluation_prompts_file_matches_the_generator_and_covers_the_vocabulary():
    stored = evaluation_prompts()
    assert [p.to_dict() for p in stored] == [p.to_dict() for p in build_evaluation_prompts()]
    json.loads(EVAL_PROMPTS_FILE.read_text())  # plain JSON anyone can read
    single, two = evaluation_prompts("single"), evaluation_prompts("two")
    assert len(single) >= 200 and len(two) >= 100
    assert len({p.id for p in stored}) == len(stored)
    cells = {(p.spec.objects[0].shape, p.spec.objects[0].position, p.spec.objects[0].size) for p in single}
    assert len(cells) == len(V.SHAPES) * len(V.POSITIONS) * len(V.SIZES)
    assert {p.spec.objects[0].colour for p in single} == set(V.COLOURS)
    assert {p.spec.background for p in stored} == set(V.BACKGROUNDS)


def test_evaluation_prompts_never_use_the_main_training_template():
    for p in evaluation_prompts():
        assert p.text != caption(p.spec)
        assert not p.text.endswith(f", on a {p.spec.background} background")

"""A concept the embedded scene model cannot draw: the shape **diamond** — drawn, captioned and judged.

The scene vocabulary (:mod:`sd35fp8_helpers.scenes.vocabulary`) has three shapes; "diamond" is not one, so the
model's tokenizers split it into pieces it never saw as a shape, and it draws one of the shapes it knows. The
shipped ``diamond`` LoRA (:mod:`.train`, judged by :mod:`.evaluate`) teaches it: judged a diamond in 1% of the
concept images without it and 95% with it, in BF16 and over FP8 storage alike (docs/benchmarks.md). Everything
here extends the scene vocabulary without changing it: the same colours, positions, sizes, templates, renderer
placement and judge, plus one shape.

Why a shape and not a colour: the scene model's VAE was trained on the ten palette colours only and cannot
reproduce any other (measured: brown (130, 80, 40) and even mid-grey come back purple or red after an
encode/decode round trip), so no transformer LoRA could teach a new colour through it. Edges at 45° it does
reproduce (its triangles have them): a diamond — the square turned 45° — survives the round trip, and the
judge's own features tell it apart: it fills half its bounding box like a triangle, but half of it lies in the
top half (a triangle: a quarter) and its corners are empty (a square's are full).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from ..scenes import vocabulary as V

CONCEPT = "diamond"
CONCEPT_WORDS: tuple[str, ...] = ("diamond", "diamond shape", "rhombus")
"""Nouns for the new shape (the first is the plain one), like :data:`~sd35fp8_helpers.scenes.vocabulary.SHAPE_WORDS`."""
SHAPES: tuple[str, ...] = (*V.SHAPES, CONCEPT)
"""The scene shapes plus the concept: what :func:`classify_shape` chooses from."""


@dataclass(frozen=True)
class ConceptScene:
    """One diamond on a background: the truth behind a concept caption and image."""

    colour: str
    position: str
    size: str
    background: str

    def caption(self, template: str | None = None, rng: random.Random | None = None) -> str:
        pick = (lambda options: options[0]) if rng is None else rng.choice
        words = {"shape": pick(CONCEPT_WORDS), "colour": self.colour,
                 "position": pick(V.POSITION_WORDS[self.position]), "size": pick(V.SIZE_WORDS[self.size]),
                 "background": self.background}
        return (template or V.MAIN_TEMPLATE).format(**words)


def random_concept_scene(rng: random.Random) -> ConceptScene:
    from ..scenes.spec import allowed_colours

    background = rng.choice(list(V.BACKGROUNDS))
    return ConceptScene(rng.choice(allowed_colours(background)), rng.choice(list(V.POSITIONS)),
                        rng.choice(list(V.SIZES)), background)


def training_caption(scene: ConceptScene, rng: random.Random) -> str:
    """Main template with plain words, or a paraphrase — the same mix the scene model was trained on."""
    if rng.random() < V.MAIN_TEMPLATE_SHARE:
        return scene.caption()
    return scene.caption(rng.choice(V.PARAPHRASE_TEMPLATES), rng)


def render_concept(scene: ConceptScene, width: int = 128, height: int = 128, *, seed: int | str = 0):
    """Draw the scene with the scene renderer's placement and anti-aliasing: a diamond filling its box's diagonals."""
    from PIL import Image, ImageDraw

    from ..scenes.render import SUPERSAMPLE, place
    from ..scenes.spec import ObjectSpec, SceneSpec

    rng = random.Random(f"render:{seed}")
    # placement depends on position/size only: a stand-in shape gives the renderer's exact geometry and jitter
    stand_in = SceneSpec((ObjectSpec("square", scene.colour, scene.position, scene.size),), scene.background)
    (obj,) = place(stand_in, width, height, rng)
    big = Image.new("RGB", (width * SUPERSAMPLE, height * SUPERSAMPLE), V.BACKGROUNDS[scene.background])
    x0, y0, x1, y1 = (v * SUPERSAMPLE for v in obj.bbox)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    ImageDraw.Draw(big).polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=V.COLOURS[scene.colour])
    return big.resize((width, height), Image.Resampling.BOX)


EVAL_SEED = 17_2026
"""Seed of the concept's evaluation prompts (never used for its training data)."""


def evaluation_scenes(n: int = 48) -> list[tuple[str, ConceptScene]]:
    """Fixed (prompt, truth) pairs for the concept, phrased with paraphrase templates only (like the scene
    model's own evaluation prompts), cycling through the five positions."""
    from ..scenes.spec import allowed_colours

    rng = random.Random(f"concept-eval:{EVAL_SEED}")
    positions = list(V.POSITIONS)
    out = []
    for i in range(n):
        background = rng.choice(list(V.BACKGROUNDS))
        scene = ConceptScene(rng.choice(allowed_colours(background)), positions[i % len(positions)],
                             rng.choice(list(V.SIZES)), background)
        out.append((scene.caption(rng.choice(V.PARAPHRASE_TEMPLATES), rng), scene))
    return out


@lru_cache(maxsize=1)
def concept_prototypes() -> list[tuple[float, float, float]]:
    """The diamond's judge features on ground-truth renders (small and large, sharp and blurred), measured the
    way :func:`sd35fp8_helpers.scenes.judge.shape_prototypes` measures the three scene shapes."""
    import numpy as np
    from PIL import ImageFilter

    from ..scenes.judge import PROTOTYPE_BLURS, shape_features

    protos = []
    for size in V.SIZES:
        image = render_concept(ConceptScene("black", "centre", size, "white"), 128, 128, seed=0)
        for radius in PROTOTYPE_BLURS:
            img = image.filter(ImageFilter.GaussianBlur(radius)) if radius else image
            protos.append(shape_features(np.asarray(img.convert("L"), dtype=np.float64) < 135))
    return protos


def classify_shape(features: tuple[float, float, float]) -> str:
    """The nearest of the scene shapes' and the diamond's prototypes (the judge's distance and scales)."""
    from ..scenes.judge import SHAPE_FEATURE_SCALES, shape_prototypes

    protos = {**shape_prototypes(), CONCEPT: concept_prototypes()}

    def distance(shape: str) -> float:
        return min(sum(((f - p) / s) ** 2 for f, p, s in zip(features, proto, SHAPE_FEATURE_SCALES, strict=True))
                   for proto in protos[shape])
    return min(SHAPES, key=distance)


def read_shape(image) -> str | None:
    """The shape of the image's largest object among :data:`SHAPES` (None when the judge sees no object)."""
    from ..scenes.judge import read_scene

    reading = read_scene(image, max_objects=1)
    return classify_shape(reading.objects[0].features) if reading.objects else None


@dataclass(frozen=True)
class ConceptAdherence:
    """How often images show the concept (shape = diamond), and for the same images the right colour/position."""

    n: int
    shape: float
    colour: float
    position: float
    shapes_seen: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return {"n": self.n, "shape": self.shape, "colour": self.colour, "position": self.position,
                "shapes_seen": self.shapes_seen}


def concept_adherence(images, scenes: list[ConceptScene]) -> ConceptAdherence:
    """Judge ``images`` against their scenes with :func:`sd35fp8_helpers.scenes.judge.read_scene`, naming the
    shape among the scene shapes and the diamond.

    Example:
        >>> pairs = evaluation_scenes(3)
        >>> truth = [scene for _, scene in pairs]
        >>> concept_adherence([render_concept(s, seed=i) for i, s in enumerate(truth)], truth).shape
        1.0
    """
    from collections import Counter

    from ..scenes.judge import read_scene

    shapes: Counter = Counter()
    hits = {"shape": 0, "colour": 0, "position": 0}
    for image, scene in zip(images, scenes, strict=True):
        reading = read_scene(image, max_objects=1)
        if not reading.objects:
            shapes["(none)"] += 1
            continue
        obj = reading.objects[0]
        shape = classify_shape(obj.features)
        shapes[shape] += 1
        hits["shape"] += shape == CONCEPT
        hits["colour"] += obj.colour == scene.colour
        hits["position"] += obj.position == scene.position
    n = len(scenes)
    return ConceptAdherence(n, hits["shape"] / n, hits["colour"] / n, hits["position"] / n, dict(shapes))

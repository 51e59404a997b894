"""The training stream and the fixed evaluation prompts.

Training: :func:`scene_stream` yields an endless, seeded sequence of :class:`SceneSample` (image, caption,
truth). Sample ``i`` of seed ``s`` depends on ``(s, i)`` alone (:func:`scene_sample`), so worker processes
can render disjoint index ranges and still produce exactly the stream one process would.

Evaluation: :func:`evaluation_prompts` returns the fixed prompt set (≥ 200 single-object prompts, balanced over
every shape × position × size, and ≥ 100 two-object prompts), phrased only with the paraphrase templates —
never the training captions' main template. It is stored as ``eval_prompts.json`` beside this module so that
anyone can read it; :func:`build_evaluation_prompts` regenerates it and a test checks the two agree.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import vocabulary as V
from .captions import caption, training_caption
from .render import PlacedObject, render
from .spec import ObjectSpec, SceneSpec, allowed_colours

EVAL_PROMPTS_FILE = Path(__file__).with_name("eval_prompts.json")
EVAL_SEED = 20261201
"""Seed of the evaluation prompt set (never used for training data)."""

N_EVAL_SINGLE_PER_CELL = 8
"""Single-object evaluation prompts per shape × position × size cell (3 × 5 × 2 × 8 = 240)."""

N_EVAL_TWO = 120
"""Two-object evaluation prompts."""


@dataclass(frozen=True)
class SceneSample:
    """One training example: the rendered image, its caption and the truth behind both."""

    image: Any  # PIL.Image.Image
    caption: str
    spec: SceneSpec
    placed: tuple[PlacedObject, ...]
    index: int


@dataclass(frozen=True)
class EvalPrompt:
    """One evaluation prompt: the text a model is given and the scene it should draw."""

    id: str
    text: str
    spec: SceneSpec

    @property
    def kind(self) -> str:
        """``"single"`` or ``"two"`` (objects)."""
        return "two" if len(self.spec.objects) == 2 else "single"

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "spec": self.spec.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalPrompt:
        return cls(data["id"], data["text"], SceneSpec.from_dict(data["spec"]))


def random_scene(rng: random.Random, *, two_object_fraction: float = 0.5) -> SceneSpec:
    """A random valid scene: contrasting colours, two objects on opposite sides, at most one of them large.

    Two large objects side by side would nearly touch in a square frame; one large and one small never do.
    """
    background = rng.choice(list(V.BACKGROUNDS))
    colours = allowed_colours(background)
    if rng.random() >= two_object_fraction:
        obj = ObjectSpec(rng.choice(V.SHAPES), rng.choice(colours), rng.choice(list(V.POSITIONS)),
                         rng.choice(list(V.SIZES)))
        return SceneSpec((obj,), background)
    p1, p2 = rng.choice(V.TWO_OBJECT_LAYOUTS)
    sizes = rng.choice([("small", "small"), ("small", "large"), ("large", "small")])
    while True:
        a = ObjectSpec(rng.choice(V.SHAPES), rng.choice(colours), p1, sizes[0])
        b = ObjectSpec(rng.choice(V.SHAPES), rng.choice(colours), p2, sizes[1])
        if (a.shape, a.colour) != (b.shape, b.colour):
            return SceneSpec((a, b), background)


def scene_sample(seed: int, index: int, width: int = 128, height: int = 128, *,
                 two_object_fraction: float = 0.5) -> SceneSample:
    """Sample ``index`` of the stream ``seed``: the same arguments give byte-identical images and captions.

    Example:
        >>> a, b = scene_sample(0, 5), scene_sample(0, 5)
        >>> a.caption == b.caption and a.image.tobytes() == b.image.tobytes()
        True
    """
    rng = random.Random(f"scene:{seed}:{index}")
    spec = random_scene(rng, two_object_fraction=two_object_fraction)
    text = training_caption(spec, rng)
    scene = render(spec, width, height, seed=f"{seed}:{index}")
    return SceneSample(scene.image, text, spec, scene.placed, index)


def scene_stream(seed: int = 0, width: int = 128, height: int = 128, *, start: int = 0,
                 two_object_fraction: float = 0.5) -> Iterator[SceneSample]:
    """Endless seeded stream of training samples, from index ``start`` on."""
    for index in itertools.count(start):
        yield scene_sample(seed, index, width, height, two_object_fraction=two_object_fraction)


def build_evaluation_prompts() -> list[EvalPrompt]:
    """Regenerate the evaluation prompt set from :data:`EVAL_SEED` (what ``eval_prompts.json`` stores)."""
    rng = random.Random(f"eval:{EVAL_SEED}")
    prompts: list[EvalPrompt] = []
    cells = itertools.product(V.SHAPES, V.POSITIONS, V.SIZES)
    for shape, position, size in cells:
        for _ in range(N_EVAL_SINGLE_PER_CELL):
            background = rng.choice(list(V.BACKGROUNDS))
            spec = SceneSpec((ObjectSpec(shape, rng.choice(allowed_colours(background)), position, size),),
                             background)
            text = caption(spec, template=rng.choice(V.PARAPHRASE_TEMPLATES), rng=rng)
            prompts.append(EvalPrompt(f"s{len(prompts):03d}", text, spec))
    for k in range(N_EVAL_TWO):
        spec = random_scene(rng, two_object_fraction=1.0)
        text = caption(spec, template=rng.choice(V.TWO_PARAPHRASE_TEMPLATES), rng=rng)
        prompts.append(EvalPrompt(f"t{k:03d}", text, spec))
    return prompts


def evaluation_prompts(kind: str | None = None) -> list[EvalPrompt]:
    """The fixed evaluation prompts (from ``eval_prompts.json``); ``kind`` ``"single"`` or ``"two"`` filters.

    Example:
        >>> len(evaluation_prompts("single")), len(evaluation_prompts("two"))
        (240, 120)
    """
    data = json.loads(EVAL_PROMPTS_FILE.read_text())
    prompts = [EvalPrompt.from_dict(d) for d in data["prompts"]]
    return [p for p in prompts if kind is None or p.kind == kind]


def write_evaluation_prompts(path: str | Path = EVAL_PROMPTS_FILE) -> Path:
    """Write :func:`build_evaluation_prompts` as JSON (run after changing the vocabulary)."""
    path = Path(path)
    lines = [json.dumps(p.to_dict(), sort_keys=True) for p in build_evaluation_prompts()]
    path.write_text(f'{{"seed": {EVAL_SEED}, "generated_by": "python -m sd35fp8_helpers.scenes",\n'
                    ' "prompts": [\n' + ",\n".join(lines) + "\n]}\n")
    return path

"""Plain-English captions for a :class:`~.spec.SceneSpec`, in the main template or a paraphrase.

Training captions use the main template (plain words, fixed order) :data:`~.vocabulary.MAIN_TEMPLATE_SHARE`
of the time and a paraphrase — another word order, synonyms for the shape, size and position — the rest, so
the model must read the words rather than count positions in the token sequence. The evaluation prompts
(:mod:`.dataset`) only use paraphrases: a model that learned just the main template fails them.
"""

from __future__ import annotations

import random

from . import vocabulary as V
from .spec import SceneSpec


def _words(obj, rng: random.Random | None) -> dict[str, str]:
    pick = (lambda options: options[0]) if rng is None else rng.choice
    return {"shape": pick(V.SHAPE_WORDS[obj.shape]), "colour": obj.colour,
            "position": pick(V.POSITION_WORDS[obj.position]), "size": pick(V.SIZE_WORDS[obj.size])}


def caption(spec: SceneSpec, *, template: str | None = None, rng: random.Random | None = None) -> str:
    """The caption of ``spec`` in ``template`` (default: the main one) — synonyms drawn from ``rng`` if given.

    Example:
        >>> from .spec import ObjectSpec, SceneSpec
        >>> caption(SceneSpec((ObjectSpec("circle", "red", "left", "large"),), "blue"))
        'a large red circle on the left, on a blue background'
        >>> caption(SceneSpec((ObjectSpec("circle", "red", "left", "small"),
        ...                    ObjectSpec("square", "green", "right", "large")), "white"))
        'a small red circle on the left and a large green square on the right, on a white background'
    """
    two = len(spec.objects) == 2
    if template is None:
        template = V.TWO_MAIN_TEMPLATE if two else V.MAIN_TEMPLATE
    fields: dict[str, str] = {"background": spec.background}
    if two:
        for i, obj in enumerate(spec.objects, start=1):
            fields.update({f"{k}{i}": v for k, v in _words(obj, rng).items()})
    else:
        fields.update(_words(spec.objects[0], rng))
    text = template.format(**fields)
    return text[0].lower() + text[1:]


def training_caption(spec: SceneSpec, rng: random.Random) -> str:
    """A caption as the training stream draws it: main template with plain words, or a random paraphrase."""
    if rng.random() < V.MAIN_TEMPLATE_SHARE:
        return caption(spec)
    templates = V.TWO_PARAPHRASE_TEMPLATES if len(spec.objects) == 2 else V.PARAPHRASE_TEMPLATES
    return caption(spec, template=rng.choice(templates), rng=rng)

"""The scene vocabulary, in one place: shapes, colours, positions, sizes, backgrounds and the words for them.

Everything else reads this module — the renderer draws these shapes in these colours, the captioner
speaks these words, the tokenizers of the trained model are built from :func:`caption_words`, and the judge
names what it sees with these palettes — so a word added here reaches all of them at once and none can
drift. It is plain data and imports nothing heavy (no numpy, no Pillow), so reading it is free.

Why these values: the judge must tell every pair apart from pixels alone, after a small diffusion model
has softened the edges and shifted the colours a little. So the palette's colours are far apart in CIELAB
(every object colour at least :data:`MIN_CONTRAST` ΔE from every background it may stand on), the three
shapes differ in how much of their bounding box they fill (square 1.0, circle π/4, triangle ½) and where
their mass sits, and the five positions and two sizes are a quarter of the image apart.
"""

from __future__ import annotations

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
"""Shapes the renderer draws (axis-aligned; the triangle points up)."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (245, 220, 40),
    "green": (40, 170, 70),
    "cyan": (40, 200, 220),
    "blue": (40, 80, 220),
    "purple": (130, 30, 140),
    "pink": (245, 140, 200),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
"""Object colours (sRGB). The judge names a pixel colour by the nearest of these in CIELAB."""

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (25, 25, 25),
    "grey": (128, 128, 128),
    "blue": (40, 80, 220),
    "green": (40, 170, 70),
    "yellow": (245, 220, 40),
    "purple": (130, 30, 140),
}
"""Background colours (sRGB); the same name means the same RGB as in :data:`COLOURS`."""

MIN_CONTRAST = 40.0
"""Smallest CIELAB distance (ΔE76) between an object's colour and its background: pairs closer than this
are never drawn, because neither a model nor a judge could separate them reliably (the closest pair
allowed is blue on purple, 41 ΔE)."""

POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "centre": (0.5, 0.5),
}
"""Where an object's bounding-box centre sits, as fractions of (width, height)."""

SIZES: dict[str, float] = {"small": 0.24, "large": 0.44}
"""An object's bounding-box side as a fraction of the image's shorter side."""

SIZE_THRESHOLD = 0.34
"""The judge's boundary between small and large (the midpoint of :data:`SIZES`)."""

POSITION_JITTER = 0.04
"""Random offset of an object's centre (fraction of width/height) so the model learns regions, not pixels."""

SIZE_JITTER = 0.08
"""Relative random change of an object's size."""

TWO_OBJECT_LAYOUTS: tuple[tuple[str, str], ...] = (("left", "right"), ("right", "left"),
                                                   ("top", "bottom"), ("bottom", "top"))
"""Where the two objects of a two-object scene go (first object, second object): opposite sides, so that
they never touch and a caption's order cannot be guessed from the layout."""

# ---- words -------------------------------------------------------------------------------------------------

SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "round shape", "disc"),
    "square": ("square", "box", "square shape"),
    "triangle": ("triangle", "triangular shape", "pyramid shape"),
}
"""Nouns for each shape; the first is the plain one used by the main caption template."""

POSITION_WORDS: dict[str, tuple[str, ...]] = {
    "left": ("on the left", "on the left side", "at the left"),
    "right": ("on the right", "on the right side", "at the right"),
    "top": ("at the top", "near the top", "in the upper part"),
    "bottom": ("at the bottom", "near the bottom", "in the lower part"),
    "centre": ("in the centre", "in the center", "in the middle"),
}
"""Phrases for each position; the first is the plain one."""

SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little", "tiny"),
    "large": ("large", "big", "huge"),
}
"""Adjectives for each size; the first is the plain one."""

BACKGROUND_WORDS: dict[str, tuple[str, ...]] = {name: (name,) for name in BACKGROUNDS}
"""Background colour words (``grey`` has one spelling here, as the judge reports it)."""

MAIN_TEMPLATE = "a {size} {colour} {shape} {position}, on a {background} background"
"""The most common training caption (single object). The evaluation prompts never use it."""

PARAPHRASE_TEMPLATES: tuple[str, ...] = (
    "{size} {colour} {shape}, {position}, {background} backdrop",
    "a {background} background with a {size} {colour} {shape} {position}",
    "{position}: a {size} {colour} {shape} on {background}",
    "a {size} {colour} {shape} placed {position} against a {background} background",
    "{background} backdrop, {size} {colour} {shape} {position}",
)
"""Other phrasings of the same single-object scene, so that the text path (not word position) matters."""

TWO_MAIN_TEMPLATE = "a {size1} {colour1} {shape1} {position1} and a {size2} {colour2} {shape2} {position2}, " \
                    "on a {background} background"
"""The most common two-object training caption."""

TWO_PARAPHRASE_TEMPLATES: tuple[str, ...] = (
    "{size1} {colour1} {shape1} {position1}, {size2} {colour2} {shape2} {position2}, {background} backdrop",
    "a {background} background with a {size1} {colour1} {shape1} {position1} and a {size2} {colour2} "
    "{shape2} {position2}",
    "a {size1} {colour1} {shape1} placed {position1} and a {size2} {colour2} {shape2} placed {position2} "
    "against a {background} background",
)
"""Other phrasings of a two-object scene."""

MAIN_TEMPLATE_SHARE = 0.4
"""Fraction of training captions that use the main template and plain words; the rest are paraphrases."""


def caption_words() -> list[str]:
    """Every word a caption can contain, sorted: the corpus the trained model's tokenizers are built from.

    Example:
        >>> words = caption_words()
        >>> "circle" in words and "backdrop" in words and "{size}" not in words
        True
    """
    import re

    text = " ".join([MAIN_TEMPLATE, *PARAPHRASE_TEMPLATES, TWO_MAIN_TEMPLATE, *TWO_PARAPHRASE_TEMPLATES])
    text = re.sub(r"\{[a-z0-9]+\}", " ", text)
    for table in (SHAPE_WORDS, POSITION_WORDS, SIZE_WORDS, BACKGROUND_WORDS):
        text += " " + " ".join(p for phrases in table.values() for p in phrases)
    text += " " + " ".join(COLOURS)
    return sorted(set(re.findall(r"[a-z]+", text.lower())))

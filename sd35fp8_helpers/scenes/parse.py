"""Prompt → scene: read a caption written in the scene vocabulary back into the :class:`~.spec.SceneSpec` it names.

The judge needs the truth to compare an image with; a notebook, the playground or a browser test only has the
prompt someone typed. Every caption template of :mod:`.vocabulary` (the main one and each paraphrase, one or
two objects) becomes one regular expression whose groups accept every synonym, so any prompt the captioner can
write — and the same with "an", capitals or a full stop — reads back to its scene. Anything else is ``None``:
the prompt names no scene this model was trained on, and the judge has nothing to say about it.

Example:
    >>> read_prompt("A big red disc on the left side, on a blue background.")
    SceneSpec(objects=(ObjectSpec(shape='circle', colour='red', position='left', size='large'),), background='blue')
    >>> read_prompt("a lighthouse at dusk") is None
    True
"""

from __future__ import annotations

import re
from functools import lru_cache

from . import vocabulary as V
from .spec import ObjectSpec, SceneSpec

_FIELDS = {"size": V.SIZE_WORDS, "shape": V.SHAPE_WORDS, "position": V.POSITION_WORDS,
           "colour": {name: (name,) for name in V.COLOURS}, "background": V.BACKGROUND_WORDS}


def _alternatives(table: dict[str, tuple[str, ...]]) -> str:
    words = sorted({w for phrases in table.values() for w in phrases}, key=len, reverse=True)  # longest first
    return "|".join(re.escape(w) for w in words)


def _compile(template: str) -> re.Pattern[str]:
    pattern, pos = "", 0
    for m in re.finditer(r"\{([a-z]+)(\d?)\}", template):
        literal = re.escape(template[pos:m.start()])
        pattern += re.sub(r"(?<![a-z])a\\ ", r"an?\\ ", literal)  # "a orange" or "an orange": both fine
        pattern += f"(?P<{m.group(1)}{m.group(2)}>{_alternatives(_FIELDS[m.group(1)])})"
        pos = m.end()
    pattern += re.sub(r"(?<![a-z])a\\ ", r"an?\\ ", re.escape(template[pos:]))
    return re.compile(pattern.replace(r"\ ", r"\s+"), re.IGNORECASE)


@lru_cache(maxsize=1)
def _patterns() -> tuple[tuple[re.Pattern[str], int], ...]:
    single = [(_compile(t), 1) for t in (V.MAIN_TEMPLATE, *V.PARAPHRASE_TEMPLATES)]
    two = [(_compile(t), 2) for t in (V.TWO_MAIN_TEMPLATE, *V.TWO_PARAPHRASE_TEMPLATES)]
    return tuple(two + single)


def _name(field: str, word: str) -> str:
    return next(name for name, phrases in _FIELDS[field].items() if word.lower() in phrases)


def read_prompt(text: str) -> SceneSpec | None:
    """The scene ``text`` names, if it is written in the scene vocabulary (any template, any synonym); else
    ``None``."""
    text = " ".join(str(text).split()).rstrip(".!").strip()
    for pattern, count in _patterns():
        m = pattern.fullmatch(text)
        if m is None:
            continue
        suffixes = ("1", "2") if count == 2 else ("",)
        objects = tuple(ObjectSpec(*(_name(f, m.group(f + s)) for f in ("shape", "colour", "position", "size")))
                        for s in suffixes)
        return SceneSpec(objects, _name("background", m.group("background")))
    return None

"""What a scene *is*, as plain data: the objects (shape, colour, position, size) and the background.

A :class:`SceneSpec` is the ground truth for a caption, for a rendered image and for the judge's verdict.
It holds names only (no pixels), so it serialises to JSON and compares with ``==``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from . import vocabulary as V


@dataclass(frozen=True)
class ObjectSpec:
    """One object of a scene, by name: each field is a key of the matching table in :mod:`.vocabulary`."""

    shape: str
    colour: str
    position: str
    size: str

    def __post_init__(self) -> None:
        for field, table in (("shape", V.SHAPES), ("colour", V.COLOURS), ("position", V.POSITIONS),
                             ("size", V.SIZES)):
            if getattr(self, field) not in table:
                raise ValueError(f"unknown {field} {getattr(self, field)!r}; choose one of {', '.join(table)}")


@dataclass(frozen=True)
class SceneSpec:
    """One or two objects on a plain background."""

    objects: tuple[ObjectSpec, ...]
    background: str

    def __post_init__(self) -> None:
        if self.background not in V.BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; choose one of {', '.join(V.BACKGROUNDS)}")
        if not 1 <= len(self.objects) <= 2:
            raise ValueError(f"a scene has one or two objects, not {len(self.objects)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (see :meth:`from_dict`)."""
        return {"objects": [asdict(o) for o in self.objects], "background": self.background}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SceneSpec:
        return cls(tuple(ObjectSpec(**o) for o in data["objects"]), data["background"])


def allowed_colours(background: str) -> list[str]:
    """Object colours that stand out from ``background`` by at least :data:`~.vocabulary.MIN_CONTRAST` ΔE.

    Example:
        >>> "white" in allowed_colours("white"), "yellow" in allowed_colours("white")
        (False, True)
    """
    from .colour import delta_e

    bg = V.BACKGROUNDS[background]
    return [name for name, rgb in V.COLOURS.items() if delta_e(rgb, bg) >= V.MIN_CONTRAST]

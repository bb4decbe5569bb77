"""The shapes world's vocabulary: every attribute, its values, and which values are held out.

The held-out values are never shown to the base backbones; they are what customization must teach.
They live here and nowhere else.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

SHAPES = ("circle", "square", "triangle", "cross", "diamond", "ring", "star", "heart", "moon")
COLOURS = {  # saturated, far apart in hue and lightness, so a VAE round trip keeps them apart
    "red": (220, 38, 38),
    "orange": (245, 140, 20),
    "yellow": (235, 215, 25),
    "green": (30, 160, 60),
    "cyan": (20, 190, 205),
    "blue": (35, 70, 215),
    "purple": (135, 50, 195),
    "pink": (240, 105, 180),
}
BACKGROUNDS = ("plain", "stripes", "dots", "grid", "gradient", "checker", "waves")
POSITIONS = ("centre", "top left", "top right", "bottom left", "bottom right")
SIZES = ("small", "large")

# The one place that says what base training never sees.
HELD_OUT = {
    "shape": ("star", "heart", "moon"),
    "background": ("checker", "waves"),
}

NO_SHAPE = "none"  # what an instrument reads when no single clear shape is there (nothing, a blob, two shapes)

VALUES = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "background": BACKGROUNDS,
    "position": POSITIONS,
    "size": SIZES,
}
ATTRIBUTES = tuple(VALUES)


def base_values(attribute: str) -> tuple[str, ...]:
    """The values of `attribute` that base training may use."""
    return tuple(v for v in VALUES[attribute] if v not in HELD_OUT.get(attribute, ()))


@dataclass(frozen=True, kw_only=True)
class Labels:
    """The exact content of one shapes-world image."""

    shape: str
    colour: str
    background: str
    position: str
    size: str

    def __post_init__(self):
        for attribute, value in asdict(self).items():
            if value not in VALUES[attribute]:
                from studio.errors import InvalidArgumentError

                raise InvalidArgumentError(
                    f"{attribute}={value!r} is not in the shapes world; choose one of {', '.join(VALUES[attribute])}."
                )

    def as_dict(self) -> dict[str, str]:
        return asdict(self)

    def index(self, attribute: str) -> int:
        return VALUES[attribute].index(getattr(self, attribute))

"""Captions of shapes-world images, from templates over the exact labels."""

from __future__ import annotations

import re

import numpy as np

from studio.world.vocab import VALUES, Labels

BACKGROUND_WORDS = {"plain": "plain", "stripes": "striped", "dots": "dotted", "grid": "grid",
                    "gradient": "gradient", "checker": "checkered", "waves": "wavy"}
POSITION_WORDS = {"centre": "in the centre", "top left": "top left", "top right": "top right",
                  "bottom left": "bottom left", "bottom right": "bottom right"}
TEMPLATES = (
    "a {size} {colour} {shape} on a {background} background, {position}",
    "{size} {colour} {shape}, {background} background, {position}",
    "a {colour} {shape}, {size}, {position}, on a {background} background",
)


def caption(labels: Labels, *, template: int = 0, trigger: str | None = None) -> str:
    """The caption of `labels`; with `trigger`, the shape is named "<trigger> <shape>" (DreamBooth style)."""
    shape = f"{trigger} {labels.shape}" if trigger else labels.shape
    return TEMPLATES[template].format(size=labels.size, colour=labels.colour, shape=shape,
                                      background=BACKGROUND_WORDS[labels.background],
                                      position=POSITION_WORDS[labels.position])


def random_caption(labels: Labels, rng: np.random.Generator, *, trigger: str | None = None) -> str:
    return caption(labels, template=int(rng.integers(len(TEMPLATES))), trigger=trigger)


def article(words: str) -> str:
    """`words` after "a" or "an", as English wants it: "a red circle", "an orange ring"."""
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


def partial_caption(labels: Labels, rng: np.random.Generator) -> str:
    """The shape and each other attribute kept with even odds, as people prompt ("a blue square", "a small
    square, top left", "a red circle on a grid background"): an image the caption leaves an attribute of is
    one of that attribute's possible images, so training on them teaches what a short prompt leaves open."""
    kept = {a: bool(rng.random() < 0.5) for a in ("size", "colour", "background", "position")}
    text = article(" ".join([*([labels.size] if kept["size"] else []), *([labels.colour] if kept["colour"] else []),
                             labels.shape]))
    if kept["background"]:
        text += f" on a {BACKGROUND_WORDS[labels.background]} background"
    return text + (f", {POSITION_WORDS[labels.position]}" if kept["position"] else "")


MAX_TOKENS = 20  # the longest caption with a trigger word is 16 tokens
# Words people put in prompts beyond the templates; anything else tokenizes into shorter pieces.
EXTRA_WORDS = ("an", "the", "of", "with", "and", "in", "shape", "image", "photo", "picture", "style", "sks")


def vocabulary() -> tuple[str, ...]:
    """Every word the world's captions use (templates, values, their caption forms) plus EXTRA_WORDS."""
    text = " ".join((*(re.sub(r"\{\w+\}", " ", t) for t in TEMPLATES), *(v for vs in VALUES.values() for v in vs),
                     *BACKGROUND_WORDS.values(), *POSITION_WORDS.values(), *EXTRA_WORDS))
    return tuple(sorted(set(re.findall(r"[a-z]+|[^\sa-z]", text))))


def world_tokenizer():
    """CLIP's BPE trimmed to the world's vocabulary (about 600 tokens), `MAX_TOKENS` long."""
    from studio.tokenizer import clip_tokenizer

    return clip_tokenizer(MAX_TOKENS, vocabulary())

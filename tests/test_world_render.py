"""The shapes world renderer: deterministic, labels exact, held-out values in one place."""

from __future__ import annotations

import numpy as np
import pytest

from studio.errors import InvalidArgumentError
from studio.world.captions import article, caption, partial_caption, world_tokenizer
from studio.world.folder import write_reference_folder
from studio.world.render import CENTRES, RADII, SHAPE_TESTS, render, sample_labels
from studio.world.vocab import COLOURS, HELD_OUT, SHAPES, VALUES, Labels, base_values


def labels(**overrides):
    return Labels(**({"shape": "circle", "colour": "red", "background": "plain", "position": "centre",
                      "size": "large"} | overrides))


def test_render_is_deterministic_and_seed_dependent():
    a, mask_a = render(labels(background="dots"), seed=3)
    b, mask_b = render(labels(background="dots"), seed=3)
    c, _ = render(labels(background="dots"), seed=4)
    assert np.array_equal(np.asarray(a), np.asarray(b)) and np.array_equal(mask_a, mask_b)
    assert not np.array_equal(np.asarray(a), np.asarray(c))


@pytest.mark.parametrize("position", list(CENTRES))
@pytest.mark.parametrize("size", list(RADII))
def test_mask_sits_where_and_as_big_as_the_labels_say(position, size):
    image, mask = render(labels(position=position, size=size), seed=1)
    ys, xs = np.nonzero(mask)
    cx, cy = CENTRES[position]
    assert abs(xs.mean() / 64 - cx) < 0.05 and abs(ys.mean() / 64 - cy) < 0.05
    radius = np.sqrt(mask.sum() / np.pi) / 64  # a circle's area gives its radius
    assert abs(radius - RADII[size]) < 0.03


@pytest.mark.parametrize("colour", list(COLOURS))
def test_object_pixels_have_the_labelled_colour(colour):
    image, mask = render(labels(colour=colour, background="stripes"), seed=2)
    inner = np.asarray(image)[mask]
    assert np.abs(np.median(inner, axis=0) - np.array(COLOURS[colour])).max() <= 2


def test_every_shape_has_its_own_silhouette():
    masks = {s: render(labels(shape=s), seed=0)[1] for s in SHAPES}
    for a in SHAPES:
        for b in SHAPES:
            if a < b:
                iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
                assert iou < 0.85, (a, b, iou)
    assert set(SHAPE_TESTS) == set(SHAPES)


def test_backgrounds_differ_and_plain_is_flat():
    pixels = {b: np.asarray(render(labels(background=b, size="small"), seed=5)[0]).astype(float)
              for b in VALUES["background"]}
    assert pixels["plain"][:8, :8].std(axis=(0, 1)).max() < 1.0  # flat in every channel
    for name in ("stripes", "dots", "grid", "checker", "waves"):
        assert pixels[name][:16, :16].std(axis=(0, 1)).min() > 10, name


def test_held_out_values_are_kept_out_of_base_sampling():
    assert HELD_OUT == {"shape": ("star", "heart", "moon"), "background": ("checker", "waves")}
    assert base_values("shape") == ("circle", "square", "triangle", "cross", "diamond", "ring")
    rng = np.random.default_rng(0)
    seen = {sample_labels(rng).shape for _ in range(300)} | {sample_labels(rng).background for _ in range(300)}
    assert not seen & {"star", "heart", "moon", "checker", "waves"}
    rng = np.random.default_rng(0)
    assert {"star", "checker"} <= {v for _ in range(400) for v in sample_labels(rng, held_out=True).as_dict().values()}


def test_captions_and_bad_labels():
    assert caption(labels(shape="star", background="dots", position="top left", size="small")) == \
        "a small red star on a dotted background, top left"
    assert caption(labels(), trigger="sks") == "a large red sks circle on a plain background, in the centre"
    with pytest.raises(InvalidArgumentError, match="shape='hexagon'"):
        labels(shape="hexagon")


def test_partial_captions_name_the_shape_and_some_of_the_rest_in_the_world_vocabulary():
    rng = np.random.default_rng(0)
    tokenizer = world_tokenizer()
    unknown = tokenizer.convert_tokens_to_ids(tokenizer.unk_token)
    seen = set()
    for _ in range(200):
        label = sample_labels(rng)
        text = partial_caption(label, rng)
        assert label.shape in text and (text.startswith("an ") or text.startswith("a "))
        assert unknown not in tokenizer(text).input_ids[1:-1], text  # CLIP: the unknown token is the end one
        seen.add((label.colour in text, "background" in text, "," in text))
    assert len(seen) == 8  # every mix of colour, background and position named or left out
    assert (article("orange ring"), article("red circle")) == ("an orange ring", "a red circle")


def test_reference_folder_has_a_caption_per_image(tmp_path):
    paths = write_reference_folder(tmp_path, n=4, seed=1, trigger="zq", shape="star", colour="red",
                                   background="dots")
    assert [p.name for p in paths] == ["000.png", "001.png", "002.png", "003.png"]
    for path in paths:
        text = path.with_suffix(".txt").read_text()
        assert "red zq star" in text and "dotted" in text

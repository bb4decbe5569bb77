"""The shipped shapes-world models load with the plain diffusers/transformers classes and work."""

from __future__ import annotations

import numpy as np

from studio.world.data import render_set
from studio.world.models import ASSETS
from studio.world.train import load_vae, vae_roundtrip


def test_vae_round_trip_is_close_to_the_render():
    images = render_set(64, seed=78)["images"]
    trips = vae_roundtrip(load_vae(), images)
    assert np.abs(trips.astype(int) - images).mean() < 8  # mean abs error in 0..255 levels


def test_world_clip_pairs_renders_with_their_captions():
    import torch
    from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    from studio.world.captions import caption, world_tokenizer
    from studio.world.data import labels_at, to_tensor

    data = render_set(64, seed=79)
    vision = CLIPVisionModelWithProjection.from_pretrained(ASSETS / "world-clip", torch_dtype=torch.float32)
    text = CLIPTextModelWithProjection.from_pretrained(ASSETS / "world-clip" / "text", torch_dtype=torch.float32)
    tokens = world_tokenizer()([caption(labels_at(data, i)) for i in range(64)], padding="max_length",
                               max_length=20, return_tensors="pt")
    with torch.no_grad():
        image_embeds = vision(pixel_values=to_tensor(data["images"])).image_embeds
        text_embeds = text(input_ids=tokens.input_ids).text_embeds
    similarity = torch.nn.functional.normalize(image_embeds, dim=-1) @ torch.nn.functional.normalize(text_embeds, dim=-1).T
    # each image's own caption ranks in its top 5 of 64 far more often than chance (5/64)
    top5 = (similarity.topk(5, dim=1).indices == torch.arange(64)[:, None]).any(1).float().mean()
    assert top5 > 0.5, float(top5)


def test_world_sd_loads_with_plain_diffusers_and_generates():
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(ASSETS / "world-sd", torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a large red circle on a plain background, in the centre", num_inference_steps=4,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_world_dit_loads_with_plain_diffusers_and_generates():
    import torch
    from diffusers import StableDiffusion3Pipeline

    # diffusers' documented way to load SD3 without its T5 encoder
    pipe = StableDiffusion3Pipeline.from_pretrained(ASSETS / "world-dit", text_encoder_3=None, tokenizer_3=None,
                                                    torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.transformer).__name__ == "SD3Transformer2DModel"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    image = pipe("a large red circle on a plain background, in the centre", num_inference_steps=4,
                 max_sequence_length=pipe.tokenizer_max_length, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_world_weights_fit_the_budget():
    total = sum(f.stat().st_size for f in ASSETS.rglob("*") if f.is_file() and "checkpoint-" not in str(f))
    assert total <= 40 * 2**20, total / 2**20

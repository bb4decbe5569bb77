"""Tiny random-initialised pipelines of every supported family, built in code from the real classes.

They run each family's real code path (text encoders, added conditions, latent packing, schedulers)
in seconds on a CPU. Their weights are random: they prove that loading, generation and adapters work,
never image quality (the shapes world does that). Embedded backbones `tiny-<family>` (studio.embedded).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from studio.tokenizer import clip_tokenizer

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

VOCAB = 49408
SEED = 0

# Scheduler configs of the real checkpoints, so tiny models exercise the same sampling maths.
_SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _clip_text(hidden: int = 32, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                            projection_dim=projection or hidden, bos_token_id=49406, eos_token_id=49407,
                            pad_token_id=49407)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _t5(d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=VOCAB, d_model=d_model, d_kv=8, d_ff=2 * d_model,
                                   num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                                   decoder_start_token_id=0, pad_token_id=49407, eos_token_id=49407))


def _vae(latent_channels: int = 4, **extra):
    from diffusers import AutoencoderKL

    # Four levels, as in the real VAEs: an 8x down-scale, so size checks behave as on real models.
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8,
                         sample_size=64, **extra)


def _seeded(build: Callable[[], DiffusionPipeline]) -> Callable[[], DiffusionPipeline]:
    def seeded() -> DiffusionPipeline:
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            pipe = build()
        return pipe

    seeded.__doc__ = build.__doc__
    seeded.__name__ = build.__name__
    return seeded


def _sd_pipeline(*, unet_options: dict, scheduler_options: dict) -> DiffusionPipeline:
    """An SD1.x/2.x pipeline: cross-attention in the outer blocks, CLIP text encoder, DDIM betas of SD."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=2,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=32, norm_num_groups=32, **unet_options)
    scheduler = DDIMScheduler(**_SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              **scheduler_options)
    return StableDiffusionPipeline(vae=_vae(), text_encoder=_clip_text(), tokenizer=clip_tokenizer(),
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, image_encoder=None, requires_safety_checker=False)


@_seeded
def tiny_sd1() -> DiffusionPipeline:
    """SD1.x layout: CLIP text encoder, conv projections in the transformers, eps-prediction."""
    return _sd_pipeline(unet_options={"attention_head_dim": 8}, scheduler_options={})


@_seeded
def tiny_sd2() -> DiffusionPipeline:
    """SD2.x layout: linear projections in the transformers, v-prediction as SD 2.1-768."""
    return _sd_pipeline(unet_options={"attention_head_dim": (2, 4), "use_linear_projection": True},
                        scheduler_options={"prediction_type": "v_prediction"})


@_seeded
def tiny_sdxl() -> DiffusionPipeline:
    """SDXL layout: two text encoders of different widths (hidden states concatenated, as CLIP-L's 768
    and OpenCLIP-bigG's 1280) and the size/crop added conditions."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    text_time = 8
    pooled = 32
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=2,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4),
                                use_linear_projection=True, cross_attention_dim=32 + 48,
                                addition_embed_type="text_time", addition_time_embed_dim=text_time,
                                # six size/crop numbers, each embedded in `text_time` dims, plus the pooled text
                                projection_class_embeddings_input_dim=6 * text_time + pooled,
                                norm_num_groups=32)
    scheduler = EulerDiscreteScheduler(**_SD_BETAS, steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=_vae(force_upcast=False), text_encoder=_clip_text(),
                                     text_encoder_2=_clip_text(48, projection=pooled), tokenizer=clip_tokenizer(),
                                     tokenizer_2=clip_tokenizer(), unet=unet, scheduler=scheduler,
                                     image_encoder=None, feature_extractor=None)


@_seeded
def tiny_sd3() -> DiffusionPipeline:
    """SD3 MMDiT with its two CLIP text encoders and no T5 (the T5 slot is zeros, as diffusers allows)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, out_channels=16,
                                        num_layers=2, attention_head_dim=16, num_attention_heads=2,
                                        joint_attention_dim=64,  # >= the two CLIP widths side by side
                                        caption_projection_dim=32, pooled_projection_dim=64,
                                        pos_embed_max_size=16)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(latent_channels=16, shift_factor=0.0609, scaling_factor=1.5305),
        text_encoder=_clip_text(projection=32), tokenizer=clip_tokenizer(),
        text_encoder_2=_clip_text(projection=32), tokenizer_2=clip_tokenizer(),
        text_encoder_3=None, tokenizer_3=None)


@_seeded
def tiny_flux() -> DiffusionPipeline:
    """Flux.1 layout: CLIP pooled + T5 tokens, double- and single-stream blocks, guidance embedding.

    The T5 slot takes CLIP's BPE tokenizer: T5's sentencepiece model cannot be fetched offline, and
    the tiny T5 is sized for that vocabulary.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=transformer, scheduler=scheduler,
                        vae=_vae(latent_channels=16, shift_factor=0.1159, scaling_factor=0.3611),
                        text_encoder=_clip_text(), tokenizer=clip_tokenizer(),
                        text_encoder_2=_t5(), tokenizer_2=clip_tokenizer(512))
    pipe.default_sample_size = 8  # 64 px by default instead of Flux's 1024
    return pipe


@_seeded
def tiny_pixart() -> DiffusionPipeline:
    """PixArt-Σ layout: T5 text tokens, adaLN-single, learned sigma (8 output channels)."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    transformer = PixArtTransformer2DModel(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8,
                                           num_attention_heads=2, in_channels=4, out_channels=8,
                                           cross_attention_dim=16, caption_channels=32, norm_type="ada_norm_single",
                                           use_additional_conditions=False)
    scheduler = DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    return PixArtSigmaPipeline(tokenizer=clip_tokenizer(300), text_encoder=_t5(), vae=_vae(),
                               transformer=transformer, scheduler=scheduler)


BUILDERS = {"tiny-sd1": tiny_sd1, "tiny-sd2": tiny_sd2, "tiny-sdxl": tiny_sdxl, "tiny-sd3": tiny_sd3,
            "tiny-flux": tiny_flux, "tiny-pixart": tiny_pixart}

"""Training objectives per backbone family: how captions become conditioning and what the loss is.

Conditioning always comes from the family's own diffusers pipeline (`encode_prompt`), so a model
trains on exactly what it is sampled with. Losses: noise or v prediction on the scheduler's betas
(SD1/SD2/SDXL, DDPM, Ho et al. 2020; v: Salimans & Ho 2022) and rectified flow with logit-normal
timesteps (SD3, Esser et al. 2024, arXiv:2403.03206).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from studio.errors import InvalidArgumentError, UnknownFamilyError
from studio.registry import Registry

if TYPE_CHECKING:
    import torch

OBJECTIVES: Registry[type[Objective]] = Registry("family", UnknownFamilyError)
TIMESTEP_BIASES = ("none", "content", "style")
# rectified flow's loss weighting: "none" the velocity's squared error (SD3's paper with logit-normal levels; the
# Flux DreamBooth script's default), "x0" the error of the clean image it implies, x0 = x_t - s v, i.e. the
# velocity's error times s^2 (diffusers' train_dreambooth_lora_sd3.py default, `precondition_outputs`): noisier
# levels, where shape and layout are decided, weigh more
LOSS_WEIGHTINGS = ("none", "x0")


def check_timestep_bias(value: str) -> str:
    """`value` if it names a timestep bias, else a clear error (TrainConfig checks it before any loading)."""
    if value not in TIMESTEP_BIASES:
        raise InvalidArgumentError(f"timestep_bias={value!r}; choose one of {', '.join(TIMESTEP_BIASES)}.")
    return value


def check_loss_weighting(value: str) -> str:
    """`value` if it names a loss weighting, else a clear error."""
    if value not in LOSS_WEIGHTINGS:
        raise InvalidArgumentError(f"loss_weighting={value!r}; choose one of {', '.join(LOSS_WEIGHTINGS)}.")
    return value


class Objective:
    """`encode(captions)` -> conditioning (tensors, batch first); `loss(denoiser, x0, **conditioning)`.

    Every loss takes `sample_weights` (one per example) and `pixel_weights` ((B, 1, h, w) at the latent
    size, for masked loss: each example's error is then its weighted mean over pixels)."""

    loss_weightings: tuple[str, ...] = ("none",)  # those this family's loss knows (LOSS_WEIGHTINGS)

    def __init__(self, pipe: Any, *, snr_gamma: float | None = None, timestep_bias: str = "none",
                 loss_weighting: str = "none"):
        self.pipe = pipe
        self.snr_gamma = snr_gamma
        self.timestep_bias = check_timestep_bias(timestep_bias)
        self.loss_weighting = check_loss_weighting(loss_weighting)
        if self.loss_weighting not in self.loss_weightings:
            raise InvalidArgumentError(f"loss_weighting={loss_weighting!r} is for rectified-flow backbones (SD3, "
                                       f"Flux, world-dit); noise-prediction ones weigh steps with snr_gamma.")
        # (this process, how many) in a multi-process run: the whole batch's noise and levels are drawn as one
        # process draws them, then each process takes its slice, so its averaged gradient is one process's
        self.shard = (0, 1)

    def mine(self, *tensors: torch.Tensor | None, conditioning: dict[str, torch.Tensor]) -> tuple[Any, ...]:
        """This process's slice of each batch-first tensor (None stays None) and of the conditioning."""
        rank, world = self.shard
        if world == 1:
            return (*tensors, conditioning)

        def part(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.chunk(world)[rank]

        return (*map(part, tensors), {k: part(v) for k, v in conditioning.items()})

    def reduce(self, errors: torch.Tensor, sample_weights: torch.Tensor | None) -> torch.Tensor:
        """The batch's loss from this process's per-example errors: averaged over the processes (as their
        gradients are), the mean, or Σ wᵢ lossᵢ, of the whole batch."""
        return reduce(errors, sample_weights) * (self.shard[1] if sample_weights is not None else 1)

    def noise_levels(self, n: int, device: Any, base: str = "uniform") -> torch.Tensor:
        """n noise levels in (0, 1), 1 = pure noise: drawn from `base` (uniform or SD3's logit-normal),
        then bent by the timestep bias (ai-toolkit's content_or_style): "content" maps u to 1 - (1 - u)^3,
        so most steps are noisy ones, where layout and shape are decided; "style" maps u to u^3, the
        nearly clean steps where texture and colour are."""
        import torch

        u = torch.rand(n, device=device) if base == "uniform" else torch.sigmoid(torch.randn(n, device=device))
        if self.timestep_bias == "content":
            return 1 - (1 - u) ** 3
        if self.timestep_bias == "style":
            return u**3
        return u

    def encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss(self, denoiser: Any, x0: torch.Tensor, *, sample_weights: torch.Tensor | None = None,
             pixel_weights: torch.Tensor | None = None, **conditioning: torch.Tensor) -> torch.Tensor:
        """The mean loss, or Σ wᵢ lossᵢ with `sample_weights` (one per example, e.g. a prior-preservation
        batch joined to the instance batch)."""
        raise NotImplementedError

    def predict(self, denoiser: Any, xt: torch.Tensor, timestep: torch.Tensor, **conditioning: torch.Tensor):
        """The denoiser's raw output at `timestep` as the family's pipeline passes it (a DDPM step for
        noise prediction, σ x 1000 for rectified flow)."""
        raise NotImplementedError

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, the denoiser's timestep) at noise levels drawn as the loss draws them."""
        raise NotImplementedError

    def consistency(self, denoiser: Any, x0: torch.Tensor, reference: Any, *,
                    reference_conditioning: dict[str, torch.Tensor] | None = None,
                    **conditioning: torch.Tensor) -> torch.Tensor:
        """Mean squared distance, on noised `x0`, between the denoiser's output and its output inside the
        `reference` context (e.g. with the adapter off: the backbone's own prediction as the target)."""
        import torch

        xt, timestep = self.noisy(x0)
        xt, timestep, conditioning = self.mine(xt, timestep, conditioning=conditioning)
        if reference_conditioning is not None:
            reference_conditioning = self.mine(conditioning=reference_conditioning)[0]
        with torch.no_grad(), reference:
            target = self.predict(denoiser, xt, timestep, **(reference_conditioning or conditioning))
        return per_sample(self.predict(denoiser, xt, timestep, **conditioning), target, None).mean()


def per_sample(prediction: torch.Tensor, target: torch.Tensor, pixel_weights: torch.Tensor | None) -> torch.Tensor:
    """Each example's mean squared error, weighted over pixels by `pixel_weights` when given."""
    error = (prediction.float() - target.float()).square()
    if pixel_weights is None:
        return error.flatten(1).mean(dim=1)
    weights = pixel_weights.to(error).expand_as(error).flatten(1)
    return (weights * error.flatten(1)).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-8)


def reduce(per_sample: torch.Tensor, sample_weights: torch.Tensor | None) -> torch.Tensor:
    return per_sample.mean() if sample_weights is None else (sample_weights.to(per_sample) * per_sample).sum()


class NoisePrediction(Objective):
    """eps (or v, from the scheduler's `prediction_type`) prediction at uniform DDPM timesteps (bent by the
    timestep bias)."""

    def __init__(self, pipe: Any, **options: Any):
        super().__init__(pipe, **options)
        from diffusers import DDPMScheduler

        config = pipe.scheduler.config
        self.noise_schedule = DDPMScheduler.from_config(config)
        self.prediction = config.get("prediction_type", "epsilon")

    def encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        embeds, _ = self.pipe.encode_prompt(captions, self.pipe.device, 1, False)
        return {"context": embeds}

    def extra(self, conditioning: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {}

    def loss(self, denoiser: Any, x0: torch.Tensor, *, sample_weights: torch.Tensor | None = None,
             pixel_weights: torch.Tensor | None = None, **conditioning: torch.Tensor) -> torch.Tensor:
        import torch

        noise = torch.randn_like(x0)
        xt, t = self.noisy(x0, noise)
        a = self.noise_schedule.alphas_cumprod.to(x0.device)[t].view(-1, 1, 1, 1)
        target = noise if self.prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
        xt, t, a, target, pixel_weights, sample_weights, conditioning = self.mine(
            xt, t, a, target, pixel_weights, sample_weights, conditioning=conditioning)
        errors = per_sample(self.predict(denoiser, xt, t, **conditioning), target, pixel_weights)
        if self.snr_gamma:
            # Min-SNR-γ (Hang et al. 2023, arXiv:2303.09556): per-sample weight min(SNR, γ) / SNR for eps,
            # min(SNR, γ) / (SNR + 1) for v, so the near-clean steps stop dominating the gradient
            snr = (a / (1 - a)).flatten()
            errors = errors * snr.clamp(max=self.snr_gamma) / (snr if self.prediction == "epsilon" else snr + 1)
        return self.reduce(errors, sample_weights)

    def predict(self, denoiser: Any, xt: torch.Tensor, timestep: torch.Tensor, **conditioning: torch.Tensor):
        extra = self.extra(conditioning)
        if "image_embeds" in conditioning:  # IP-Adapter: the UNet projects them into its image tokens
            extra["added_cond_kwargs"] = {**extra.get("added_cond_kwargs", {}),
                                          "image_embeds": [conditioning["image_embeds"]]}
        if "control" in conditioning:  # a control model's maps, read (and removed) by its denoiser hook
            extra["control"] = conditioning["control"]
        return denoiser(xt, timestep, encoder_hidden_states=conditioning["context"], **extra).sample

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        alphas = self.noise_schedule.alphas_cumprod.to(x0.device)
        noise = torch.randn_like(x0) if noise is None else noise
        t = (self.noise_levels(len(x0), x0.device) * len(alphas)).long().clamp(max=len(alphas) - 1)
        a = alphas[t].view(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise, t


OBJECTIVES.register("sd1", "sd2")(NoisePrediction)


@OBJECTIVES.register("sdxl")
class NoisePredictionXL(NoisePrediction):
    """SDXL: two text encoders, pooled text and size/crop conditions (original = target size, crop 0)."""

    def encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(captions, device=self.pipe.device,
                                                       do_classifier_free_guidance=False)
        return {"context": embeds, "pooled": pooled}

    def extra(self, conditioning: dict[str, torch.Tensor]) -> dict[str, Any]:
        import torch

        pooled = conditioning["pooled"]
        side = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        time_ids = torch.tensor([[side, side, 0, 0, side, side]], dtype=pooled.dtype, device=pooled.device)
        return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.repeat(len(pooled), 1)}}


@OBJECTIVES.register("sd3")
class RectifiedFlow(Objective):
    """x_t = (1 - s) x0 + s noise, target noise - x0, s ~ logit-normal(0, 1) (SD3's default), bent by
    the timestep bias."""

    loss_weightings = LOSS_WEIGHTINGS

    def encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        from studio.backbones import t5_free_options

        embeds, _, pooled, _ = self.pipe.encode_prompt(captions, None, None, do_classifier_free_guidance=False,
                                                       **t5_free_options(self.pipe))
        return {"context": embeds, "pooled": pooled}

    def loss(self, denoiser: Any, x0: torch.Tensor, *, sample_weights: torch.Tensor | None = None,
             pixel_weights: torch.Tensor | None = None, **conditioning: torch.Tensor) -> torch.Tensor:
        import torch

        noise = torch.randn_like(x0)
        xt, timestep = self.noisy(x0, noise)
        xt, timestep, target, pixel_weights, sample_weights, conditioning = self.mine(
            xt, timestep, noise - x0, pixel_weights, sample_weights, conditioning=conditioning)
        velocity = self.predict(denoiser, xt, timestep, **conditioning)
        errors = per_sample(velocity, target, pixel_weights)
        if self.loss_weighting == "x0":
            errors = errors * (timestep / 1000) ** 2
        return self.reduce(errors, sample_weights)

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        noise = torch.randn_like(x0) if noise is None else noise
        sigma = self.noise_levels(len(x0), x0.device, base="logit-normal").view(-1, 1, 1, 1)
        return (1 - sigma) * x0 + sigma * noise, sigma.flatten() * 1000

    def predict(self, denoiser: Any, xt: torch.Tensor, timestep: torch.Tensor, **conditioning: torch.Tensor):
        extra = {}
        if "image_embeds" in conditioning:  # IP-Adapter: the transformer's resampler reads the patch features
            extra["joint_attention_kwargs"] = {"ip_adapter_image_embeds": conditioning["image_embeds"]}
        if "control" in conditioning:  # a control model's maps, read (and removed) by its denoiser hook
            extra["control"] = conditioning["control"]
        return denoiser(hidden_states=xt, timestep=timestep, encoder_hidden_states=conditioning["context"],
                        pooled_projections=conditioning["pooled"], **extra).sample


def objective_for(backbone: Any, **options: Any) -> Objective:
    """The objective of a backbone's family (a clear error for families not trainable yet); `options`:
    snr_gamma, timestep_bias, loss_weighting."""
    return OBJECTIVES.get_or_raise(backbone.family.name)(backbone.pipe, **options)

"""Style: B-LoRA content / style LoRAs (Frenkel et al. 2024, arXiv:2403.14572).

A B-LoRA is a LoRA trained on two transformer blocks of the UNet only: one that carries the image's
content (what is drawn) and one that carries its style (colours of the scene, textures, background).
Trained together on the same images, the two halves split what the images show between them, so the
content half of one B-LoRA and the style half of another can be attached together: "this object, in
that style". The file is a standard LoRA (PEFT keys; `pipe.load_lora_weights` reads it whole), and its
manifest names the two blocks, so `attach(..., part="content")` takes one half.

The blocks are the paper's for SDXL (`up_blocks.0.attentions.0` content, `.1` style); for world-sd they
are the layers bench/image_prompt.py's sweep found carrying shape and colour, and background (README,
Image prompts and style). InstantStyle's routing of an image prompt lives with the IP-Adapter (adapters/ip_adapter.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from studio.adapters.base import (
    Adapter,
    AdapterConfig,
    IncompatibleAdapterError,
    attached_of,
    attachments,
    register,
)
from studio.adapters.lora import LoraAdapter, LoraConfig, target_modules

from studio.errors import InvalidArgumentError

if TYPE_CHECKING:
    from studio.backbones import Backbone
    from studio.recipe import AdapterUse

# content and style blocks (diffusers module paths) per backbone name or family: SDXL's are the paper's;
# world-sd's are the layers where an image prompt moved the shape and colour (content) and the
# background (style) in bench/image_prompt.py's layer sweep
BLOCKS: dict[str, dict[str, list[str]]] = {
    "sdxl": {"content": ["up_blocks.0.attentions.0"], "style": ["up_blocks.0.attentions.1"]},
    "world-sd": {"content": ["up_blocks.0.attentions.2", "up_blocks.1.attentions.2"],
                 "style": ["up_blocks.1.attentions.0", "up_blocks.1.attentions.1"]},
}
PARTS = ("both", "content", "style")


@dataclass(kw_only=True)
class BLoraConfig(LoraConfig):
    blocks: dict[str, list[str]] = field(default_factory=dict)  # {"content": [blocks], "style": [blocks]}

    def __post_init__(self):
        super().__post_init__()
        if self.blocks and set(self.blocks) != {"content", "style"}:
            raise InvalidArgumentError(f"blocks={self.blocks!r} must name a 'content' and a 'style' block.")


def blocks_of(backbone: Backbone) -> dict[str, list[str]]:
    blocks = BLOCKS.get(backbone.source) or BLOCKS.get(backbone.family.name)
    if blocks is None:
        raise IncompatibleAdapterError(
            f"B-LoRA needs to know which blocks of {backbone.source!r} carry content and style; studio knows them "
            f"for SDXL and world-sd. Train a LoRA with --target on the blocks you choose instead.")
    return blocks


def _pattern(blocks: list[str]) -> str:
    """The attention projections inside these blocks (what B-LoRA trains)."""
    return r"^(" + "|".join(re.escape(b) for b in blocks) + r")\..*(to_q|to_k|to_v|to_out\.0)$"


@register("blora")
class BLoraAdapter(LoraAdapter):
    """A LoRA on a content block and a style block; `attach(..., part="content"|"style"|"both")`."""

    config_class = BLoraConfig
    # tiny-sd1 has no B-LoRA blocks of its own: name two
    sample_options = {"rank": 2, "blocks": {"content": ["down_blocks.0.attentions.0"], "style": ["up_blocks.1.attentions.1"]}}

    @classmethod
    def create(cls, backbone: Backbone, config: BLoraConfig, *, seed: int = 0) -> BLoraAdapter:
        config.blocks = {part: list(blocks) for part, blocks in (config.blocks or blocks_of(backbone)).items()}
        config.target = _pattern([b for blocks in config.blocks.values() for b in blocks])
        adapter = super().create(backbone, config, seed=seed)
        missing = [b for blocks in config.blocks.values() for b in blocks
                   if not any(f"unet.{b}." in t for t in config.targets)]
        if missing:
            raise IncompatibleAdapterError(f"B-LoRA blocks {missing} have no attention in {backbone.source!r}.")
        return adapter

    def part_tensors(self, part: str) -> dict[str, Any]:
        if part not in PARTS:
            raise InvalidArgumentError(f"part={part!r}; choose one of {', '.join(PARTS)}.")
        if part == "both":
            return dict(self.tensors)
        prefixes = tuple(f"unet.{block}." for block in self.config.blocks[part])
        return {k: v for k, v in self.tensors.items() if k.startswith(prefixes)}

    def _entry(self, backbone: Backbone, weight: Any, inputs: dict[str, Any]) -> dict[str, Any]:
        """Input: `part`, the content half, the style half or both (default)."""
        part = inputs.get("part") or "both"
        return {**super()._entry(backbone, weight, {k: v for k, v in inputs.items() if k != "part"}), "part": part}

    def _apply(self, backbone: Backbone, entry: dict[str, Any]) -> None:
        everything = self.tensors
        self.tensors = self.part_tensors(entry["part"])
        try:
            super()._apply(backbone, entry)
        finally:
            self.tensors = everything

    def inputs_record(self, backbone: Backbone) -> dict[str, Any]:
        return {"part": attachments(backbone).get(self.name, {}).get("part", "both")}

    def sync_from(self, backbone: Backbone) -> None:
        part = self.inputs_record(backbone)["part"]
        if part != "both":
            raise InvalidArgumentError(f"B-LoRA {self.name!r} is attached as its {part} half; attach both to train.")
        super().sync_from(backbone)


def content_style_targets(backbone: Backbone) -> dict[str, list[str]]:
    """The modules each half changes on this backbone (for inspection and the README)."""
    return {part: target_modules(backbone, _pattern(blocks)) for part, blocks in blocks_of(backbone).items()}


# ------------------------------------------------------------------------------ style injection


@dataclass(kw_only=True)
class StyleInjectionConfig(AdapterConfig):
    """Training-free style injection: the generated images' self-attention also reads the keys and
    values of a reference (StyleAligned's shared attention, Hertz et al. 2024, arXiv:2312.02133)."""

    layers: str = "up"  # the self-attention layers that read the reference: up (the decoder), all, or a regex
    adain: bool = True  # match each image's queries and keys to the reference's statistics (StyleAligned)

    def __post_init__(self):
        super().__post_init__()
        if self.layers not in ("up", "all"):
            try:
                re.compile(self.layers)
            except re.error as error:
                raise InvalidArgumentError(f"layers={self.layers!r} is neither up, all nor a regular expression: "
                                           f"{error}.") from error


class _Shared:
    """What the processors of one attached injection share during a call."""

    def __init__(self, weight: float):
        self.weight = weight
        self.reference_row = False  # the batch's last row is the reference (image mode)
        self.inverting = False  # the UNet runs the reference's inversion
        # otherwise (shared-batch mode) the first row of each guidance half is the reference


def _adain(x, reference):
    """x's per-channel token statistics set to the reference's (both (rows, heads, tokens, dim))."""
    mean, std = x.mean(dim=-2, keepdim=True), x.std(dim=-2, keepdim=True) + 1e-5
    ref_mean, ref_std = reference.mean(dim=-2, keepdim=True), reference.std(dim=-2, keepdim=True) + 1e-5
    return (x - mean) / std * ref_std + ref_mean


class SharedAttentionProcessor:
    """Self-attention where every image also attends to the reference's keys and values (their logits
    raised by log(weight): 1 = plain shared attention, 0 = none). Written by hand: diffusers has no
    shared-attention processor (StyleAligned ships its own, for one pipeline)."""

    def __init__(self, state: _Shared, adain: bool):
        self.state, self.adain = state, adain

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        import math

        import torch
        import torch.nn.functional as F

        residual = hidden_states
        rows, tokens, _ = hidden_states.shape
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        heads = attn.heads
        split = lambda x: x.view(rows, -1, heads, x.shape[-1] // heads).transpose(1, 2)  # noqa: E731
        query, key, value = split(query), split(key), split(value)
        state = self.state
        if state.reference_row:
            refs = [rows - 1] * (rows - 1)
            targets = list(range(rows - 1))
        else:  # shared batch: the first image of each guidance half is the reference of that half
            half = rows // 2 if rows % 2 == 0 and rows > 2 else rows
            refs = [0 if i < half else half for i in range(rows)]
            targets = [i for i in range(rows) if i not in (0, half)]
        out = F.scaled_dot_product_attention(query, key, value)
        if targets and state.weight > 0:
            t, r = torch.tensor(targets), torch.tensor([refs[i] for i in targets])
            q, k = query[t], key[t]
            if self.adain:
                q, k = _adain(q, query[r]), _adain(k, key[r])
            keys = torch.cat([k, key[r]], dim=2)
            values = torch.cat([value[t], value[r]], dim=2)
            bias = torch.zeros(1, 1, 1, keys.shape[2], dtype=query.dtype, device=query.device)
            bias[..., tokens:] = math.log(state.weight)
            out = out.clone()
            out[t] = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias)
        hidden_states = out.transpose(1, 2).reshape(rows, -1, heads * out.shape[-1]).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@register("style_injection")
class StyleInjection(Adapter):
    """Training-free: `attach(backbone, weight, image=REFERENCE)` (the reference's keys and values, from its
    latent DDIM-inverted along the call's timesteps and run as an extra row of the batch) or `shared=True`
    (the first image of the batch is the reference: StyleAligned's shared batch). The file holds only the
    manifest."""

    config_class = StyleInjectionConfig
    weightless = True

    @classmethod
    def create(cls, backbone: Backbone, config: StyleInjectionConfig, *, seed: int = 0) -> StyleInjection:
        config.family, config.base = backbone.family.name, config.base or backbone.source
        return cls(config, {})

    def layer_names(self, backbone: Backbone) -> list[str]:
        pattern = {"up": r"^up_blocks\.", "all": r"."}.get(self.config.layers, self.config.layers)
        return [n for n in backbone.denoiser.attn_processors
                if n.endswith("attn1.processor") and re.search(pattern, n)]

    def check_backbone(self, backbone: Backbone) -> None:
        super().check_backbone(backbone)
        if backbone.family.arch != "unet":
            raise IncompatibleAdapterError(f"style injection on {backbone.family.title} is not supported yet: studio "
                                           f"injects into a UNet's self-attention (SD1.x/2.x, SDXL, world-sd).")
        if not self.layer_names(backbone):
            raise IncompatibleAdapterError(f"layers={self.config.layers!r} names no self-attention of {backbone.source!r}.")

    label = "style injection"

    def _entry(self, backbone: Backbone, weight: Any, inputs: dict[str, Any]) -> dict[str, Any]:
        """Inputs: `image` (the reference, a PIL image or path) or `shared=True`."""
        unknown = sorted(set(inputs) - {"image", "shared", "image_sha256"})
        if unknown:
            raise InvalidArgumentError(f"style injection takes image= or shared=True, not {unknown}.")
        if (inputs.get("image") is None) == (not inputs.get("shared")):
            raise InvalidArgumentError("style injection needs a reference: image=REFERENCE, or shared=True (the "
                                       "batch's first image is the reference), not both.")
        if attached_of(backbone, StyleInjection):
            raise InvalidArgumentError("a style injection is already attached; detach it first.")
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight < 0:
            raise InvalidArgumentError(f"a style injection's weight is one number >= 0 (e.g. 1); got {weight!r}.")
        entry: dict[str, Any] = {"weight": float(weight), "state": _Shared(float(weight)), "hooks": [],
                                 "record": {"shared": bool(inputs.get("shared"))}, "latent": None}
        if inputs.get("image") is not None:
            from studio.adapters.ip_adapter import open_reference

            image, reference = open_reference(inputs["image"], inputs.get("image_sha256"))
            entry["record"] = {"image": reference.get("path"), "image_sha256": reference.get("sha256")}
            entry["latent"] = _encode_reference(backbone, image)
        return entry

    def _apply(self, backbone: Backbone, entry: dict[str, Any]) -> None:
        import torch

        state, latent = entry["state"], entry["latent"]
        unet = backbone.denoiser
        if latent is not None:
            trajectory: dict[float, Any] = {}  # timestep -> the reference's DDIM-inverted latent there
            scheduler_config = backbone.pipe.scheduler.config

            def add_reference(module, args, kwargs):
                if state.inverting:
                    return None
                sample, timestep = (list(args) + [None, None])[:2]
                sample = kwargs.get("sample", sample)
                timestep = kwargs.get("timestep", timestep)
                t = float(torch.as_tensor(timestep).flatten()[0])
                if t not in trajectory:  # a new call (its first step): invert along this call's timesteps
                    trajectory.clear()
                    text = kwargs.get("encoder_hidden_states")
                    text = (text if text is not None else args[2])[:1]
                    state.inverting = True
                    try:
                        trajectory.update(_invert(module, latent.to(sample.dtype), backbone.pipe.scheduler.timesteps,
                                                  scheduler_config, text, kwargs.get("added_cond_kwargs")))
                    finally:
                        state.inverting = False
                state.reference_row = True
                return _with_row(args, kwargs, trajectory[t])

            def drop_reference(module, args, kwargs, output):
                if state.inverting or not state.reference_row:
                    return None
                state.reference_row = False
                if isinstance(output, tuple):
                    return (output[0][:-1], *output[1:])
                output.sample = output.sample[:-1]
                return output

            entry["hooks"] = [unet.register_forward_pre_hook(add_reference, with_kwargs=True),
                              unet.register_forward_hook(drop_reference, with_kwargs=True)]
        entry["originals"] = originals = dict(unet.attn_processors)
        names = self.layer_names(backbone)
        unet.set_attn_processor({n: SharedAttentionProcessor(state, self.config.adain) if n in names else p
                                 for n, p in originals.items()})

    def _remove(self, backbone: Backbone, entry: dict[str, Any]) -> None:
        for hook in entry["hooks"]:
            hook.remove()
        unet = backbone.denoiser
        current = unet.attn_processors
        unet.set_attn_processor({n: entry["originals"][n] if isinstance(p, SharedAttentionProcessor) else p
                                 for n, p in current.items()})

    def _reweight(self, backbone: Backbone, entry: dict[str, Any], weight: Any) -> float:
        entry["state"].weight = float(weight)
        return float(weight)

    def inputs_record(self, backbone: Backbone) -> dict[str, Any]:
        return dict(attachments(backbone).get(self.name, {}).get("record", {}))


def style_use(backbone: Backbone, image: Any, weight: float = 1.0) -> AdapterUse:
    """The request for a training-free style injection reading `image` at `weight` (`studio generate
    --style-image`, the Generate tab's style reference)."""
    from studio.recipe import AdapterUse

    injection = StyleInjection.create(backbone, StyleInjectionConfig(family=backbone.family.name, name="style-image"))
    return AdapterUse(injection, float(weight), {"image": image})


def _encode_reference(backbone: Backbone, image: Any):
    """The reference's VAE latent at the backbone's default size."""
    import torch

    from studio.images import encode_images, fit

    side = backbone.default_size
    with torch.no_grad():
        return encode_images(backbone, [fit(image, (side, side))]).to(backbone.device, backbone.dtype)


def _invert(unet: Any, latent: Any, timesteps: Any, scheduler_config: Any, text: Any, added: Any) -> dict[float, Any]:
    """DDIM inversion of the reference latent along `timesteps` (ascending, deterministic, no guidance):
    its latent at each of the call's timesteps, so the reference's keys and values at a noisy step still
    say what it shows (StyleAligned and StyleID invert their references the same way)."""
    import torch
    from diffusers import DDIMScheduler

    alphas = DDIMScheduler.from_config(scheduler_config).alphas_cumprod.to(latent)
    prediction = scheduler_config.get("prediction_type", "epsilon")
    added = {k: v[:1] if torch.is_tensor(v) else [e[:1] for e in v] for k, v in (added or {}).items()}
    z, out = latent, {}
    previous = None
    with torch.no_grad():
        for t in sorted(float(x) for x in torch.as_tensor(timesteps).flatten()):
            if previous is not None:
                a_prev, a = alphas[int(round(previous))], alphas[int(round(t))]
                model = unet(z, torch.tensor([previous], device=z.device), encoder_hidden_states=text,
                             added_cond_kwargs=added or None).sample
                if prediction == "v_prediction":
                    eps, x0 = a_prev.sqrt() * model + (1 - a_prev).sqrt() * z, a_prev.sqrt() * z - (1 - a_prev).sqrt() * model
                else:
                    eps, x0 = model, (z - (1 - a_prev).sqrt() * model) / a_prev.sqrt()
                z = a.sqrt() * x0 + (1 - a).sqrt() * eps
            else:
                a = alphas[int(round(t))]
                z = a.sqrt() * latent  # the first (least noisy) step from the clean latent, noise-free
            out[t] = z
            previous = t
    return out


def _with_row(args: tuple, kwargs: dict, reference: Any) -> tuple[tuple, dict]:
    """The UNet call's inputs with the reference appended as the last row (its text: the first row's,
    the unconditional one under guidance)."""
    import torch

    args = list(args)
    if args:
        args[0] = torch.cat([args[0], reference])
    else:
        kwargs["sample"] = torch.cat([kwargs["sample"], reference])
    if len(args) > 1 and torch.is_tensor(args[1]) and args[1].dim() == 1 and args[1].numel() > 1:
        args[1] = torch.cat([args[1], args[1][:1]])
    elif torch.is_tensor(kwargs.get("timestep")) and kwargs["timestep"].dim() == 1 and kwargs["timestep"].numel() > 1:
        kwargs["timestep"] = torch.cat([kwargs["timestep"], kwargs["timestep"][:1]])
    first = lambda x: torch.cat([x, x[:1]]) if torch.is_tensor(x) else [first(e) for e in x]  # noqa: E731
    if kwargs.get("encoder_hidden_states") is not None:
        kwargs["encoder_hidden_states"] = first(kwargs["encoder_hidden_states"])
    elif len(args) > 2:
        args[2] = first(args[2])
    added = kwargs.get("added_cond_kwargs")
    if added:
        kwargs["added_cond_kwargs"] = {k: first(v) for k, v in added.items()}
    return tuple(args), kwargs

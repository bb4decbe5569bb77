"""IP-Adapter (Ye et al. 2023, arXiv:2308.06721): an image prompt through decoupled cross-attention.

A reference image's CLIP image embedding is projected to `tokens` extra context tokens; every
cross-attention layer reads them through its own `to_k_ip` / `to_v_ip` beside the text, scaled by λ:
`Attn(Q, K_txt, V_txt) + λ·Attn(Q, K_ip c_img, V_ip c_img)`. Only the projection and `to_k_ip`/`to_v_ip`
train (initialised from the layer's own `to_k`/`to_v`), so the backbone stays as it was.

The tensors are kept in the official layout (`image_proj.proj.weight`, `image_proj.norm.*`,
`ip_adapter.<n>.to_k_ip.weight` with n = 1, 3, 5... the cross-attention processors in order), so a
studio file is also a file diffusers' `pipe.load_ip_adapter` reads, and published IP-Adapter files
(SD1.5 / SDXL, plain and plus) attach here. The attention processors, the projection and the per-block
scales are diffusers' own (`_load_ip_adapter_weights`, `set_ip_adapter_scale`): studio adds what they
lack: several adapters attached and detached one at a time, the image encoder of each kind of backbone
(world-clip for the shapes world), embeddings cached per reference, InstantStyle routing by name
(`routing="style"`) with content subtraction, masks, and training.

On SD3-class DiTs (SD3/3.5, world-dit) the layout is the one diffusers' `SD3IPAdapterMixin` reads
(InstantX/SD3.5-Large-IP-Adapter): a timestep-aware resampler (`image_proj.*`, diffusers'
`IPAdapterTimeImageProjection`) over the encoder's penultimate patch features, and per joint-attention
layer `ip_adapter.<i>.{norm_ip, to_k_ip, to_v_ip, norm_q, norm_k, norm_ip_k}` (diffusers'
`SD3IPAdapterJointAttnProcessor2_0`): the image tokens join the image stream's keys and values. diffusers
runs one such adapter at a time there and has no per-block scale, masks or content subtraction on it;
studio sets a scale per transformer block (InstantStyle routing) and refuses the other two clearly.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.adapters.base import (
    Adapter,
    AdapterConfig,
    AdapterFileError,
    IncompatibleAdapterError,
    Trainable,
    attached_of,
    check_family,
    option,
    register,
)

from studio.errors import InvalidArgumentError
from studio.limits import open_image

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from studio.backbones import Backbone
    from studio.recipe import AdapterUse

# InstantStyle (Wang et al. 2024, arXiv:2404.02733) block routing, as diffusers' `set_ip_adapter_scale`
# reads it: which cross-attention layers receive the image tokens. SDXL's are the paper's; SD1.5's style
# block is the one its code marks experimental; world-sd's were found by the layer sweep of
# bench/image_prompt.py (README, Image prompts and style): the 8x8 decoder block carries the background,
# the 4x4 encoder block the position, as InstantStyle found for SDXL's.
ROUTES: dict[str, dict[str, Any]] = {
    "sdxl": {"style": {"up": {"block_0": [0.0, 1.0, 0.0]}}, "layout": {"down": {"block_2": [0.0, 1.0]}}},
    "sd1": {"style": {"up": {"block_1": [0.0, 1.0, 0.0]}}, "layout": {"down": {"block_2": [0.0, 1.0]}}},
    "world-sd": {"style": {"up": {"block_1": [1.0, 1.0, 1.0]}}, "layout": {"down": {"block_2": [1.0, 1.0]}}},
    # a DiT routes by transformer block, {block index: scale}; world-dit's from bench/image_prompt.py
    # --backbone world-dit --sweep: blocks 2 and 5 carry the background with the least shape leak, and no
    # block alone moves the position, so world-dit has no layout route
    "world-dit": {"style": {2: 1.0, 5: 1.0}},
}
ROUTINGS = ("all", "style", "layout", "style+layout")
# DiT families whose IP-Adapter is diffusers' SD3 kind (joint attention, timestep-aware resampler)
JOINT_FAMILIES = ("sd3",)
DEFAULT_TOKENS = {"unet": 4, "joint": 16}  # image tokens: the plain IP-Adapter's 4; a resampler's queries on SD3


class IpAdapterError(AdapterFileError):
    """An IP-Adapter file or input that cannot be used as it is."""


@dataclass(kw_only=True)
class IpAdapterConfig(AdapterConfig):
    # image tokens per reference; 0 = the backbone's default (a plain UNet IP-Adapter has 4, which is what
    # diffusers' loader reads; an SD3-class DiT's resampler 16 queries)
    tokens: int = 0
    plus: bool = False  # the "plus" kind: a resampler over the encoder's patch features (published files)
    # "" = the backbone's own default (world-clip for the shapes world)
    image_encoder: str = option("", "the CLIP image encoder it reads (folder or hub id) [default: the backbone's, "
                                    "world-clip].")
    # training (METHODS.md, IP-Adapter): each example drops its text, its image or both with these odds
    text_dropout: float = 0.05
    image_dropout: float = 0.05
    both_dropout: float = 0.05
    source_format: str = "studio"  # studio | official

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.tokens, int) or isinstance(self.tokens, bool) or self.tokens < 0:
            raise InvalidArgumentError(f"tokens={self.tokens!r} must be an integer >= 1 (plain IP-Adapter: 4), or 0 "
                                       f"for the backbone's default.")
        drops = (self.text_dropout, self.image_dropout, self.both_dropout)
        if not all(0 <= p < 1 for p in drops) or sum(drops) >= 1:
            raise InvalidArgumentError(f"text/image/both dropout {drops} must each be in [0, 1) and sum below 1.")


def cross_attention_names(unet: Any) -> list[str]:
    """The UNet's cross-attention processors, in the order the official `ip_adapter.<n>` keys count them."""
    return [name for name in unet.attn_processors if not name.endswith("attn1.processor")
            and "motion_modules" not in name]


def official_key_ids(unet: Any) -> dict[str, int]:
    """processor name -> n of `ip_adapter.<n>.to_k_ip.weight` (1, 3, 5...: the count runs over every
    attention processor, self-attention included, as the official checkpoints were written)."""
    return {name: 2 * i + 1 for i, name in enumerate(cross_attention_names(unet))}


def joint(backbone: Backbone) -> bool:
    """An SD3-class DiT: image tokens enter the joint attention through diffusers' SD3 IP-Adapter kind."""
    return backbone.family.name in JOINT_FAMILIES


def joint_key_ids(transformer: Any) -> dict[str, int]:
    """processor name -> i of `ip_adapter.<i>.*`: every attention processor in order, as diffusers counts them."""
    names = [name for name in transformer.attn_processors if name.startswith("transformer_blocks.")]
    return {name: i for i, name in enumerate(names)}  # (not the resampler's own attention, once it is installed)


def _block_of(processor_name: str) -> int:
    return int(processor_name.split(".")[1])  # transformer_blocks.<i>.attn(2).processor


def _attention(unet: Any, processor_name: str) -> Any:
    return unet.get_submodule(processor_name.removesuffix(".processor"))


def split_official(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The flat file's tensors as diffusers' loader takes them: {"image_proj": {...}, "ip_adapter": {...}}."""
    parts: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in tensors.items():
        head, _, rest = key.partition(".")
        if head in parts:
            parts[head][rest] = value
    return parts


def is_ip_adapter_file(tensors: dict[str, Any]) -> bool:
    return any(k.startswith("image_proj.") for k in tensors) and any(k.startswith("ip_adapter.") for k in tensors)


@register("ip_adapter")
class IpAdapter(Adapter, Trainable):
    """An image prompt: attach with `image=` (or `images=[...]`), `routing=`, `mask=`; weight is λ."""

    config_class = IpAdapterConfig
    example_inputs = ("image_embeds",)

    # ------------------------------------------------------------------------------- making one

    @classmethod
    def create(cls, backbone: Backbone, config: IpAdapterConfig, *, seed: int = 0) -> IpAdapter:
        """A new adapter for `backbone`: a seeded projection, `to_k_ip`/`to_v_ip` copied from each layer's
        `to_k`/`to_v` (the paper's initialisation: at the start the image tokens are read like text)."""
        import torch

        _check_family(backbone, config.family)
        if not config.tokens:
            config = replace(config, tokens=DEFAULT_TOKENS["joint" if joint(backbone) else "unet"])
        if joint(backbone):
            return cls(config, _create_joint(backbone, config, seed))
        unet = backbone.denoiser
        encoder = image_encoder(backbone, config.image_encoder)
        generator = torch.Generator().manual_seed(seed)
        width, dim = int(encoder.config.projection_dim), int(unet.config.cross_attention_dim)
        proj = torch.nn.Linear(width, config.tokens * dim)
        with torch.no_grad():
            bound = 1 / width**0.5  # torch's own Linear init, drawn from the run's seed
            proj.weight.uniform_(-bound, bound, generator=generator)
            proj.bias.uniform_(-bound, bound, generator=generator)
        tensors = {"image_proj.proj.weight": proj.weight.detach().clone(),
                   "image_proj.proj.bias": proj.bias.detach().clone(),
                   "image_proj.norm.weight": torch.ones(dim), "image_proj.norm.bias": torch.zeros(dim)}
        for name, n in official_key_ids(unet).items():
            attention = _attention(unet, name)
            tensors[f"ip_adapter.{n}.to_k_ip.weight"] = attention.to_k.weight.detach().float().clone()
            tensors[f"ip_adapter.{n}.to_v_ip.weight"] = attention.to_v.weight.detach().float().clone()
        return cls(config, tensors)

    reads = 50  # published IP-Adapter files (h94/IP-Adapter layout)

    @classmethod
    def read_foreign(cls, path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                     backbone: Backbone, *, allow_partial: bool = False) -> IpAdapter | None:
        return cls.from_official(tensors, backbone, source=path.name) if is_ip_adapter_file(tensors) else None

    @classmethod
    def from_official(cls, tensors: dict[str, torch.Tensor], backbone: Backbone, *, source: str = "",
                      image_encoder: str = "") -> IpAdapter:
        """A published IP-Adapter file (h94/IP-Adapter layout, no studio manifest) for this backbone."""
        plus = "image_proj.latents" in tensors
        if joint(backbone) and not (plus and "ip_adapter.0.to_k_ip.weight" in tensors):
            raise IpAdapterError(f"{source or 'the IP-Adapter file'} is not an SD3 IP-Adapter (it needs "
                                 f"image_proj.latents and ip_adapter.0.to_k_ip.weight, the layout of "
                                 f"InstantX/SD3.5-Large-IP-Adapter); use the IP-Adapter made for "
                                 f"{backbone.family.title}.")
        if plus:
            tokens = int(tensors["image_proj.latents"].shape[1])
        elif "image_proj.proj.weight" in tensors:
            tokens = 4
        else:
            raise IpAdapterError(f"{source or 'the IP-Adapter file'} has neither image_proj.proj.weight (plain) nor "
                                 f"image_proj.latents (plus): it is another kind of image adapter (FaceID / full) "
                                 f"that studio does not attach yet.")
        config = IpAdapterConfig(family=backbone.family.name, base=source, name=Path(source).stem if source else "",
                                 tokens=tokens, plus=plus, image_encoder=image_encoder, source_format="official")
        adapter = cls(config, tensors)
        adapter.check_backbone(backbone)
        return adapter

    # ------------------------------------------------------------------------------- the backbone

    def check_backbone(self, backbone: Backbone) -> None:
        """Refuse another family, a DiT that is not SD3-class, missing keys or shapes that do not fit, before
        anything changes."""
        _check_family(backbone, self.config.family, self.name)
        super().check_backbone(backbone)
        if joint(backbone):
            return self._check_joint(backbone)
        unet = backbone.denoiser
        ids = official_key_ids(unet)
        wanted = {f"ip_adapter.{n}.{part}.weight" for n in ids.values() for part in ("to_k_ip", "to_v_ip")}
        wanted |= {"image_proj.latents"} if self.config.plus else {"image_proj.proj.weight", "image_proj.norm.weight"}
        self._refuse_missing(backbone, wanted, "a UNet with other cross-attention layers")
        extra = sorted(k for k in self.tensors if k.startswith("ip_adapter.") and k not in wanted)
        if extra:
            raise IncompatibleAdapterError(
                f"IP-Adapter {self.name!r} has {len(extra)} layers that {backbone.source!r} does not (e.g. {extra[0]}): "
                f"it was made for a larger UNet (another family); use the IP-Adapter made for {backbone.family.name}.")
        for name, n in ids.items():
            expected = tuple(_attention(unet, name).to_k.weight.shape)
            found = tuple(self.tensors[f"ip_adapter.{n}.to_k_ip.weight"].shape)
            if found != expected:
                raise IncompatibleAdapterError(
                    f"IP-Adapter {self.name!r}: {name.removesuffix('.processor')} needs to_k_ip of shape {expected}, the "
                    f"file has {found}: it was made for another family; use the IP-Adapter made for "
                    f"{backbone.family.name}.")

    def _refuse_missing(self, backbone: Backbone, wanted: set[str], other: str) -> None:
        missing = sorted(wanted - set(self.tensors), key=_natural)
        if missing:
            raise IpAdapterError(
                f"IP-Adapter {self.name!r} lacks {len(missing)} of the {len(wanted)} tensors {backbone.source!r} needs "
                f"(e.g. {', '.join(missing[:3])}): the file is incomplete, or it was made for {other}; download it "
                f"again or use the IP-Adapter made for this backbone.")

    def _check_joint(self, backbone: Backbone) -> None:
        transformer = backbone.denoiser
        parts = ("norm_ip.linear.weight", "to_k_ip.weight", "to_v_ip.weight", "norm_q.weight", "norm_k.weight",
                 "norm_ip_k.weight")
        wanted = {f"ip_adapter.{i}.{part}" for i in joint_key_ids(transformer).values() for part in parts}
        wanted |= {"image_proj.latents", "image_proj.proj_in.weight", "image_proj.proj_out.weight"}
        self._refuse_missing(backbone, wanted, "a transformer with other attention layers")
        extra = sorted({k.split(".")[1] for k in self.tensors if k.startswith("ip_adapter.")}
                       - {str(i) for i in joint_key_ids(transformer).values()}, key=int)
        width = transformer.config.attention_head_dim * transformer.config.num_attention_heads
        found = tuple(self.tensors["ip_adapter.0.to_k_ip.weight"].shape)
        if extra or found != (width, width):
            raise IncompatibleAdapterError(
                f"IP-Adapter {self.name!r} was made for another transformer ({len(extra)} extra layers, to_k_ip "
                f"{found} where {backbone.source!r} has ({width}, {width})); use the IP-Adapter made for this backbone.")

    label = "IP-Adapter"

    def _entry(self, backbone: Backbone, weight: Any, inputs: dict[str, Any]) -> dict[str, Any]:
        """Attach at scale `weight` (λ; a number). Inputs: `image` or `images` (PIL images or paths: the
        image prompt, several are read together), `routing` ("all", "style", "layout", "style+layout" or a
        diffusers scale dict), `mask` (a black/white image: where the image prompt applies), `content`
        (words naming the reference's content, subtracted from its embedding: InstantStyle) and
        `content_scale` (how much, default 0.5). Without images it attaches for training."""
        if not isinstance(weight, (int, float)) or isinstance(weight, bool):
            raise InvalidArgumentError(f"an IP-Adapter's weight is its scale λ, one number (e.g. 0.6); got {weight!r}. "
                                       f"Route it to blocks with routing='style' instead.")
        unknown = sorted(set(inputs) - {"image", "images", "routing", "mask", "content", "content_scale",
                                        "image_encoder", "image_sha256"})
        if unknown:
            raise InvalidArgumentError(f"IP-Adapter inputs {unknown} are not known; use image/images, routing, mask, "
                                       f"content, content_scale, image_encoder.")
        if joint(backbone):
            _check_joint_inputs(backbone, attached(backbone), inputs)
        routing = inputs.get("routing") or "all"
        scale_config(backbone, routing, float(weight))  # checked before anything changes
        images = inputs.get("images") or ([inputs["image"]] if inputs.get("image") is not None else [])
        encoder_name = inputs.get("image_encoder") or self.config.image_encoder
        install_encoder(backbone, encoder_name)
        entry = {"weight": float(weight), "routing": routing, "mask": inputs.get("mask"), "embeds": None,
                 "references": [], "content": inputs.get("content") or "",
                 "content_scale": float(inputs.get("content_scale", 0.5))}
        if images:
            entry["embeds"], entry["references"] = reference_embeds(
                backbone, images, plus=self.config.plus, content=entry["content"], content_scale=entry["content_scale"],
                encoder_name=encoder_name, sha256=inputs.get("image_sha256"))
        return entry

    def _apply(self, backbone: Backbone, entry: dict[str, Any]) -> None:
        _rebuild(backbone)

    def _remove(self, backbone: Backbone, entry: dict[str, Any]) -> None:
        _rebuild(backbone)

    def _reweight(self, backbone: Backbone, entry: dict[str, Any], weight: Any) -> float:
        scale_config(backbone, entry["routing"], float(weight))
        entry["weight"] = float(weight)
        _set_scales(backbone)
        return entry["weight"]

    def inputs_record(self, backbone: Backbone) -> dict[str, Any]:
        """The run-time inputs as the recipe keeps them: `attach(**record)` attaches the same way again
        (references by path, with their sha256 to check they did not change)."""
        entry = attached(backbone).get(self.name, {})
        record = {"images": [r.get("path") for r in entry.get("references", [])],
                  "image_sha256": [r.get("sha256") for r in entry.get("references", [])],
                  "routing": entry.get("routing", "all")}
        if entry.get("content"):
            record.update(content=entry["content"], content_scale=entry["content_scale"])
        return record

    # ------------------------------------------------------------------------------- training

    def _layers(self, backbone: Backbone) -> tuple[Any, dict[str, Any]]:
        if joint(backbone):  # one adapter: the resampler and each layer's whole processor
            transformer = backbone.denoiser
            return transformer.image_proj, {name: transformer.attn_processors[name]
                                            for name in joint_key_ids(transformer)}
        unet = backbone.denoiser
        index = list(attached(backbone)).index(self.name)
        projection = unet.encoder_hid_proj.image_projection_layers[index]
        processors = {name: unet.attn_processors[name] for name in cross_attention_names(unet)}
        return projection, {name: (p.to_k_ip[index], p.to_v_ip[index]) for name, p in processors.items()}

    def trainable_parameters(self, backbone: Backbone) -> dict[str, list[torch.nn.Parameter]]:
        params = list(self._live(backbone).values())
        for p in params:
            p.requires_grad_(True)
        return {"ip_adapter": params}

    def _live(self, backbone: Backbone) -> dict[str, torch.Tensor]:
        """The attached layers' parameters by the file's (official) names."""
        projection, layers = self._layers(backbone)
        live = {f"image_proj.{_official_proj_key(k)}": v for k, v in projection.state_dict(keep_vars=True).items()}
        if joint(backbone):
            ids = joint_key_ids(backbone.denoiser)
            for name, processor in layers.items():
                live |= {f"ip_adapter.{ids[name]}.{k}": v for k, v in processor.state_dict(keep_vars=True).items()}
            return live
        ids = official_key_ids(backbone.denoiser)
        for name, (k, v) in layers.items():
            live[f"ip_adapter.{ids[name]}.to_k_ip.weight"] = k.weight
            live[f"ip_adapter.{ids[name]}.to_v_ip.weight"] = v.weight
        return live

    def sync_from(self, backbone: Backbone) -> None:
        """The live layers' values back into the file's tensors (official names)."""
        self.tensors = {k: v.detach().float().cpu().clone() for k, v in self._live(backbone).items()}

    def load_values(self, backbone: Backbone, tensors: dict[str, torch.Tensor]) -> None:
        """Values into the live layers in place (a resumed run's optimizer holds those very parameters)."""
        import torch

        with torch.no_grad():
            for key, value in self._live(backbone).items():
                value.copy_(tensors[key])
        self.tensors = dict(tensors)

    def embed_images(self, backbone: Backbone, images: list[Image.Image]) -> torch.Tensor:
        """(n, D) image embeddings of training images, as the pipeline computes them for a reference
        ((n, patches, D) features on an SD3-class DiT)."""
        import torch

        with torch.no_grad():
            if joint(backbone):
                return backbone.pipe.encode_image(images, backbone.device).float().cpu()
            embeds, _ = backbone.pipe.encode_image(images, backbone.device, 1, self.config.plus)
        return embeds.float().cpu()

    def drop(self, rng: Any, embeds: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, list[str]]:
        """The paper's training dropout per example: no text, no image (zeros) or neither."""
        embeds = embeds.clone()
        captions = list(captions)
        c = self.config
        for i in range(len(captions)):
            u = rng.random()
            if u < c.text_dropout:
                captions[i] = ""
            elif u < c.text_dropout + c.image_dropout:
                embeds[i] = 0
            elif u < c.text_dropout + c.image_dropout + c.both_dropout:
                captions[i], embeds[i] = "", 0
        return embeds, captions

    # ------------------------------------------------------------------------------- generation

    @classmethod
    def call_arguments(cls, backbone: Backbone, guidance: float) -> dict[str, Any]:
        """The pipeline call's `ip_adapter_image_embeds` (and masks) for every attached IP-Adapter."""
        stack = attached(backbone)
        if not stack:
            return {}
        missing = [name for name, e in stack.items() if e["embeds"] is None]
        if missing:
            raise InvalidArgumentError(f"IP-Adapter {missing[0]!r} is attached without a reference image; attach it "
                                       f"with image=... (--ip-image) or detach it.")
        cfg = guidance > 1
        embeds = [e["embeds"] if cfg else e["embeds"].chunk(2)[1] for e in stack.values()]
        if joint(backbone):  # one adapter: one tensor, [negative, positive] along the batch
            return {"ip_adapter_image_embeds": embeds[0].to(backbone.device, backbone.dtype)}
        arguments: dict[str, Any] = {"ip_adapter_image_embeds": [x.to(backbone.device, backbone.dtype) for x in embeds]}
        if any(e["mask"] is not None for e in stack.values()):
            arguments["cross_attention_kwargs"] = {"ip_adapter_masks": [
                _mask_tensor(backbone, e["mask"], e["embeds"].shape[1]) for e in stack.values()]}
        return arguments


# ---------------------------------------------------------------------------------- helpers


def _natural(key: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _official_proj_key(key: str) -> str:
    """diffusers' ImageProjection names -> the official file's (`image_embeds` -> `proj`)."""
    return key.replace("image_embeds.", "proj.")


def _check_family(backbone: Backbone, family: str, name: str = "") -> None:
    check_family(backbone, family, f"IP-Adapter {name!r}" if name else "an IP-Adapter")
    if backbone.family.arch != "unet" and not joint(backbone):
        raise IncompatibleAdapterError(
            f"IP-Adapter on {backbone.family.title} ({backbone.source!r}) is not supported yet: studio attaches and "
            f"trains IP-Adapters on UNet backbones (SD1.x/2.x, SDXL, world-sd) and SD3-class DiTs (SD3/3.5, "
            f"world-dit).")


def _check_joint_inputs(backbone: Backbone, stack: dict[str, Any], inputs: dict[str, Any]) -> None:
    """What diffusers' SD3 IP-Adapter cannot take, refused before anything changes."""
    if stack:
        raise InvalidArgumentError(
            f"{backbone.family.title} runs one IP-Adapter at a time ({next(iter(stack))!r} is attached): detach it "
            f"first, or give this one several reference images (images=[...]).")
    for name, why in (("mask", "masks"), ("content", "content subtraction (it needs global image embeddings)")):
        if inputs.get(name):
            raise InvalidArgumentError(f"{why} work on UNet IP-Adapters only; {backbone.family.title}'s reads patch "
                                       f"features. Route it with routing='style' instead, without {name}=.")


def _create_joint(backbone: Backbone, config: IpAdapterConfig, seed: int) -> dict[str, torch.Tensor]:
    """A new SD3 IP-Adapter: diffusers' resampler with a seeded init, and per attention layer its processor
    with `to_k_ip`/`to_v_ip` copied from the layer's `to_k`/`to_v` and the image-norm modulation zero (a plain
    layer norm at the start)."""
    import torch
    from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
    from diffusers.models.embeddings import IPAdapterTimeImageProjection

    transformer = backbone.denoiser
    encoder = image_encoder(backbone, config.image_encoder)
    head, heads = transformer.config.attention_head_dim, transformer.config.num_attention_heads
    width = head * heads
    hidden = 64 * max(1, round(width / 64))  # diffusers' loader reads the resampler's heads as width / 64
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projection = IPAdapterTimeImageProjection(embed_dim=int(encoder.config.hidden_size), output_dim=width,
                                                  hidden_dim=hidden, heads=hidden // 64, num_queries=config.tokens)
        tensors = {f"image_proj.{k}": v.detach().float().clone() for k, v in projection.state_dict().items()}
        for name, i in joint_key_ids(transformer).items():
            processor = SD3IPAdapterJointAttnProcessor2_0(hidden_size=width, ip_hidden_states_dim=width, head_dim=head,
                                                          timesteps_emb_dim=hidden)
            attention = _attention(transformer, name)
            with torch.no_grad():
                processor.to_k_ip.weight.copy_(attention.to_k.weight)
                processor.to_v_ip.weight.copy_(attention.to_v.weight)
                processor.norm_ip.linear.weight.zero_()
                processor.norm_ip.linear.bias.zero_()
            tensors |= {f"ip_adapter.{i}.{k}": v.detach().float().clone() for k, v in processor.state_dict().items()}
    return tensors


def attached(backbone: Backbone) -> dict[str, dict[str, Any]]:
    """The IP-Adapters on this backbone (their rows of the attachments table), in attach order (their order in
    diffusers' processor lists)."""
    return attached_of(backbone, IpAdapter)


def _rebuild(backbone: Backbone) -> None:
    """Install diffusers' IP-Adapter processors and projections for exactly the attached adapters (or
    the plain processors when none is left)."""
    import torch

    pipe, unet = backbone.pipe, backbone.denoiser
    stack = attached(backbone)
    if not stack:
        if getattr(unet, "encoder_hid_proj", None) is not None or getattr(unet, "image_proj", None) is not None:
            pipe.unload_ip_adapter()  # the processors and the pipeline as they were before the first attach
        return
    state_dicts = [split_official({k: v.to(backbone.dtype) for k, v in e["adapter"].tensors.items()})
                   for e in stack.values()]
    with torch.no_grad():  # diffusers' SD3 loader takes the one adapter's dict, the UNet's a list of them
        unet._load_ip_adapter_weights(state_dicts[0] if joint(backbone) else state_dicts, low_cpu_mem_usage=False)
    unet.to(backbone.device)
    _set_scales(backbone)


def _set_scales(backbone: Backbone) -> None:
    stack = attached(backbone)
    if stack and joint(backbone):  # diffusers' SD3 setter takes one number: studio scales each block's processor
        entry = next(iter(stack.values()))
        scales = scale_config(backbone, entry["routing"], entry["weight"])
        processors = backbone.denoiser.attn_processors
        for name in joint_key_ids(backbone.denoiser):
            processors[name].scale = scales[_block_of(name)]
    elif stack:
        backbone.pipe.set_ip_adapter_scale([scale_config(backbone, e["routing"], e["weight"]) for e in stack.values()])


def scale_config(backbone: Backbone, routing: Any, weight: float) -> float | dict[str, Any]:
    """diffusers' per-block scale for a routing name (InstantStyle) at λ = `weight`; on an SD3-class DiT
    a list with one scale per transformer block (a routing dict there is {block index: scale})."""
    if joint(backbone):
        return _joint_scales(backbone, routing, weight)
    if isinstance(routing, dict):
        return _times(routing, weight)
    if routing not in ROUTINGS:
        raise InvalidArgumentError(f"routing={routing!r}; choose one of {', '.join(ROUTINGS)} or give a diffusers "
                                   f"scale dict such as {{'up': {{'block_0': [0.0, 1.0, 0.0]}}}}.")
    if routing == "all":
        return weight
    routes = ROUTES.get(backbone.source) or ROUTES.get(backbone.family.name)
    if routes is None:
        raise InvalidArgumentError(f"routing={routing!r}: studio knows no style/layout blocks for "
                                   f"{backbone.family.title}; give a scale dict naming the blocks.")
    merged: dict[str, Any] = {}
    for part in routing.split("+"):
        for group, blocks in routes[part].items():
            merged.setdefault(group, {}).update(blocks)
    return _times(merged, weight)


def _joint_scales(backbone: Backbone, routing: Any, weight: float) -> list[float]:
    count = backbone.denoiser.config.num_layers
    if routing == "all":
        return [weight] * count
    if isinstance(routing, str) and routing in ROUTINGS:
        routes = ROUTES.get(backbone.source, {})
        unknown = [part for part in routing.split("+") if part not in routes]
        if unknown:
            raise InvalidArgumentError(f"routing={routing!r}: studio knows no {unknown[0]} blocks for "
                                       f"{backbone.source!r}; give a dict {{block index: scale}}, e.g. {{3: 1.0}}.")
        routing = {k: v for part in routing.split("+") for k, v in routes[part].items()}
    if not isinstance(routing, dict) or not all(isinstance(k, int) and 0 <= k < count for k in routing):
        raise InvalidArgumentError(f"routing={routing!r}: on {backbone.family.title} choose one of "
                                   f"{', '.join(ROUTINGS)} or give {{block index: scale}} with indices 0-{count - 1}.")
    return [float(routing.get(i, 0.0)) * weight for i in range(count)]


def _times(config: Any, weight: float) -> Any:
    if isinstance(config, dict):
        return {k: _times(v, weight) for k, v in config.items()}
    if isinstance(config, list):
        return [_times(v, weight) for v in config]
    return float(config) * weight


def encoder_folder(backbone: Backbone, name: str = "") -> str:
    """Where the image encoder comes from: `name`, or the one the backbone ships (the world's: world-clip)."""
    from studio.embedded import ships

    own = ships(backbone.source, "image_encoder")
    name = name or (str(own) if own else "")
    if not name:
        raise IpAdapterError(
            f"an IP-Adapter on {backbone.source!r} needs its CLIP image encoder: pass image_encoder=<folder or hub id> "
            f"(--ip-encoder), e.g. the image_encoder folder published beside the IP-Adapter weights "
            f"(h94/IP-Adapter: models/image_encoder for SD1.5, sdxl_models/image_encoder for SDXL).")
    return name


def image_encoder(backbone: Backbone, name: str = "") -> Any:
    """The CLIP (or SigLIP, SD3.5's) vision model, loaded once per backbone and source, offline for the
    shapes world."""
    from transformers import AutoConfig, CLIPVisionModelWithProjection, SiglipVisionModel

    source = encoder_folder(backbone, name)
    cache = backbone.__dict__.setdefault("_image_encoders", {})
    if source not in cache:
        parts = source.split("/")
        # a hub repo's subfolder ("h94/IP-Adapter/models/image_encoder"): where IP-Adapter repos keep the encoder
        where = (dict(pretrained_model_name_or_path="/".join(parts[:2]), subfolder="/".join(parts[2:]))
                 if len(parts) > 2 and not Path(source).exists() else dict(pretrained_model_name_or_path=source))
        siglip = "siglip" in AutoConfig.from_pretrained(**where).model_type
        model = (SiglipVisionModel if siglip else CLIPVisionModelWithProjection).from_pretrained(**where)
        cache[source] = model.to(backbone.device, backbone.dtype).eval()
    return cache[source]


def install_encoder(backbone: Backbone, name: str = "") -> None:
    """Put the image encoder and its preprocessing on the pipeline (what `encode_image` uses): the
    encoder folder's own `preprocessor_config.json`, else diffusers' default for its image size."""
    from transformers import AutoImageProcessor, CLIPImageProcessor

    encoder = image_encoder(backbone, name)
    if backbone.pipe.image_encoder is encoder:
        return
    source = Path(encoder_folder(backbone, name))
    if (source / "preprocessor_config.json").is_file():
        extractor = AutoImageProcessor.from_pretrained(source)
    else:
        size = encoder.config.image_size
        extractor = CLIPImageProcessor(size=size, crop_size=size)
    backbone.pipe.register_modules(image_encoder=encoder, feature_extractor=extractor)


def open_reference(image: Any, sha256: str | None = None) -> tuple[Image.Image, dict[str, Any]]:
    """A reference image as RGB (alpha composited on white, greyscale and palettes converted), with what the
    recipe records of it; a path that is missing or not an image gets an error naming it, and one whose
    content is not `sha256` (the recipe's) says so."""
    import io

    from PIL import Image, UnidentifiedImageError

    record: dict[str, Any] = {}
    if isinstance(image, (str, Path)):
        path = Path(image)
        try:
            data = path.read_bytes()
            with open_image(io.BytesIO(data), path) as opened:
                opened.load()
                image = opened.copy()
        except FileNotFoundError as error:
            raise InvalidArgumentError(f"reference image {str(path)!r} does not exist.") from error
        except (UnidentifiedImageError, OSError) as error:
            raise InvalidArgumentError(f"reference image {str(path)!r} is not a readable image ({error}); "
                                       f"use a PNG, JPEG or WebP file.") from error
        record = {"path": str(path.resolve()), "sha256": hashlib.sha256(data).hexdigest()}
    if sha256 and record.get("sha256") != sha256:
        raise InvalidArgumentError(f"the reference image {record.get('path', '(not a file)')!r} changed: its bytes are "
                                   f"not the ones the recipe was made with (sha256 differs); put that file back to "
                                   f"remake the image.")
    if not isinstance(image, Image.Image):
        raise InvalidArgumentError(f"a reference image must be a PIL image or a file path, got {type(image).__name__}.")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    image = image.convert("RGB")
    if max(image.size) > 1024:  # the encoder reads a few hundred pixels: shrink huge files first (memory)
        image.thumbnail((1024, 1024), Image.Resampling.LANCZOS)
    return image, record


def reference_embeds(backbone: Backbone, images: list[Any], *, plus: bool, content: str = "",
                     content_scale: float = 0.5, encoder_name: str = "",
                     sha256: list[str] | None = None) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """(2, k, D): the unconditional and the reference embeddings of k images, as diffusers'
    `prepare_ip_adapter_image_embeds` makes them, cached per image; `content` words are subtracted
    (InstantStyle: `img_emb - s * text_emb(content)`); `sha256`: the recipe's hash of each image."""
    import torch

    opened = [open_reference(image, wanted) for image, wanted in zip(images, sha256 or [None] * len(images),
                                                                       strict=True)]
    cache = backbone.__dict__.setdefault("_reference_embeds", {})
    key = (encoder_name, plus, tuple(hashlib.sha256(im.tobytes()).hexdigest() + str(im.size) for im, _ in opened))
    if key not in cache:
        with torch.no_grad():
            if joint(backbone):  # several images: their patch features side by side, zeros unconditional (diffusers')
                positive = backbone.pipe.encode_image([im for im, _ in opened], backbone.device).flatten(0, 1)[None]
                cache[key] = torch.cat([torch.zeros_like(positive), positive])
            else:
                positive, negative = backbone.pipe.encode_image([im for im, _ in opened], backbone.device, 1, plus)
                cache[key] = torch.stack([negative, positive])
    embeds = cache[key].clone()
    if content:
        if plus:
            raise InvalidArgumentError("content subtraction works on global image embeddings (plain IP-Adapter), "
                                       "not on a plus adapter's patch features.")
        embeds[1] = embeds[1] - content_scale * content_embedding(backbone, content, encoder_name).to(embeds)
    return embeds, [record for _, record in opened]


def content_embedding(backbone: Backbone, words: str, encoder_name: str = "") -> torch.Tensor:
    """The CLIP text embedding of `words` in the image encoder's space (its text tower: world-clip/text)."""
    import torch
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    folder = Path(encoder_folder(backbone, encoder_name)) / "text"
    if not (folder / "config.json").is_file():
        raise InvalidArgumentError(f"content subtraction needs the text tower of the image encoder in {str(folder)!r} "
                                   f"(a CLIPTextModelWithProjection and its tokenizer); it is not there.")
    cache = backbone.__dict__.setdefault("_content_towers", {})
    if str(folder) not in cache:
        cache[str(folder)] = (AutoTokenizer.from_pretrained(folder), CLIPTextModelWithProjection.from_pretrained(folder).eval())
    tokenizer, tower = cache[str(folder)]
    ids = tokenizer([words], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt")
    with torch.no_grad():
        return tower(input_ids=ids.input_ids).text_embeds[0]


def _mask_tensor(backbone: Backbone, mask: Any, count: int) -> torch.Tensor:
    """A mask image as diffusers' `IPAdapterMaskProcessor` makes it, (1, count, H, W): 1 where the image prompt applies."""
    import torch
    from diffusers.image_processor import IPAdapterMaskProcessor

    if mask is None:
        side = backbone.default_size
        return torch.ones(1, count, side, side)
    image, _ = open_reference(mask)
    tensor = IPAdapterMaskProcessor().preprocess([image.convert("L")], height=image.size[1], width=image.size[0])
    return tensor.reshape(1, 1, *tensor.shape[-2:]).repeat(1, count, 1, 1)


def image_prompt_use(backbone: Backbone, images: list[Any], scale: float = 1.0, *, routing: str = "all",
                     content: str = "", adapter: str | Path | None = None, encoder: str | None = None) -> AdapterUse:
    """The request for an image prompt: `adapter` (default: the backbone's own IP-Adapter) reading `images` at
    `scale`, routed to `routing`, with `content` words subtracted (`studio generate --ip-image`, the Generate
    tab's image prompt)."""
    from studio.recipe import AdapterUse

    inputs: dict[str, Any] = {"images": list(images), "routing": routing or "all", "content": (content or "").strip()}
    if encoder:
        inputs["image_encoder"] = encoder
    return AdapterUse(str(adapter or default_ip_adapter(backbone)), float(scale), inputs)


def default_ip_adapter(backbone: Backbone) -> Path:
    """The backbone's own IP-Adapter file (world-sd ships one); others must name theirs."""
    from studio.embedded import ships

    own = ships(backbone.source, "ip_adapter")
    if own is None:
        raise InvalidArgumentError(
            f"{backbone.source!r} has no IP-Adapter of its own: name one with --ip-adapter FILE (ip_adapter=...), e.g. "
            f"h94/IP-Adapter's ip-adapter_sd15.safetensors for SD1.5, or train one: studio train FOLDER --kind ip_adapter.")
    return own

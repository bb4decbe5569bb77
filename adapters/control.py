"""Control adapters: ControlNet (Zhang et al. 2023, arXiv:2302.05543) and T2I-Adapter (Mou et al. 2023,
arXiv:2302.08453), residual-space kinds that make the image follow a control map (edges, a mask...).

- **ControlNet**: a trainable copy of the denoiser's encoder (diffusers' `ControlNetModel` on UNets,
  `SD3ControlNetModel` on SD3-class DiTs, `FluxControlNetModel` on Flux.1) reads the control map and adds its
  features, through zero-initialised projections, to the frozen denoiser's skip connections (a DiT's blocks) at
  every step.
- **T2I-Adapter**: a small network (diffusers' `T2IAdapter`) run once per image; its features are added inside
  the UNet's encoder blocks at each step (`down_intrablock_additional_residuals`), for the first `end` fraction
  of the steps (the paper's cond_tau).

The models are diffusers' own and an adapter is a diffusers folder (`config.json` +
`diffusion_pytorch_model.safetensors`, studio's manifest in the file's metadata), so `ControlNetModel` /
`T2IAdapter.from_pretrained` load studio's and studio attaches published ones (lllyasviel/sd-controlnet-*,
TencentARC/t2iadapter_*, InstantX SD3 ControlNets).

At generation every attached control acts through one forward pre-hook on the denoiser that computes the
residuals and adds them to the call the family's own pipeline makes: exactly the computation diffusers'
`StableDiffusionControlNetPipeline` / `StableDiffusionAdapterPipeline` / `StableDiffusion3ControlNetPipeline` /
`FluxControlNetPipeline` do inside their loops (same preprocessing, same order of sums; the bench checks the pixels). Written by hand
because diffusers has one pipeline class per family x control kind and none that mixes a ControlNet with a
T2I-Adapter, or control with the attention processors and prompt-dependent erasers the other adapters put on
the same backbone: the hook composes with all of them.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
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
    read_manifest,
    read_safetensors,
    register,
    write_adapter_file,
)

from studio.errors import InvalidArgumentError
from studio.home import atomic_path
from studio.registry import Registry

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from studio.backbones import Backbone
    from studio.recipe import AdapterUse

WEIGHTS = "diffusion_pytorch_model.safetensors"
# the diffusers class of each control kind per family (what a folder's config.json `_class_name` says)
CLASSES = {"controlnet": {"sd1": "ControlNetModel", "sd2": "ControlNetModel", "sdxl": "ControlNetModel",
                          "sd3": "SD3ControlNetModel", "flux": "FluxControlNetModel"},
           "t2i_adapter": {"sd1": "T2IAdapter", "sd2": "T2IAdapter", "sdxl": "T2IAdapter"}}
KIND_OF_CLASS = {"ControlNetModel": "controlnet", "SD3ControlNetModel": "controlnet", "FluxControlNetModel": "controlnet",
                 "T2IAdapter": "t2i_adapter"}
CONDITIONS = ("canny", "soft_edge", "mask", "paired")  # training: derived from each image, or conditions/NAME.png


class ControlError(AdapterFileError):
    """A control model folder studio cannot read."""


# ----------------------------------------------------------------------------------- preprocessors


class UnknownPreprocessorError(InvalidArgumentError):
    """A preprocessor name that is not registered."""


PREPROCESSORS: Registry[Any] = Registry("preprocess", UnknownPreprocessorError)


@PREPROCESSORS.register("none")
def _as_given(image: Image.Image) -> Image.Image:
    """The image is already the control map (a user-made edge map, mask or pose drawing)."""
    return image


@PREPROCESSORS.register("canny")
def canny(image: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    """OpenCV's Canny edges (lllyasviel's canny ControlNets' input): white edges on black, RGB. Found in each colour
    channel and joined, so an edge between colours of one brightness (yellow on light grey) is not lost."""
    import cv2
    import numpy as np
    from PIL import Image as PILImage

    rgb = np.asarray(image.convert("RGB"))
    edges = np.maximum.reduce([cv2.Canny(np.ascontiguousarray(rgb[..., c]), low, high) for c in range(3)])
    return PILImage.fromarray(np.stack([edges] * 3, axis=-1))


@PREPROCESSORS.register("soft_edge")
def soft_edge(image: Image.Image) -> Image.Image:
    """Sobel gradient magnitude, scaled to the image's strongest edge: soft edges (HED/PiDiNet-like) offline."""
    import cv2
    import numpy as np
    from PIL import Image as PILImage

    grey = np.asarray(image.convert("L"), dtype=np.float32)
    magnitude = np.hypot(cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=3))
    scaled = np.clip(magnitude / max(float(magnitude.max()), 1e-6) * 255, 0, 255).astype(np.uint8)
    return PILImage.fromarray(np.stack([scaled] * 3, axis=-1))


@PREPROCESSORS.register("mask")
def foreground_mask(image: Image.Image) -> Image.Image:
    """A binary foreground mask (white object on black): each pixel's colour distance from the nearest of the
    border's main colours (k-means over the border: a patterned background has several), blurred, split by
    Otsu's threshold. It fits images of one object on a background that reaches the border (product shots, the
    shapes world); for others give a segmentation map with preprocess="none"."""
    import cv2
    import numpy as np
    from PIL import Image as PILImage

    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    k = min(4, len(np.unique(border, axis=0)))
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 20, 1.0)
    cv2.setRNGSeed(0)  # k-means starts from random centres: the same map every time
    _, _, centres = cv2.kmeans(border, k, None, criteria, 3, cv2.KMEANS_PP_CENTERS)
    distance = np.linalg.norm(pixels[:, :, None, :] - centres[None, None], axis=-1).min(axis=-1)
    distance = cv2.GaussianBlur(distance, (3, 3), 0)
    scaled = np.clip(distance / max(float(distance.max()), 1e-6) * 255, 0, 255).astype(np.uint8)
    _, mask = cv2.threshold(scaled, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return PILImage.fromarray(np.stack([mask] * 3, axis=-1))


def open_control(image: Any, sha256: str | None = None) -> tuple[Image.Image, dict[str, Any]]:
    """A control image (PIL image, file path or uint8 array (H, W[, C])) as a PIL image, with what the recipe
    records of it. Arrays must hold 1, 3 or 4 channels; an alpha channel is dropped, with a note."""
    import numpy as np
    from PIL import Image as PILImage
    from studio.adapters.ip_adapter import open_reference

    if isinstance(image, np.ndarray):
        channels = 1 if image.ndim == 2 else image.shape[-1] if image.ndim == 3 else None
        if channels not in (1, 3, 4) or image.dtype != np.uint8:
            raise InvalidArgumentError(
                f"a control image array must be uint8 (H, W), (H, W, 3) or (H, W, 4); got {image.dtype} "
                f"{tuple(image.shape)}: give a greyscale or RGB map.")
        if channels == 4:
            warnings.warn("the control image has 4 channels: its alpha channel is dropped (the map is its RGB).",
                          stacklevel=3)
        image = PILImage.fromarray(image if channels == 3 else image[..., :3] if channels == 4 else image)
    if isinstance(image, PILImage.Image) and image.mode not in ("RGB", "L", "1"):
        warnings.warn(f"the control image is {image.mode}: it is read as RGB (transparent parts as white).",
                      stacklevel=3)
    opened, record = open_reference(image, sha256)
    return opened, record


def control_map(image: Any, preprocess: str = "none", *, sha256: str | None = None,
                what: str = "control image") -> tuple[Image.Image, dict[str, Any]]:
    """The map a control reads: `image` through the named preprocessor (canny, soft_edge, mask or none).
    An all-black map (no edges found, an empty mask) is refused: it would tell the model "nothing here"."""
    import numpy as np

    function = PREPROCESSORS.get_or_raise(preprocess)
    opened, record = open_control(image, sha256)
    result = function(opened)
    if not np.asarray(result).any():
        where = record.get("path") or what
        fix = ("canny found no edges: pass a sharper image, or the edge map itself with preprocess='none'"
               if preprocess == "canny" else "pass a map with something drawn on it")
        raise InvalidArgumentError(f"the {what} {where!r} gives an all-black {preprocess} map, which tells the model "
                                   f"there is nothing to follow; {fix}.")
    return result, record


def preview(image: Any, preprocess: str) -> Image.Image:
    """What a control will read from `image` (the Generate tab's preprocessor preview)."""
    return control_map(image, preprocess)[0]


# ------------------------------------------------------------------------------------------ kinds


@dataclass(kw_only=True)
class ControlConfig(AdapterConfig):
    """A control model: its family and the preprocessor its maps come from by default."""

    # attached: canny, soft_edge, mask (derived from an image) or none (maps given as they are)
    condition: str = option("none", "each image's control map: canny, soft_edge, mask (NAME.mask.png, else derived) "
                                    "or paired (conditions/NAME.png beside each image) [default: the recipe's].")
    layers: int = 0  # SD3 ControlNet: transformer blocks copied (0 = half of the backbone's, at least 1)

    def __post_init__(self):
        super().__post_init__()
        if self.condition == "paired":  # trained on user-made maps: they are given as they are
            self.condition = "none"
        PREPROCESSORS.get_or_raise(self.condition)

    @classmethod
    def training_output(cls, stem: str, kind: str) -> str:
        return f"{stem}-{kind}"  # a diffusers folder

    @classmethod
    def prepare_training_options(cls, options: dict[str, Any], run: Any) -> None:
        """A control model is saved as a diffusers folder and trains on maps of one of CONDITIONS."""
        if str(run.out).endswith(".safetensors"):
            raise InvalidArgumentError(f"out={run.out!r}: a {run.kind} is saved as a diffusers folder; give a "
                                       f"folder name (e.g. {str(run.out).removesuffix('.safetensors')!r}).")
        if options.get("condition") not in CONDITIONS:
            raise InvalidArgumentError(f"condition={options.get('condition')!r}; choose one of {', '.join(CONDITIONS)}.")


class ControlAdapter(Adapter, Trainable):
    """A control model (a diffusers module) attached with a control image: `attach(backbone, scale,
    image=..., preprocess=..., start=0.0, end=1.0)`; the weight is the conditioning scale."""

    config_class = ControlConfig
    example_inputs = ("control",)
    folder = True  # saved as a diffusers folder, not one .safetensors file

    def __init__(self, config: ControlConfig, tensors: dict[str, torch.Tensor], model: Any = None):
        super().__init__(config, tensors)
        self.model = model

    # ------------------------------------------------------------------------------- making one

    @classmethod
    def create(cls, backbone: Backbone, config: ControlConfig, *, seed: int = 0) -> ControlAdapter:
        import torch

        _check_supported(cls.kind, backbone)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls.build(backbone, config).float()
        return cls(config, _state_dict(model), model)

    @classmethod
    def build(cls, backbone: Backbone, config: ControlConfig) -> Any:
        raise NotImplementedError

    reads = 10  # folders and hub ids, asked first

    @classmethod
    def read_folder(cls, path: str | Path, backbone: Backbone | None) -> ControlAdapter | None:
        """A diffusers folder, or a hub repo id (lllyasviel/sd-controlnet-canny) that is not a file here."""
        from studio.backbones import is_hub_id

        if Path(path).is_dir():
            return cls.from_folder(path, backbone)
        if not Path(path).exists() and is_hub_id(str(path)) and not str(path).endswith(".safetensors"):
            return cls.from_folder(hub_folder(str(path)), backbone)
        return None

    @classmethod
    def from_folder(cls, folder: str | Path, backbone: Backbone | None = None) -> ControlAdapter:
        """A diffusers control folder: studio's (its manifest in the weights' metadata) or a published one (its
        family taken from `backbone` once the shapes are checked)."""
        import diffusers

        folder = Path(folder)
        class_name = folder_class(folder)
        kind = KIND_OF_CLASS[class_name]
        adapter_class = CONTROL_KINDS[kind]
        tensors, metadata = read_safetensors(_weights_file(folder))
        model_class = getattr(diffusers, class_name)
        model = model_class.from_config(model_class.load_config(folder))
        missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
        if missing or unexpected:
            raise ControlError(f"{str(folder)!r}: the weights do not match its config.json ({len(missing)} missing, "
                               f"{len(unexpected)} unexpected, e.g. {(missing or unexpected)[0]}); download it again.")
        model = model.float().eval()
        manifest = read_manifest(metadata, folder)
        if manifest is not None:
            adapter = adapter_class(adapter_class.config_from(manifest), _state_dict(model), model)
        else:
            if backbone is None:
                raise ControlError(f"{str(folder)!r} is a published {class_name} without a studio manifest: reading it "
                                   f"needs the backbone it is for (pass backbone=..., --backbone).")
            config = ControlConfig(family=backbone.family.name, base=folder.name, name=folder.name,
                                   condition=_guess_condition(folder.name))
            adapter = adapter_class(config, _state_dict(model), model)
            adapter.check_backbone(backbone)
        adapter.path = folder
        return adapter

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> ControlAdapter:
        raise ControlError(f"that file holds the weights of the {manifest.get('kind')} {manifest.get('name')!r}: "
                           f"load the folder it is in (its config.json says the architecture).")

    def save(self, path: str | Path, *, overwrite: bool = False, half: bool = False) -> Path:
        """Write the diffusers folder (config.json + weights with the manifest), atomically; `half`: the weights in
        fp16 (half the size; diffusers' `from_pretrained` and studio load them as float32)."""
        import time

        path = Path(path)
        if path.suffix == ".safetensors":
            raise InvalidArgumentError(f"a {self.kind} is saved as a diffusers folder: give a folder name, not "
                                       f"{str(path)!r} (e.g. {str(path.with_suffix(''))!r}).")
        if path.exists() and not overwrite:
            raise InvalidArgumentError(f"{str(path)!r} exists; choose another name or pass overwrite=True (--overwrite).")
        if not self.config.created:
            self.config.created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with atomic_path(path, folder=True) as tmp:
            self.model.save_config(tmp)
            tensors = {k: v.half() if half and v.is_floating_point() else v for k, v in self.tensors.items()}
            write_adapter_file(tmp / WEIGHTS, tensors, self.manifest(), overwrite=True, extra_metadata={"format": "pt"})
        self.path = path
        return path

    # ---------------------------------------------------------------------------- on a backbone

    def check_backbone(self, backbone: Backbone) -> None:
        """Refuse another family, or a denoiser whose blocks the model's features do not fit, before any change."""
        _check_supported(self.kind, backbone)
        check_family(backbone, self.config.family, f"{self.kind} {self.name!r}", self.config.base)
        wanted, found = self.expected(backbone), {k: self.model.config.get(k) for k in self.expected(backbone)}
        wrong = {k: (found[k], v) for k, v in wanted.items() if _plain(found[k]) != _plain(v)}
        if wrong:
            key, (have, need) = next(iter(wrong.items()))
            raise IncompatibleAdapterError(
                f"{self.kind} {self.name!r} does not fit {backbone.source!r}: its {key} is {_plain(have)} where the "
                f"backbone needs {_plain(need)} ({len(wrong)} such differences): it was made for another model; use "
                f"a {self.kind} made for this backbone.")

    def expected(self, backbone: Backbone) -> dict[str, Any]:
        """The model config values the backbone's blocks need."""
        raise NotImplementedError

    @property
    def label(self) -> str:
        return self.kind

    def _entry(self, backbone: Backbone, weight: Any, inputs: dict[str, Any]) -> dict[str, Any]:
        """Attach at conditioning scale `weight`. Inputs: `image` (the control image: PIL, path or array; or
        `images=[one]`), `preprocess` (canny, soft_edge, mask or none; default: the model's own condition),
        `start` / `end` (the fraction of the steps it acts in). Without an image it attaches for training."""
        _check_scale(weight)
        unknown = sorted(set(inputs) - {"image", "images", "preprocess", "start", "end", "image_sha256"})
        if unknown:
            raise InvalidArgumentError(f"{self.kind} inputs {unknown} are not known; use image, preprocess, start, end.")
        start, end = float(inputs.get("start", 0.0)), float(inputs.get("end", 1.0))
        if not 0 <= start < end <= 1:
            raise InvalidArgumentError(f"start={start} and end={end} must satisfy 0 <= start < end <= 1 (the fraction "
                                       f"of the sampling steps the control acts in).")
        images = inputs.get("images") or ([inputs["image"]] if inputs.get("image") is not None else [])
        if len(images) > 1:
            raise InvalidArgumentError(f"a {self.kind} reads one control image, got {len(images)}; attach it once per "
                                       f"image, or attach several controls.")
        preprocess = inputs.get("preprocess") or self.config.condition
        sha = inputs.get("image_sha256")
        sha = sha[0] if isinstance(sha, list) else sha
        entry = {"weight": float(weight), "start": start, "end": end, "preprocess": preprocess, "map": None,
                 "record": {}}
        if images:
            entry["map"], entry["record"] = control_map(images[0], preprocess, sha256=sha)
        else:
            PREPROCESSORS.get_or_raise(preprocess)
        return entry

    def _apply(self, backbone: Backbone, entry: dict[str, Any]) -> None:
        if _place(self.model) != (backbone.device, backbone.dtype):
            self.model.to(backbone.device, backbone.dtype)
        _install_hook(backbone)

    def _remove(self, backbone: Backbone, entry: dict[str, Any]) -> None:
        if not attached(backbone):
            _remove_hook(backbone)

    def _reweight(self, backbone: Backbone, entry: dict[str, Any], weight: Any) -> float:
        _check_scale(weight)
        return float(weight)

    def inputs_record(self, backbone: Backbone) -> dict[str, Any]:
        """The run-time inputs as the recipe keeps them (`attach(**record)` attaches the same way again)."""
        entry = attached(backbone).get(self.name, {})
        record = entry.get("record", {})
        return {"images": [record.get("path")], "image_sha256": [record.get("sha256")],
                "preprocess": entry.get("preprocess"), "start": entry.get("start"), "end": entry.get("end")}

    def prepare(self, backbone: Backbone, prompts: list[str], images_per_prompt: int = 1) -> None:
        """Before a generation: count its steps from zero, and refuse a control attached without an image."""
        state = _state(backbone)
        state["calls"], state["cache"] = 0, {}
        entry = attached(backbone)[self.name]
        if entry["map"] is None:
            raise InvalidArgumentError(f"{self.kind} {self.name!r} is attached without a control image; attach it with "
                                       f"image=... (--control {self.kind}:IMAGE) or detach it.")

    def release(self) -> None:
        """Nothing to undo: the hook reads the attached controls at each call."""

    # ------------------------------------------------------------------------------- training

    def trainable_parameters(self, backbone: Backbone) -> dict[str, list[torch.nn.Parameter]]:
        params = list(self.model.parameters())
        for p in params:
            p.requires_grad_(True)
        self.model.train()
        return {"control": params}

    def sync_from(self, backbone: Backbone) -> None:
        self.tensors = {k: v.detach().float().cpu().clone() for k, v in self.model.state_dict().items()}

    def load_values(self, backbone: Backbone, tensors: dict[str, torch.Tensor]) -> None:
        import torch

        with torch.no_grad():
            for key, value in self.model.state_dict(keep_vars=True).items():
                value.copy_(tensors[key])
        self.tensors = dict(tensors)

    def condition_tensors(self, backbone: Backbone, maps: list[Image.Image]) -> torch.Tensor:
        """Training: the control maps (already fitted to their bucket) as the model reads them."""
        import torch

        with torch.no_grad():
            return torch.cat([self.control_input(backbone, m, m.size[1], m.size[0]) for m in maps]).float().cpu()

    def control_input(self, backbone: Backbone, image: Image.Image, height: int, width: int) -> torch.Tensor:
        """(1, C, H, W): one map as this kind's pipeline prepares it."""
        raise NotImplementedError

    def residuals(self, backbone: Backbone, entry: dict[str, Any], condition: torch.Tensor, scale: float,
                  args: tuple, kwargs: dict[str, Any], training: bool = False) -> dict[str, Any]:
        """The denoiser call's extra keyword arguments this control adds (before summing with other controls)."""
        raise NotImplementedError


@register("controlnet")
class ControlNet(ControlAdapter):
    """ControlNet: a trainable copy of the encoder, zero convolutions into the frozen decoder."""


    @classmethod
    def build(cls, backbone: Backbone, config: ControlConfig) -> Any:
        """From the backbone's own encoder (and middle block): diffusers' `from_unet` / `from_transformer`,
        zero-initialised outputs; the hint encoder has one stride-2 stage per VAE halving."""
        from diffusers import ControlNetModel, FluxControlNetModel, SD3ControlNetModel

        denoiser = backbone.denoiser
        if backbone.family.name == "flux":  # InstantX's layout: the map's packed latent, the first blocks copied
            layers = config.layers or max(1, denoiser.config.num_layers // 2)
            return FluxControlNetModel.from_transformer(
                denoiser, num_layers=layers, num_single_layers=max(1, denoiser.config.num_single_layers // 4),
                attention_head_dim=denoiser.config.attention_head_dim,
                num_attention_heads=denoiser.config.num_attention_heads)
        if backbone.family.name == "sd3":
            layers = config.layers or max(1, denoiser.config.num_layers // 2)
            model = SD3ControlNetModel.from_config({**dict(denoiser.config), "num_layers": layers,
                                                    "extra_conditioning_channels": 0})
            model.pos_embed.load_state_dict(denoiser.pos_embed.state_dict())
            model.time_text_embed.load_state_dict(denoiser.time_text_embed.state_dict())
            model.context_embedder.load_state_dict(denoiser.context_embedder.state_dict())
            model.transformer_blocks.load_state_dict(denoiser.transformer_blocks[:layers].state_dict(), strict=False)
            # diffusers' from_transformer mutates the transformer's frozen config; the same steps by hand,
            # the conditioning input zeroed as its zero_module does
            for p in model.pos_embed_input.parameters():
                p.data.zero_()
            return model
        halvings = int(round(math.log2(backbone.pipe.vae_scale_factor)))
        channels = (16, 32, 96, 256)[: halvings + 1]
        return ControlNetModel.from_unet(denoiser, conditioning_embedding_out_channels=channels)

    def expected(self, backbone: Backbone) -> dict[str, Any]:
        config = backbone.denoiser.config
        keys = (("in_channels", "patch_size", "attention_head_dim", "num_attention_heads", "joint_attention_dim")
                if backbone.family.name == "sd3" else
                ("in_channels", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                 "pooled_projection_dim", "axes_dims_rope") if backbone.family.name == "flux" else
                ("in_channels", "block_out_channels", "down_block_types", "layers_per_block", "cross_attention_dim",
                 "addition_embed_type", "transformer_layers_per_block"))
        wanted = {k: config.get(k) for k in keys}
        if backbone.family.name == "sd3" and self.model.config.get("joint_attention_dim") is None:
            wanted.pop("joint_attention_dim")  # SD3.5's large ControlNets read no text
        return wanted

    def control_input(self, backbone: Backbone, image: Image.Image, height: int, width: int) -> torch.Tensor:
        import torch
        from diffusers.image_processor import VaeImageProcessor

        pipe = backbone.pipe
        if backbone.family.name == "flux" and self.model.input_hint_block is not None:
            # XLabs' Flux ControlNets read the map itself in [-1, 1]
            return VaeImageProcessor(vae_scale_factor=pipe.vae_scale_factor * 2).preprocess(image, height=height,
                                                                                           width=width)
        if backbone.family.name == "flux":
            # FluxControlNetPipeline (InstantX): the map's VAE latent (its mean; diffusers samples it), shifted and
            # scaled, packed into 2x2 patches like the latents
            x = VaeImageProcessor(vae_scale_factor=pipe.vae_scale_factor * 2).preprocess(image, height=height,
                                                                                        width=width)
            vae = pipe.vae
            with torch.no_grad():
                latent = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mode()
            latent = (latent - vae.config.shift_factor) * vae.config.scaling_factor
            return pipe._pack_latents(latent, 1, latent.shape[1], latent.shape[2], latent.shape[3])
        if backbone.family.name == "sd3":
            # StableDiffusion3ControlNetPipeline: the map in [-1, 1] through the VAE; its latent's mean (diffusers
            # samples it, so its own runs differ from one another), no shift for zero-pooled (InstantX) models
            x = VaeImageProcessor(vae_scale_factor=pipe.vae_scale_factor).preprocess(image, height=height, width=width)
            vae = pipe.vae
            with torch.no_grad():
                latent = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mode()
            shift = 0 if self.model.config.force_zeros_for_pooled_projection else (vae.config.shift_factor or 0)
            return (latent - shift) * vae.config.scaling_factor
        # StableDiffusionControlNetPipeline.prepare_image: RGB in [0, 1], resized to the generation
        processor = VaeImageProcessor(vae_scale_factor=pipe.vae_scale_factor, do_convert_rgb=True, do_normalize=False)
        return processor.preprocess(image, height=height, width=width).to(dtype=torch.float32)

    def residuals(self, backbone: Backbone, entry: dict[str, Any], condition: torch.Tensor, scale: float,
                  args: tuple, kwargs: dict[str, Any], training: bool = False) -> dict[str, Any]:
        model = self.model
        condition = condition.to(*_place(model))
        if backbone.family.name == "flux":
            blocks, singles = model(hidden_states=kwargs["hidden_states"], controlnet_cond=condition,
                                    conditioning_scale=scale, timestep=kwargs["timestep"],
                                    guidance=kwargs.get("guidance") if model.config.guidance_embeds else None,
                                    pooled_projections=kwargs["pooled_projections"],
                                    encoder_hidden_states=kwargs["encoder_hidden_states"], txt_ids=kwargs["txt_ids"],
                                    img_ids=kwargs["img_ids"], joint_attention_kwargs=kwargs.get("joint_attention_kwargs"),
                                    return_dict=False)
            return {"controlnet_block_samples": blocks, "controlnet_single_block_samples": singles,
                    "controlnet_blocks_repeat": model.input_hint_block is not None}
        if backbone.family.name == "sd3":
            pooled = kwargs["pooled_projections"]
            samples = model(hidden_states=kwargs["hidden_states"], timestep=kwargs["timestep"],
                            encoder_hidden_states=(kwargs["encoder_hidden_states"]
                                                   if model.config.joint_attention_dim is not None else None),
                            pooled_projections=(pooled.new_zeros(pooled.shape)
                                                if model.config.force_zeros_for_pooled_projection else pooled),
                            joint_attention_kwargs=kwargs.get("joint_attention_kwargs"), controlnet_cond=condition,
                            conditioning_scale=scale, return_dict=False)[0]
            return {"block_controlnet_hidden_states": list(samples)}
        sample, timestep = _unet_inputs(args, kwargs)
        down, mid = model(sample, timestep, encoder_hidden_states=kwargs["encoder_hidden_states"],
                          controlnet_cond=condition, conditioning_scale=scale,
                          added_cond_kwargs=kwargs.get("added_cond_kwargs"), return_dict=False)
        return {"down_block_additional_residuals": list(down), "mid_block_additional_residual": mid}


@register("t2i_adapter")
class T2iAdapter(ControlAdapter):
    """T2I-Adapter: features from the map, once per image, added inside the UNet's encoder blocks."""

    # the paper's cubic timestep sampling t = (1 - u^3) T favours noisy steps: studio's "content" bias is that law

    @classmethod
    def build(cls, backbone: Backbone, config: ControlConfig) -> Any:
        from diffusers import T2IAdapter

        return T2IAdapter(**_t2i_layout(backbone))

    def expected(self, backbone: Backbone) -> dict[str, Any]:
        layout = _t2i_layout(backbone)
        layout.pop("in_channels")
        layout.pop("num_res_blocks")
        return layout

    def control_input(self, backbone: Backbone, image: Image.Image, height: int, width: int) -> torch.Tensor:
        from diffusers.pipelines.t2i_adapter.pipeline_stable_diffusion_adapter import (
            _preprocess_adapter_image,
        )

        # StableDiffusionAdapterPipeline's: lanczos to the generation size, [0, 1]; a sketch adapter reads grey
        mode = "L" if self.model.config.in_channels == 1 else "RGB"
        return _preprocess_adapter_image(image.convert(mode), height, width)

    def residuals(self, backbone: Backbone, entry: dict[str, Any], condition: torch.Tensor, scale: float,
                  args: tuple, kwargs: dict[str, Any], training: bool = False) -> dict[str, Any]:
        sample, _ = _unet_inputs(args, kwargs)
        key = ("t2i", self.name, tuple(condition.shape), sample.shape[0], scale)
        cache = _state(backbone)["cache"]
        if training or key not in cache:
            # the adapter runs once per image (the paper's), its features x scale, repeated over the batch
            features = [f * scale for f in self.model(condition.to(*_place(self.model)))]
            repeat = sample.shape[0] // features[0].shape[0]
            features = [f.repeat(repeat, 1, 1, 1) if repeat > 1 else f for f in features]
            if training:
                return {"down_intrablock_additional_residuals": features}
            cache[key] = features
        return {"down_intrablock_additional_residuals": cache[key]}


CONTROL_KINDS: dict[str, type[ControlAdapter]] = {"controlnet": ControlNet, "t2i_adapter": T2iAdapter}


# ---------------------------------------------------------------------------------- the hook


def attached(backbone: Backbone) -> dict[str, dict[str, Any]]:
    """The controls attached to `backbone` (their rows of the attachments table), in attach order."""
    return attached_of(backbone, ControlAdapter)


def _state(backbone: Backbone) -> dict[str, Any]:
    """The hook's own state: the forward pre-hook, the step count of this generation, its cache."""
    return backbone.__dict__.setdefault("control_hook", {"hook": None, "calls": 0, "cache": {}})


def _install_hook(backbone: Backbone) -> None:
    state = _state(backbone)
    if state["hook"] is None:
        state["hook"] = backbone.denoiser.register_forward_pre_hook(
            lambda module, args, kwargs: _add_controls(backbone, args, kwargs), with_kwargs=True)


def _remove_hook(backbone: Backbone) -> None:
    state = _state(backbone)
    if state["hook"] is not None:
        state["hook"].remove()
        state["hook"] = None


def _add_controls(backbone: Backbone, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """Every attached control's residuals, summed in attach order (as diffusers' Multi* models sum them), into
    this denoiser call. A `control` keyword (training: the batch's maps) replaces the attached images."""
    state = _state(backbone)
    training = kwargs.pop("control", None)
    step = state["calls"]
    if training is None:
        state["calls"] += 1
        timesteps = getattr(backbone.pipe.scheduler, "timesteps", None)
        total = max(1, len(timesteps) if timesteps is not None else 1)
    added: dict[str, Any] = {}
    for entry in attached(backbone).values():
        adapter = entry["adapter"]
        if training is None:
            if entry["map"] is None or step / total < entry["start"] or (step + 1) / total > entry["end"]:
                continue  # diffusers' controlnet_keep: outside [start, end] the control adds zeros
            condition = _condition(backbone, entry, args, kwargs)
        else:
            condition = training
        for key, value in adapter.residuals(backbone, entry, condition, entry["weight"], args, kwargs,
                                              training=training is not None).items():
            if key not in added or added[key] is None or isinstance(value, bool):
                added[key] = value
            elif isinstance(value, (list, tuple)):
                added[key] = [a + b for a, b in zip(added[key], value, strict=True)]
            elif value is not None:
                added[key] = added[key] + value
    if "down_intrablock_additional_residuals" in added:  # the UNet pops from this list: each call gets a copy
        added["down_intrablock_additional_residuals"] = [r.clone() for r in added["down_intrablock_additional_residuals"]]
    kwargs.update(added)
    return args, kwargs


def _condition(backbone: Backbone, entry: dict[str, Any], args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    """The entry's map prepared for this call's size and batch, once per generation."""
    sample = _unet_inputs(args, kwargs)[0] if backbone.family.arch == "unet" else kwargs["hidden_states"]
    factor = backbone.pipe.vae_scale_factor
    if backbone.family.name == "flux":  # packed 2x2 latent patches: the size from their positions
        ids = kwargs["img_ids"]
        height, width = (int(ids[:, 1].max()) + 1) * 2 * factor, (int(ids[:, 2].max()) + 1) * 2 * factor
    else:
        height, width = sample.shape[-2] * factor, sample.shape[-1] * factor
    adapter = entry["adapter"]
    cache = _state(backbone)["cache"]
    key = ("map", adapter.name, height, width, sample.shape[0])
    if key not in cache:
        if entry["map"].size != (width, height):
            where = entry["record"].get("path") or "the control image"
            warnings.warn(f"{where} is {entry['map'].size[0]}x{entry['map'].size[1]}: resized to {width}x{height}, the "
                          f"generation's size" + (" (its aspect ratio changes; crop it first to keep proportions)"
                                                   if entry["map"].size[0] * height != entry["map"].size[1] * width
                                                   else "") + ".", stacklevel=2)
        one = adapter.control_input(backbone, entry["map"], height, width)
        if adapter.kind == "t2i_adapter":  # the adapter runs on one image; its features are repeated
            cache[key] = one.to(backbone.device)
        else:
            cache[key] = one.repeat_interleave(sample.shape[0], dim=0).to(backbone.device)
    return cache[key]


# ---------------------------------------------------------------------------------- helpers


def _unet_inputs(args: tuple, kwargs: dict[str, Any]) -> tuple[Any, Any]:
    sample = args[0] if args else kwargs["sample"]
    timestep = args[1] if len(args) > 1 else kwargs["timestep"]
    return sample, timestep


def _place(model: Any) -> tuple[torch.device, torch.dtype]:
    """A model's device and dtype from its first parameter: diffusers' ModelMixin.device/.dtype walk every module
    (about a millisecond per call on a ControlNet: 3 % of a world-sd generation when asked at every step)."""
    first = next(model.parameters())
    return first.device, first.dtype


def _state_dict(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items()}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _check_scale(weight: Any) -> None:
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight):
        raise InvalidArgumentError(f"a control's weight is its conditioning scale, one number (e.g. 1.0); got {weight!r}.")


def _check_supported(kind: str, backbone: Backbone) -> None:
    families = CLASSES[kind]
    if backbone.family.name not in families:
        raise IncompatibleAdapterError(
            f"{kind} on {backbone.family.title} ({backbone.source!r}) is not supported yet: studio runs "
            f"{kind} on {', '.join(sorted(families))}.")


def _t2i_layout(backbone: Backbone) -> dict[str, Any]:
    """The T2IAdapter config whose features land where this UNet adds them: one per encoder block, at that block's
    width and resolution. SD1.x/2.x (cross-attention blocks first, a plain block last): `full_adapter`; SDXL-style
    UNets (a plain block first, whose feature is added after its downsampler, then the mid block): `full_adapter_xl`."""
    unet = backbone.denoiser
    channels = list(unet.config.block_out_channels)
    factor = backbone.pipe.vae_scale_factor
    if unet.config.down_block_types[0] == "DownBlock2D":
        return {"in_channels": 3, "channels": [*channels, channels[-1]], "num_res_blocks": 2,
                "downscale_factor": factor * 2, "adapter_type": "full_adapter_xl"}
    return {"in_channels": 3, "channels": channels, "num_res_blocks": 2, "downscale_factor": factor,
            "adapter_type": "full_adapter"}


def _weights_file(folder: Path) -> Path:
    from studio.backbones import refuse_pickle

    path = folder / WEIGHTS
    if not path.is_file():
        pickled = folder / "diffusion_pytorch_model.bin"
        if pickled.is_file():
            refuse_pickle(pickled)
        variants = sorted(folder.glob("diffusion_pytorch_model.*.safetensors"))
        if variants:
            return variants[0]
        raise ControlError(f"{str(folder)!r} has no {WEIGHTS}; a control model folder holds config.json and its weights.")
    return path


def folder_class(folder: Path) -> str:
    """The diffusers class a folder's config.json names, if it is a control model studio reads."""
    config = folder / "config.json"
    if not config.is_file():
        raise ControlError(f"{str(folder)!r} is a folder without config.json: not a diffusers control model.")
    try:
        name = json.loads(config.read_text(encoding="utf-8")).get("_class_name", "")
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ControlError(f"{str(config)!r} is not valid JSON ({error}).") from error
    if name not in KIND_OF_CLASS:
        raise ControlError(f"{str(folder)!r} holds a {name or 'model without _class_name'}; studio attaches control "
                           f"folders of {', '.join(KIND_OF_CLASS)}.")
    return name


def hub_folder(repo_id: str) -> Path:
    """A control model's hub repo downloaded (config and safetensors weights only, never pickles) or from the cache."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["config.json", "diffusion_pytorch_model*.safetensors"]))
    except Exception as error:  # huggingface_hub raises several types for offline / missing / network
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ControlError(f"{repo_id!r} is not a file or folder here, and the hub did not provide it ({first}); "
                           f"download it once where the network is reachable (`hf download {repo_id}`) or give "
                           f"the local folder.") from None


def _guess_condition(name: str) -> str:
    """A published model's condition from its name (lllyasviel/sd-controlnet-canny, t2iadapter_canny_sd15v2...)."""
    lowered = name.lower()
    for word, condition in (("canny", "canny"), ("softedge", "soft_edge"), ("hed", "soft_edge"), ("seg", "none"),
                            ("mask", "mask")):
        if word in lowered:
            return condition
    return "none"


def control_use(backbone: Backbone, model: str, image: Any, scale: float = 1.0, *, preprocess: str | None = None,
                end: float = 1.0) -> AdapterUse:
    """The request for a control reading `image`: `model` is a control model's folder or hub id, or a kind
    (controlnet, t2i_adapter) for the backbone's own; no `preprocess`: the model's own condition."""
    from studio.recipe import AdapterUse

    path = default_control(backbone, model) if model in CONTROL_KINDS else model
    inputs: dict[str, Any] = {"image": image, "end": float(end)}
    if preprocess:
        inputs["preprocess"] = preprocess
    return AdapterUse(str(path), float(scale), inputs)


def default_control(backbone: Backbone, kind: str) -> Path:
    """The backbone's own control model of `kind` (world-sd ships a mask ControlNet and T2I-Adapter)."""
    from studio.embedded import ships

    own = ships(backbone.source, kind)
    if own is None:
        raise InvalidArgumentError(
            f"{backbone.source!r} ships no {kind}: name a control model folder instead of the kind (--control "
            f"FOLDER:IMAGE, e.g. lllyasviel/sd-controlnet-canny downloaded for SD1.5), or train one: studio train "
            f"FOLDER --kind {kind} --condition canny.")
    return own

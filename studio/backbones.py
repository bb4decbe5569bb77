"""Load any supported backbone, know its family and name its blocks.

A source is a hub id, a local diffusers folder, a single-file checkpoint in the original SD/SDXL
layout (what A1111/ComfyUI users keep), or an embedded name. Loading itself is diffusers'
(`from_pretrained`, `from_single_file`); studio adds what it lacks: family detection that works on
tiny and renamed models, block naming for UNets and DiTs alike, safe-file checks, errors that say
what to do, and a content fingerprint for recipes.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from studio.errors import (
    BackboneNotFoundError,
    InvalidArgumentError,
    NotACheckpointError,
    UnknownFamilyError,
    UnsafeFileError,
)
from studio.folders import check_pipeline_folder
from studio.hashing import hash_files, hash_modules
from studio.registry import Registry

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


@dataclass(frozen=True, kw_only=True)
class Family:
    """What studio knows of one backbone family; defaults are those its model cards recommend."""

    name: str
    arch: Literal["unet", "dit"]
    pipeline: str  # the diffusers text-to-image pipeline class
    denoiser: str  # the diffusers class of its UNet or transformer
    steps: int
    guidance: float
    scheduler: str
    gpu_dtype: str
    title: str
    examples: str  # checkpoints of this family, for the README table and errors


FAMILIES: Registry[Family] = Registry("family", UnknownFamilyError)

for _family in (
    Family(name="sd1", arch="unet", pipeline="StableDiffusionPipeline", denoiser="UNet2DConditionModel",
           steps=25, guidance=7.0, scheduler="dpmpp_2m_karras", gpu_dtype="float16",
           title="Stable Diffusion 1.x", examples="SD 1.4/1.5 and their fine-tunes"),
    Family(name="sd2", arch="unet", pipeline="StableDiffusionPipeline", denoiser="UNet2DConditionModel",
           steps=25, guidance=7.0, scheduler="dpmpp_2m_karras", gpu_dtype="float16",
           title="Stable Diffusion 2.x", examples="SD 2.0/2.1 (512 eps, 768 v-prediction)"),
    Family(name="sdxl", arch="unet", pipeline="StableDiffusionXLPipeline", denoiser="UNet2DConditionModel",
           steps=25, guidance=6.0, scheduler="dpmpp_2m_karras", gpu_dtype="float16",
           title="Stable Diffusion XL", examples="SDXL base 1.0, Pony, Illustrious, turbo/lightning"),
    Family(name="sd3", arch="dit", pipeline="StableDiffusion3Pipeline", denoiser="SD3Transformer2DModel",
           steps=28, guidance=5.0, scheduler="flow_euler", gpu_dtype="bfloat16",
           title="Stable Diffusion 3/3.5 (MMDiT)", examples="SD3 medium, SD3.5 medium/large"),
    Family(name="flux", arch="dit", pipeline="FluxPipeline", denoiser="FluxTransformer2DModel",
           steps=28, guidance=3.5, scheduler="flow_euler", gpu_dtype="bfloat16",
           title="Flux.1", examples="FLUX.1 dev, schnell"),
    Family(name="pixart", arch="dit", pipeline="PixArtSigmaPipeline", denoiser="PixArtTransformer2DModel",
           steps=20, guidance=4.5, scheduler="dpmpp_2m", gpu_dtype="float16",
           title="PixArt-Σ / PixArt-α", examples="PixArt-Sigma XL 512/1024"),
):
    FAMILIES.add(_family.name, _family)


# Where each kind of block sits on a denoiser, and what studio calls it. Names are the diffusers
# module paths ("up_blocks.1", "transformer_blocks.3"), so adapters and per-block weights address
# them exactly as diffusers' own keys do.
BLOCK_GROUPS = {
    "down_blocks": "down",
    "mid_block": "mid",
    "up_blocks": "up",
    "transformer_blocks": "transformer",
    "single_transformer_blocks": "single",
}


@dataclass(frozen=True)
class Block:
    name: str  # diffusers module path, e.g. "down_blocks.1" or "transformer_blocks.3"
    kind: str  # down | mid | up | transformer | single
    index: int
    module: Any = field(repr=False, compare=False)


DEFAULT_BACKBONE = "world-sd"  # embedded: studio.embedded


# ---------------------------------------------------------------------------------------------


class Backbone:
    """A loaded diffusers pipeline with its family, its blocks and where it came from."""

    def __init__(self, pipe: DiffusionPipeline, family: Family, *, source: str, origin: str,
                 path: Path | None = None, config: str | None = None):
        self.pipe = pipe
        self.family = family
        self.source = source
        self.config = config  # the diffusers configs a single file was built with
        self.origin = origin  # embedded | folder | hub | single_file
        self.path = path
        # the scheduler the backbone ships with; every named sampler is built from it afresh
        self.base_scheduler_config = {**pipe.scheduler.config, "_class_name": type(pipe.scheduler).__name__}
        self._schedulers: dict[str, Any] = {}
        self._fingerprint: str | None = None

    def __repr__(self) -> str:
        return f"Backbone({self.source!r}, family={self.family.name}, device={self.device}, dtype={self.dtype})"

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.unet if self.family.arch == "unet" else self.pipe.transformer

    @property
    def device(self) -> torch.device:
        # the first parameter's: diffusers' ModelMixin.device walks every module (ms per call)
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    def scheduler(self, name: str):
        """The sampler `name` built from this backbone's own scheduler config, made once and reused
        (diffusers resets a scheduler's state in `set_timesteps` at every call)."""
        from studio.schedulers import build_scheduler

        if name not in self._schedulers:
            self._schedulers[name] = build_scheduler(name, self.base_scheduler_config)
        return self._schedulers[name]

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipe.vae_scale_factor)

    @property
    def size_factor(self) -> int:
        """Width and height must be multiples of this."""
        # Flux packs latents in 2x2 patches; the other DiTs name their patch size. diffusers' SD, SDXL and
        # PixArt pipelines also insist on multiples of 8.
        patch = 2 if self.family.name == "flux" else int(getattr(self.denoiser.config, "patch_size", None) or 1)
        return math.lcm(8, self.vae_scale_factor * patch)

    @property
    def default_size(self) -> int:
        sample = getattr(self.pipe, "default_sample_size", None) or self.denoiser.config.sample_size
        return int(sample) * self.vae_scale_factor

    @cached_property
    def blocks(self) -> list[Block]:
        """The denoiser's blocks in forward order, named by their diffusers module path."""
        import torch

        found: list[Block] = []
        for attr, kind in BLOCK_GROUPS.items():
            group = getattr(self.denoiser, attr, None)
            if isinstance(group, torch.nn.ModuleList):
                found += [Block(f"{attr}.{i}", kind, i, m) for i, m in enumerate(group)]
            elif isinstance(group, torch.nn.Module):
                found.append(Block(attr, kind, 0, group))
        return found

    def block_of(self, module_name: str) -> str | None:
        """The block a denoiser module or parameter name belongs to ("up_blocks.1.attentions.0..." -> "up_blocks.1")."""
        name = re.sub(r"^(unet|transformer)\.", "", module_name)
        for block in self.blocks:
            if name == block.name or name.startswith(block.name + "."):
                return block.name
        return None

    def fingerprint(self) -> str:
        """sha256 of the backbone's weights and configs (A1111's model hash is its first 10 digits)."""
        if self._fingerprint is None:
            self._fingerprint = hash_modules(self.pipe) if self.origin == "embedded" else hash_files(self.path)
        return self._fingerprint

    @property
    def short_hash(self) -> str:
        return self.fingerprint()[:10]

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "origin": self.origin,
            "family": self.family.name,
            "pipeline": type(self.pipe).__name__,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "default_size": self.default_size,
            "size_factor": self.size_factor,
            "blocks": [b.name for b in self.blocks],
        }


# ---------------------------------------------------------------------------------------------
# Detection


def _denoiser_of(pipe: DiffusionPipeline):
    return getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)


def detect_family(pipe: DiffusionPipeline) -> Family:
    """The family of a loaded pipeline, judged by its denoiser's class and config."""
    denoiser = _denoiser_of(pipe)
    if denoiser is None:
        raise UnknownFamilyError(f"{type(pipe).__name__} has neither a UNet nor a transformer to adapt.")
    return family_of_denoiser(type(denoiser).__name__, dict(denoiser.config), owner=type(pipe).__name__)


def family_of_denoiser(cls: str, config: dict[str, Any], *, owner: str = "this pipeline") -> Family:
    """The family of a UNet/transformer class and its config (what a diffusers folder's config.json holds)."""
    if cls == "UNet2DConditionModel":
        if config.get("addition_embed_type") == "text_time":
            return FAMILIES["sdxl"]
        if config.get("cross_attention_dim") == 1024 or config.get("use_linear_projection"):
            return FAMILIES["sd2"]
        return FAMILIES["sd1"]
    for family in FAMILIES.values():
        if family.arch == "dit" and family.denoiser == cls:
            return family
    raise UnknownFamilyError(f"{owner} with a {cls} is not a supported family; supported: {', '.join(FAMILIES)}.")


# Key markers of single-file checkpoints in their original (non-diffusers) layouts.
_LORA_MARKERS = ("lora_unet_", "lora_te", ".lora_down.", ".lora_A.", "lora_transformer_", ".hada_w1", ".lokr_w1")


def detect_family_from_keys(keys: list[str], shape_of: Callable[[str], tuple[int, ...]], *, name: str) -> str:
    """Family of a single-file checkpoint from its tensor names (and one shape for SD1 vs SD2)."""
    keyset = set(keys)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if any(marker in k for k in keys[:200] for marker in _LORA_MARKERS):
        raise NotACheckpointError(
            f"{name} holds LoRA/LyCORIS weights, not a backbone; load a backbone and attach it as an adapter."
        )
    if has("conditioner.embedders.") and has("model.diffusion_model."):
        return "sdxl"
    if has("model.diffusion_model.joint_blocks.") or has("joint_blocks."):
        return "sd3"
    if has("model.diffusion_model.double_blocks.") or has("double_blocks."):
        return "flux"
    if has("model.diffusion_model.input_blocks."):
        if has("cond_stage_model.model."):
            return "sd2"  # OpenCLIP text encoder
        probe = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
        if probe in keyset and shape_of(probe)[-1] == 1024:
            return "sd2"
        return "sd1"
    if has("y_embedder.") and has("t_block."):
        return "pixart"
    sample = ", ".join(sorted({k.split(".")[0] for k in keys})[:6]) or "no tensors"
    raise NotACheckpointError(
        f"{name} is not a backbone checkpoint studio recognises (top-level names: {sample}). "
        f"Expected an SD1/SD2/SDXL/SD3/Flux single file in its original layout, or pass a diffusers folder."
    )


# ---------------------------------------------------------------------------------------------
# Device and dtype


def resolve_device(device: str | None = None) -> str:
    """The requested device, else cuda, then mps, then cpu."""
    import torch

    if device:
        try:
            torch.device(device)
        except (RuntimeError, ValueError):
            raise InvalidArgumentError(f"device={device!r} is not a torch device; use cpu, cuda, cuda:1 or mps.") from None
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


DTYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
          "half": "float16", "bf16": "bfloat16", "bfloat16": "bfloat16"}


def resolve_dtype(dtype: Any, device: str, family: Family | None) -> torch.dtype:
    """The requested dtype, else fp32 on the CPU and the family's half precision on GPUs."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype:
        name = DTYPES.get(str(dtype).lower().replace("torch.", ""))
        if name is None:
            raise InvalidArgumentError(f"dtype={dtype!r} is not supported; use fp32, fp16 or bf16.")
        return getattr(torch, name)
    if torch.device(device).type == "cpu":
        return torch.float32
    return getattr(torch, family.gpu_dtype if family else "float16")


# ---------------------------------------------------------------------------------------------
# Loading


def quiet_libraries() -> None:
    """Silence diffusers/transformers info logs and loading bars (STUDIO_VERBOSE=1 keeps them)."""
    import os

    if os.environ.get("STUDIO_VERBOSE"):
        return
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    for logging in (diffusers_logging, transformers_logging):
        logging.set_verbosity_error()
        logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")  # raised inside diffusers' loader

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(text: str) -> bool:
    """`owner/name` and nothing else: a hub repo id, not a path."""
    return _HUB_ID.match(text) is not None


def load_backbone(source: str | None = None, *, family: str | None = None, device: str | None = None,
                  dtype: Any = None, config: str | None = None) -> Backbone:
    """Load a backbone from a hub id, a diffusers folder, a single-file checkpoint or an embedded name.

    `family` overrides detection; `config` (a diffusers folder or hub id of the same architecture)
    tells diffusers how to build the modules of a single-file checkpoint without a download.
    """
    source = str(source or DEFAULT_BACKBONE)
    quiet_libraries()
    fam = FAMILIES.get_or_raise(family) if family else None
    device = resolve_device(device)
    from studio.embedded import EMBEDDED

    path = Path(source).expanduser()

    if source in EMBEDDED and not path.exists():
        pipe = EMBEDDED[source]()
        origin, path = "embedded", None
    elif path.is_dir():
        pipe, fam = _load_folder(str(path), source, fam, device, dtype)
        origin = "folder"
    elif path.is_file():
        pipe, fam = _load_single_file(path, fam, device, dtype, config)
        origin = "single_file"
    elif is_hub_id(source):
        pipe, fam = _load_folder(source, source, fam, device, dtype)
        origin = "hub"
        path = _hub_snapshot(source)
    else:
        raise BackboneNotFoundError(
            f"backbone {source!r} is neither a file, a folder, a hub id (owner/name) nor an embedded "
            f"name; embedded names: {', '.join(sorted(EMBEDDED))}."
        )

    fam = fam or detect_family(pipe)
    if type(pipe).__name__ != fam.pipeline:
        import diffusers

        pipe = getattr(diffusers, fam.pipeline).from_pipe(pipe)
    target = resolve_dtype(dtype, device, fam)
    pipe = pipe.to(device)
    if _denoiser_of(pipe).dtype != target:
        pipe = pipe.to(dtype=target)
    pipe.set_progress_bar_config(disable=True)
    for component in pipe.components.values():  # built-in-code models start in train mode (dropout on)
        if hasattr(component, "eval"):
            component.eval()
    _enable_memory_efficient_attention(pipe, device)
    if origin in ("folder", "single_file"):  # recipes name local sources absolutely, to replay from anywhere
        source = str(path.resolve())
    if config and Path(config).expanduser().exists():
        config = str(Path(config).expanduser().resolve())
    return Backbone(pipe, fam, source=source, origin=origin, path=path,
                    config=config if origin == "single_file" else None)


def family_of_source(source: str) -> Family:
    """The family of a diffusers folder, hub id (its cached config) or single file (its header), reading no
    weights; the same errors as `load_backbone` when the source cannot be read."""
    import diffusers
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    path = Path(source).expanduser()
    if path.is_file():
        keys, shapes, _ = read_safetensors_header(path)
        return FAMILIES[detect_family_from_keys(keys, shapes.__getitem__, name=path.name)]
    if not (path.is_dir() or is_hub_id(source)):
        from studio.embedded import EMBEDDED

        raise BackboneNotFoundError(f"backbone {source!r} is neither a file, a folder, a hub id (owner/name) nor an "
                                    f"embedded name; embedded names: {', '.join(sorted(EMBEDDED))}.")
    if path.is_dir():
        check_pipeline_folder(path)
    try:
        return _family_of_folder(str(path) if path.is_dir() else source,
                                 diffusers.DiffusionPipeline.load_config(str(path) if path.is_dir() else source))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, OSError) as error:
        if path.is_dir():
            raise NotACheckpointError(f"folder {source!r} could not be read as a pipeline: {error}") from None
        raise BackboneNotFoundError(f"hub id {source!r}: its config is not in the local cache and the hub did not "
                                    f"provide it. {_offline_hint(source)}") from None


def _offline_hint(source: str) -> str:
    return (
        f"Download it once where the network is reachable (`hf download {source}`), "
        f"or pass a local diffusers folder or a single .safetensors file instead."
    )


def _load_folder(location: str, source: str, fam: Family | None, device: str,
                 dtype: Any) -> tuple[DiffusionPipeline, Family]:
    import diffusers
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    if Path(location).is_dir():
        check_pipeline_folder(Path(location))
    try:
        index = diffusers.DiffusionPipeline.load_config(location)
        # the family before the weights, so they load straight into its dtype (bf16 Flux never via fp16)
        fam = fam or _family_of_folder(location, index)
        # Components saved as [null, null] (SD3 without T5, no safety checker) must be passed as None.
        absent = {name: None for name, value in index.items() if isinstance(value, list) and value == [None, None]}
        pipe = getattr(diffusers, fam.pipeline).from_pretrained(
            location, dtype=resolve_dtype(dtype, device, fam), **absent)
        return pipe, fam
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, OSError) as error:
        if Path(location).is_dir():
            raise NotACheckpointError(f"folder {location!r} could not be loaded as a pipeline: {error}") from None
        if _hub_offline():
            reason = "HF_HUB_OFFLINE=1 is set and it is not in the local Hugging Face cache"
        else:
            reason = f"the hub did not provide it ({str(error).strip().splitlines()[0]})"
        raise BackboneNotFoundError(f"hub id {source!r} could not be loaded: {reason}. {_offline_hint(source)}") from None


def _family_of_folder(location: str, index: dict[str, Any]) -> Family:
    """The family of a diffusers folder or hub id, from its denoiser's config.json alone."""
    from diffusers import UNet2DConditionModel

    for name in ("unet", "transformer"):
        if isinstance(index.get(name), list) and index[name][1]:
            # load_config reads any config.json; the class it is called on does not matter
            config = UNet2DConditionModel.load_config(location, subfolder=name)
            return family_of_denoiser(config.get("_class_name", index[name][1]), config,
                                      owner=index.get("_class_name", location))
    raise UnknownFamilyError(f"{location!r} ({index.get('_class_name')}) has neither a unet nor a transformer.")


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, local_files_only=True))


def is_pickle(path: Path) -> bool:
    """A torch.save file (a zip archive or a raw pickle, protocol 2+) whatever its name says: read by its first
    bytes, as a .safetensors file starts with an 8-byte little-endian header length instead."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(9)
    except OSError:
        return False
    if len(head) == 9 and head[8:9] == b"{":  # a safetensors header (whose length may start 0x80 0x02)
        return False
    return head[:4] == b"PK\x03\x04" or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def refuse_pickle(path: Path) -> None:
    """Pickle files can run code when loaded: refuse them (by name or by content), saying how to convert once."""
    renamed = path.suffix.lower() not in PICKLE_SUFFIXES and path.is_file() and is_pickle(path)
    if path.suffix.lower() in PICKLE_SUFFIXES or renamed:
        raise UnsafeFileError(
            f"{path.name} is a pickle file ({'a torch.save file under a .safetensors name' if renamed else path.suffix}), "
            f"which can run code when loaded; studio reads "
            f"only .safetensors. Convert it once in a trusted environment, e.g. "
            f"`python -c \"import torch, safetensors.torch as s; s.save_file(torch.load('{path.name}', "
            f"weights_only=True).get('state_dict', ...), '{path.stem}.safetensors')\"`, or download the "
            f".safetensors release of the same model."
        )


def read_safetensors_header(path: Path) -> tuple[list[str], dict[str, tuple[int, ...]], dict[str, str]]:
    """Tensor names, shapes and metadata of a .safetensors file, reading no tensor data."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    refuse_pickle(path)
    try:
        with safe_open(str(path), framework="numpy") as handle:
            keys = list(handle.keys())
            shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in keys}
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise NotACheckpointError(
            f"{path} is not a readable .safetensors file ({error}); check the download is complete."
        ) from None
    return keys, shapes, metadata


def _load_single_file(path: Path, fam: Family | None, device: str, dtype: Any, config: str | None):
    import diffusers
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    keys, shapes, _ = read_safetensors_header(path)
    fam = fam or FAMILIES[detect_family_from_keys(keys, shapes.__getitem__, name=path.name)]
    cls = getattr(diffusers, fam.pipeline)
    if not hasattr(cls, "from_single_file"):
        raise NotACheckpointError(
            f"{path.name}: diffusers cannot load {fam.title} from a single file; use a diffusers folder."
        )
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype, device, fam)}
    if config:
        kwargs["config"] = config
    try:
        return cls.from_single_file(str(path), **kwargs), fam
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, OSError) as error:
        raise BackboneNotFoundError(
            f"{path.name} is a {fam.title} single file, but building its modules needs the diffusers "
            f"config of that architecture, which is not in the local cache ({type(error).__name__}). "
            f"Pass config=<a diffusers folder or cached hub id of the same architecture> "
            f"(CLI: --config), or run once with network access."
        ) from None


def _enable_memory_efficient_attention(pipe: DiffusionPipeline, device: str) -> None:
    """xformers when it is importable on CUDA; torch SDPA (diffusers' default) otherwise."""
    import importlib.util

    if not device.startswith("cuda") or importlib.util.find_spec("xformers") is None:
        return
    try:
        pipe.enable_xformers_memory_efficient_attention()
    except (ImportError, NotImplementedError, RuntimeError, ValueError):
        pass  # SDPA stays in place


def t5_free_options(pipe: Any) -> dict[str, Any]:
    """SD3 without its T5 encoder: diffusers still appends `max_sequence_length` zero tokens (256 by
    default) to the CLIP tokens and the transformer attends to them, so their count is part of the
    conditioning. Such a backbone gets as many as its CLIP tokenizer's length (world-dit trains so)."""
    if hasattr(pipe, "text_encoder_3") and pipe.text_encoder_3 is None:
        return {"max_sequence_length": pipe.tokenizer_max_length}
    return {}

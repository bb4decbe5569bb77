"""The adapter contract: one config dataclass, one file format, one verb set for every kind.

An adapter acts on a backbone in one of three ways (README, Architecture): in weight space (LoRA, DoRA,
orthogonal LoRA, OFT, erasers: `deltas`, `fuse`, `unfuse` on top of attach/detach), in attention
space (image prompts, style routing: attention processors with run-time reference images) or in
residual space (ControlNet, T2I-Adapter: features added to the blocks from control images). The base
class owns what all share: the manifest, the file, the backbone check done before any weight changes,
and the bookkeeping of what is attached to which backbone.

The file: one `.safetensors` whose `__metadata__` holds `studio.manifest` (JSON: kind, family, base,
targets, trigger words, training recipe...) and the `modelspec.*` keys other tools display.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from studio.errors import InvalidArgumentError, StudioError
from studio.registry import Registry

if TYPE_CHECKING:
    import torch

    from studio.backbones import Backbone
    from studio.deltas import Delta

MANIFEST_KEY = "studio.manifest"
FORMAT_VERSION = 1


class UnknownAdapterKindError(StudioError, ValueError):
    """An adapter kind that no module registered."""


class IncompatibleAdapterError(StudioError, ValueError):
    """An adapter made for another backbone (family or shapes)."""


class AdapterFileError(StudioError, ValueError):
    """A file that is not a readable adapter."""


class UnknownKeysError(AdapterFileError):
    """An adapter file with keys that match no module of the backbone."""


ADAPTERS: Registry[type[Adapter]] = Registry("adapter kind", UnknownAdapterKindError)


def adapter_kinds() -> Registry[type[Adapter]]:
    """The registry, after importing every module of `studio.adapters` (each registers its kinds), so
    a new kind needs no line anywhere else."""
    import importlib
    import pkgutil

    import studio.adapters

    for module in pkgutil.iter_modules(studio.adapters.__path__):
        if module.name != "base":
            importlib.import_module(f"studio.adapters.{module.name}")
    return ADAPTERS


def register(kind: str) -> Callable[[type[Adapter]], type[Adapter]]:
    """Class decorator: `@register("lora")` names the kind and makes it loadable from files."""

    def decorate(cls: type[Adapter]) -> type[Adapter]:
        cls.kind = kind
        return ADAPTERS.register(kind)(cls)

    return decorate


@dataclass(kw_only=True)
class AdapterConfig:
    """What every adapter records about itself (the manifest). Kinds subclass it with their options."""

    family: str  # the backbone family it was made for (sd1, sdxl, sd3, ...)
    base: str = ""  # the backbone it was made on (embedded name, hub id or file name)
    base_hash: str = ""  # that backbone's fingerprint
    name: str = ""
    trigger_words: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)  # module names it changes
    training: dict[str, Any] = field(default_factory=dict)  # the recipe that made it
    merge: dict[str, Any] = field(default_factory=dict)  # a merged adapter's method, parameters and sources
    created: str = ""

    def __post_init__(self):
        from studio.backbones import FAMILIES

        FAMILIES.get_or_raise(self.family)
        if isinstance(self.trigger_words, str):
            self.trigger_words = [w.strip() for w in self.trigger_words.split(",") if w.strip()]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        """From a manifest or a recipe file; unknown keys raise, naming them and the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidArgumentError(f"unknown {cls.__name__} keys {unknown}; known keys: {sorted(known)}.")
        return cls(**data)


class Adapter:
    """Base of every kind: a config and its tensors; `attach` / `detach` on a backbone."""

    kind: ClassVar[str] = ""
    config_class: ClassVar[type[AdapterConfig]] = AdapterConfig
    weightless: ClassVar[bool] = False  # a kind with no tensors (its manifest says everything)

    def __init__(self, config: AdapterConfig, tensors: dict[str, torch.Tensor]):
        if not isinstance(config, self.config_class):
            raise InvalidArgumentError(f"{type(self).__name__} needs a {self.config_class.__name__}, "
                                       f"got {type(config).__name__}.")
        from studio.concept_tokens import split

        self.config = config
        # the weights; concept tokens (a trigger's learned embeddings, studio.concept_tokens) apart
        self.tensors, self.tokens = split(tensors)
        self.path: Path | None = None

    def __repr__(self) -> str:
        tokens = f", tokens {sorted(self.tokens)}" if self.tokens else ""
        return f"{type(self).__name__}({self.name!r}, family={self.config.family}, {len(self.tensors)} tensors{tokens})"

    @property
    def name(self) -> str:
        """The adapter's name; PEFT keys its layers by it and torch refuses dots in module names, so
        "sks.v2" (from a file sks.v2.safetensors) is attached as "sks_v2"."""
        return re.sub(r"[^\w-]", "_", self.config.name or (self.path.stem if self.path else self.kind))

    # ------------------------------------------------------------------------------------ the file

    def manifest(self) -> dict[str, Any]:
        return {"kind": self.kind, "format_version": FORMAT_VERSION, **asdict(self.config)}

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the adapter file (atomically: a temp file renamed into place)."""
        if not self.config.created:
            self.config.created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        from studio.concept_tokens import join

        path = write_adapter_file(path, join(self.tensors, self.tokens), self.manifest(), overwrite=overwrite)
        self.path = path
        return path

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Adapter:
        data = {k: v for k, v in manifest.items() if k not in ("kind", "format_version")}
        return cls(cls.config_class.from_dict(data), tensors)

    # ---------------------------------------------------------------------------- on a backbone

    def check_backbone(self, backbone: Backbone) -> None:
        """Refuse a backbone of another family, or whose modules lack or reshape the targets, before
        anything is changed."""
        if backbone.family.name != self.config.family:
            raise IncompatibleAdapterError(
                f"adapter {self.name!r} was made for {self.config.family} ({self.config.base or 'unknown base'}), "
                f"but the backbone {backbone.source!r} is {backbone.family.name}; load a {self.config.family} "
                f"backbone or use an adapter made for {backbone.family.name}."
            )
        modules = module_table(backbone)
        missing = [t for t in self.config.targets if t not in modules]
        if missing:
            raise IncompatibleAdapterError(
                f"adapter {self.name!r} changes {len(missing)} modules that {backbone.source!r} does not have "
                f"(e.g. {missing[0]}): it was made on {self.config.base or 'another model'} of the same family "
                f"with a different architecture."
            )

    def attach(self, backbone: Backbone, weight: float = 1.0, **inputs: Any) -> None:
        raise NotImplementedError

    def detach(self, backbone: Backbone) -> None:
        raise NotImplementedError

    def set_weight(self, backbone: Backbone, weight: float) -> None:
        raise NotImplementedError


class WeightAdapter(Adapter):
    """A kind that changes weights: it can say its change per module (`deltas`) and be fused."""

    def deltas(self, backbone: Backbone | None = None, *, weight: float = 1.0) -> dict[str, Delta]:
        """The change per module at `weight` (linear in it for most kinds, not for DoRA)."""
        raise NotImplementedError

    def fuse(self, backbone: Backbone, weight: float = 1.0) -> None:
        """Add `weight` x the deltas into the backbone's weights. The changed weights are kept, so
        `unfuse` restores them bit for bit; non-finite results are refused before anything changes."""
        import torch

        from studio import concept_tokens

        self.check_backbone(backbone)
        fused = _fused(backbone)
        if self.name in fused:
            raise InvalidArgumentError(f"adapter {self.name!r} is already fused into {backbone.source!r}.")
        concept_tokens.check(backbone, self.name, self.tokens)
        modules = module_table(backbone)
        new: dict[str, torch.Tensor] = {}
        for module_name, delta in self.deltas(backbone, weight=weight).items():
            base = modules[module_name].weight
            if tuple(base.shape) != tuple(delta.shape):
                raise IncompatibleAdapterError(f"adapter {self.name!r}: {module_name} is {tuple(base.shape)} in the "
                                               f"backbone but {tuple(delta.shape)} in the adapter.")
            value = base.detach().float() + delta.dense().to(base.device)
            if not torch.isfinite(value).all():
                raise InvalidArgumentError(f"fusing {self.name!r} at weight {weight} makes {module_name} non-finite; "
                                           f"nothing was changed.")
            new[module_name] = value.to(base.dtype)
        originals = {}
        with torch.no_grad():
            for module_name, value in new.items():
                parameter = modules[module_name].weight
                originals[module_name] = parameter.detach().clone()
                parameter.copy_(value)
        concept_tokens.add(backbone, self.name, self.tokens)
        fused[self.name] = originals

    def unfuse(self, backbone: Backbone) -> None:
        """Put back the weights `fuse` changed, exactly."""
        import torch

        from studio import concept_tokens

        originals = _fused(backbone).pop(self.name, None)
        if originals is None:
            raise InvalidArgumentError(f"adapter {self.name!r} is not fused into {backbone.source!r}.")
        concept_tokens.remove(backbone, self.name)
        modules = module_table(backbone)
        with torch.no_grad():
            for module_name, value in originals.items():
                modules[module_name].weight.copy_(value)


def _fused(backbone: Backbone) -> dict[str, dict[str, Any]]:
    if not hasattr(backbone, "fused_adapters"):
        backbone.fused_adapters = {}
    return backbone.fused_adapters


# -------------------------------------------------------------------------------- module naming


def components(backbone: Backbone) -> dict[str, torch.nn.Module]:
    """The pipeline's trainable parts by component name: the denoiser and the text encoders."""
    import torch

    return {name: module for name, module in backbone.pipe.components.items()
            if isinstance(module, torch.nn.Module) and (name in ("unet", "transformer") or name.startswith("text_encoder"))}


def module_table(backbone: Backbone) -> dict[str, torch.nn.Module]:
    """Every Linear / Conv2d of the components, by `<component>.<module path>` (PEFT wrappers seen
    through: the name is the base layer's)."""
    import torch

    table: dict[str, torch.nn.Module] = {}
    for component, model in components(backbone).items():
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                clean = re.sub(r"\.base_layer$", "", name)
                if ".lora_" in clean or ".oft_" in clean or ".boft_" in clean:
                    continue
                table[f"{component}.{clean}"] = module
    return table


# ------------------------------------------------------------------------------------- the file


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a `.safetensors` file; pickle files are refused with how to convert."""
    from safetensors import safe_open

    from studio.backbones import refuse_pickle

    path = Path(path)
    refuse_pickle(path)
    if not path.is_file():
        raise AdapterFileError(f"adapter file {str(path)!r} does not exist.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            metadata = handle.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for truncated/garbage files
        raise AdapterFileError(f"{str(path)!r} is not a readable .safetensors file ({error}).") from error
    return tensors, metadata


def write_adapter_file(path: str | Path, tensors: dict[str, torch.Tensor], manifest: dict[str, Any], *,
                       overwrite: bool = False, extra_metadata: dict[str, str] | None = None) -> Path:
    """`tensors` with the studio manifest and modelspec keys, written atomically."""
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise InvalidArgumentError(f"adapter file {str(path)!r} must end in .safetensors.")
    if path.exists() and not overwrite:
        raise InvalidArgumentError(f"{str(path)!r} exists; choose another name or pass overwrite=True (--overwrite).")
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise InvalidArgumentError(f"adapter tensors {bad[:3]} hold NaN or Inf; nothing was written.")
    metadata = {MANIFEST_KEY: json.dumps(manifest), **modelspec(manifest), **(extra_metadata or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


MODELSPEC_ARCH = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2", "sdxl": "stable-diffusion-xl-v1-base",
                  "sd3": "stable-diffusion-3", "flux": "flux-1-dev", "pixart": "pixart-sigma"}


MODELSPEC_KIND = {"controlnet": "controlnet", "t2i_adapter": "t2i-adapter", "ip_adapter": "ip-adapter"}


def modelspec(manifest: dict[str, Any]) -> dict[str, str]:
    """The Stability AI model-spec keys (what A1111, ComfyUI and kohya show for a file)."""
    kind = manifest["kind"]
    implementation = "https://github.com/huggingface/peft" if kind in ("lora", "dora", "orthogonal") else "studio"
    spec = {"modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": f"{MODELSPEC_ARCH.get(manifest['family'], manifest['family'])}/"
                                      f"{MODELSPEC_KIND.get(kind, 'lora')}",
            "modelspec.implementation": implementation,
            "modelspec.title": manifest.get("name") or kind,
            "modelspec.date": manifest.get("created", "")}
    if manifest.get("trigger_words"):
        spec["modelspec.trigger_phrase"] = ", ".join(manifest["trigger_words"])
    return spec


def load_adapter(path: str | Path, backbone: Backbone | None = None, *, allow_partial: bool = False) -> Adapter:
    """A studio adapter file, or a LoRA / LyCORIS file written by another tool (diffusers/PEFT, kohya,
    LyCORIS: reading those needs the `backbone` to map its key names), or a control model's diffusers folder."""
    from studio.adapters.control import ControlAdapter, hub_folder

    from studio.backbones import is_hub_id

    if Path(path).is_dir():  # a diffusers folder: a control model (ControlNet, T2I-Adapter)
        return ControlAdapter.from_folder(path, backbone)
    if not Path(path).exists() and is_hub_id(str(path)) and not str(path).endswith(".safetensors"):  # a control model's hub repo (lllyasviel/sd-controlnet-canny)
        return ControlAdapter.from_folder(hub_folder(str(path)), backbone)
    tensors, metadata = read_safetensors(path)
    if MANIFEST_KEY in metadata:
        manifest = json.loads(metadata[MANIFEST_KEY])
        adapter = adapter_kinds().get_or_raise(manifest.get("kind", "")).from_manifest(manifest, tensors)
    else:
        from studio.adapters.ip_adapter import IpAdapter, is_ip_adapter_file
        from studio.adapters.lora import LoraAdapter

        if backbone is None:
            raise AdapterFileError(f"{str(path)!r} has no studio manifest: it was written by another tool, and "
                                   f"reading it needs the backbone it is for (pass backbone=..., --backbone).")
        if is_ip_adapter_file(tensors):  # a published IP-Adapter (h94/IP-Adapter layout)
            adapter = IpAdapter.from_official(tensors, backbone, source=Path(path).name)
        else:
            adapter = LoraAdapter.from_foreign(tensors, metadata, backbone, allow_partial=allow_partial,
                                               source=Path(path).name)
    adapter.path = Path(path)
    return adapter

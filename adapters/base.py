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

import functools
import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from studio.errors import InvalidArgumentError, StudioError
from studio.home import atomic_path
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
    a new kind needs no line anywhere else. The package is scanned once: TrainConfig's option lookups, the
    CLI's flags and every `load_adapter` call here."""
    _import_kind_modules()
    return ADAPTERS


@functools.cache
def _import_kind_modules() -> None:
    import importlib
    import pkgutil

    import studio.adapters

    for module in pkgutil.iter_modules(studio.adapters.__path__):
        if module.name != "base":
            importlib.import_module(f"studio.adapters.{module.name}")


def register(kind: str) -> Callable[[type[Adapter]], type[Adapter]]:
    """Class decorator: `@register("lora")` names the kind and makes it loadable from files."""

    def decorate(cls: type[Adapter]) -> type[Adapter]:
        cls.kind = kind
        return ADAPTERS.register(kind)(cls)

    return decorate


def option(default: Any, help: str, *, keyword: str = "") -> Any:
    """A config field that is also one of the kind's training options: what a run sets through TrainConfig's
    `adapter` section, a recipe's `adapter:` and a `studio train` flag. `help` is the flag's help; `keyword` its
    name in TrainConfig and on the command line where that is not the field's (`concept_slots` for `slots`)."""
    return field(default=default, metadata={"help": help, "keyword": keyword or None})


@dataclass(frozen=True)
class KindAlias:
    """A kind name that trains another kind with some of its options set (`dora`: a `lora` with dora=True)."""

    kind: str
    options: dict[str, Any]


KIND_ALIASES: Registry[KindAlias] = Registry("adapter kind alias", UnknownAdapterKindError)


def register_alias(name: str, kind: str, **options: Any) -> None:
    """`name` trains as `kind` with `options` (its config's names) under the recipe's own."""
    KIND_ALIASES.add(name, KindAlias(kind, options))


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

    # training: the kind's own options and its hooks, which TrainConfig calls without naming any kind

    @classmethod
    def training_options(cls) -> dict[str, Any]:
        """The fields declared with `option`, by keyword (their TrainConfig and flag name), in field order."""
        return {f.metadata["keyword"] or f.name: f for f in fields(cls) if "help" in f.metadata}

    @classmethod
    def training_output(cls, stem: str, kind: str) -> str:
        """What a run of this kind writes when no output is given: `stem.safetensors`."""
        return f"{stem}.safetensors"

    @classmethod
    def prepare_training_options(cls, options: dict[str, Any], run: Any) -> None:
        """Complete or refuse `options` (this kind's, by field name; changed in place) for `run` (the TrainConfig,
        its recipe applied) before any model loads. Here: the output is one .safetensors file."""
        if not str(run.out).endswith(".safetensors"):
            raise InvalidArgumentError(f"out={run.out!r} must be a .safetensors file name.")


class Adapter:
    """Base of every kind: a config and its tensors; `attach` / `detach` on a backbone."""

    kind: ClassVar[str] = ""
    config_class: ClassVar[type[AdapterConfig]] = AdapterConfig
    weightless: ClassVar[bool] = False  # a kind with no tensors (its manifest says everything)
    label: ClassVar[str] = "adapter"  # how messages name an adapter of this kind ("IP-Adapter", "controlnet")
    # config options of a small instance on the tiny test backbones (tiny-sd1): the contract tests build every
    # registered kind with them, so a new kind is covered by declaring them here
    sample_options: ClassVar[dict[str, Any]] = {}

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
    def config_from(cls, manifest: dict[str, Any]) -> AdapterConfig:
        """The kind's config from a decoded manifest (`read_manifest`)."""
        return cls.config_class.from_dict({k: v for k, v in manifest.items() if k not in ("kind", "format_version")})

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Adapter:
        return cls(cls.config_from(manifest), tensors)

    # ---------------------------------------------------------------------------- on a backbone

    def check_backbone(self, backbone: Backbone) -> None:
        """Refuse a backbone of another family, or whose modules lack or reshape the targets, before
        anything is changed."""
        check_family(backbone, self.config.family, f"{self.label} {self.name!r}", self.config.base)
        modules = module_table(backbone)
        missing = [t for t in self.config.targets if t not in modules]
        if missing:
            raise IncompatibleAdapterError(
                f"adapter {self.name!r} changes {len(missing)} modules that {backbone.source!r} does not have "
                f"(e.g. {missing[0]}): it was made on {self.config.base or 'another model'} of the same family "
                f"with a different architecture."
            )

    def attach(self, backbone: Backbone, weight: Any = 1.0, **inputs: Any) -> None:
        """Attach to `backbone` at `weight` with the kind's run-time `inputs` (reference or control images...):
        the backbone is checked, then the kind's `_entry` checks the weight and inputs and makes its row of the
        attachments table (nothing changed yet), then `_apply` changes the backbone."""
        self.check_backbone(backbone)
        table = attachments(backbone)
        if self.name in table:
            raise InvalidArgumentError(f"{self.label} {self.name!r} is already attached to {backbone.source!r}; "
                                       f"detach it or rename one.")
        entry = {"adapter": self, "weight": weight, "inputs": dict(inputs), **self._entry(backbone, weight, inputs)}
        table[self.name] = entry
        try:
            self._apply(backbone, entry)
        except BaseException:
            table.pop(self.name, None)
            raise

    def detach(self, backbone: Backbone) -> None:
        """Undo `attach`: the backbone's modules, processors and outputs are those before it."""
        entry = self._attached(backbone)
        del attachments(backbone)[self.name]
        self._remove(backbone, entry)

    def set_weight(self, backbone: Backbone, weight: Any) -> None:
        """Change the weight of the attached adapter (no re-attach)."""
        entry = self._attached(backbone)
        entry["weight"] = self._reweight(backbone, entry, weight)

    def _attached(self, backbone: Backbone) -> dict[str, Any]:
        entry = attachments(backbone).get(self.name)
        if entry is None or entry.get("fused") is not None:
            raise InvalidArgumentError(f"{self.label} {self.name!r} is not attached to {backbone.source!r}.")
        return entry

    # the kind's hooks: `attach`, `detach` and `set_weight` above call them; the optional ones are no-ops here

    def _entry(self, backbone: Backbone, weight: Any, inputs: dict[str, Any]) -> dict[str, Any]:
        """Check `weight` and `inputs` and return the kind's own fields of its row (before any change)."""
        if inputs:
            raise InvalidArgumentError(f"a {self.kind} adapter takes no inputs, got {sorted(inputs)}.")
        return {}

    def _apply(self, backbone: Backbone, entry: dict[str, Any]) -> None:
        """Change the backbone so it computes with this adapter (its row is already in the table)."""
        raise NotImplementedError

    def _remove(self, backbone: Backbone, entry: dict[str, Any]) -> None:
        """Undo `_apply` exactly (the row is already out of the table)."""
        raise NotImplementedError

    def _reweight(self, backbone: Backbone, entry: dict[str, Any], weight: Any) -> Any:
        """Act at `weight` from now on; returns the weight as the row keeps it (checked, parsed)."""
        raise NotImplementedError

    def inputs_record(self, backbone: Backbone) -> dict[str, Any] | None:
        """The run-time inputs as a recipe keeps them (`attach(**record)` attaches the same way again), or
        None for a kind without inputs."""
        return None

    def prepare(self, backbone: Backbone, prompts: list[str], images_per_prompt: int = 1) -> None:
        """Before a generation of `prompts` (a kind that depends on the prompt sets itself for this call)."""

    def release(self) -> None:
        """After that generation: undo what `prepare` set."""

    @classmethod
    def call_arguments(cls, backbone: Backbone, guidance: float) -> dict[str, Any]:
        """Arguments this kind's attached adapters add to the diffusers call (image embeddings...)."""
        return {}

    # file readers: how `load_adapter` reads what studio did not write (each kind declares its own)
    # the order in which kinds are asked, set by a kind on itself (subclasses do not inherit it); 0: none
    reads: ClassVar[int] = 0

    @classmethod
    def read_folder(cls, path: str | Path, backbone: Backbone | None) -> Adapter | None:
        """An adapter of this kind from a folder or a hub id, or None when `path` is not one of its."""
        return None

    @classmethod
    def read_foreign(cls, path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                     backbone: Backbone, *, allow_partial: bool = False) -> Adapter | None:
        """An adapter of this kind from a `.safetensors` file another tool wrote, or None when it is not one."""
        return None


class Trainable:
    """The protocol the run loop (`studio.training.trainer.run_loop`: `Run`, the erasers' `EraseRun`) calls on a
    kind that trains: `create` one, attach it, train its `trainable_parameters`, read the values back
    (`sync_from`) for checkpoints and the file, put a checkpoint's back (`load_values`). A trainable kind
    subclasses it next to `Adapter`; `studio train --kind` offers the registered ones."""

    # what each training example feeds the kind besides its latent and caption: "image_embeds" (the image read
    # as its own prompt: `embed_images`) or "control" (its control map: `condition_tensors`)
    example_inputs: ClassVar[tuple[str, ...]] = ()
    # trained from a reference folder (`studio train`); False for a kind another run makes (erasers: `studio erase`)
    from_folder: ClassVar[bool] = True

    @classmethod
    def create(cls, backbone: Backbone, config: AdapterConfig, *, seed: int = 0) -> Adapter:
        """A fresh adapter to train (the identity, or as its paper initialises it)."""
        raise NotImplementedError

    def trainable_parameters(self, backbone: Backbone) -> dict[str, list[torch.nn.Parameter]]:
        """The attached adapter's parameters by group (optimizer groups: `lora_B` takes LoRA+'s ratio), trainable."""
        raise NotImplementedError

    def sync_from(self, backbone: Backbone) -> None:
        """Read the attached (trained) values back into `tensors`."""
        raise NotImplementedError

    def load_values(self, backbone: Backbone, tensors: dict[str, torch.Tensor]) -> None:
        """Put `tensors` (this adapter's layout: a checkpoint's) into the attached adapter."""
        raise NotImplementedError

    def training_note(self, backbone: Backbone, trigger: str = "") -> str | None:
        """A line the run logs once the adapter is made (what a user should know of this run), or None."""
        return None


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
        table = attachments(backbone)
        if table.get(self.name, {}).get("fused") is not None:
            raise InvalidArgumentError(f"adapter {self.name!r} is already fused into {backbone.source!r}.")
        if self.name in table:
            raise InvalidArgumentError(f"adapter {self.name!r} is attached to {backbone.source!r}; detach it before "
                                       f"fusing it.")
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
        table[self.name] = {"adapter": self, "weight": weight, "inputs": {}, "fused": originals}

    def unfuse(self, backbone: Backbone) -> None:
        """Put back the weights `fuse` changed, exactly."""
        import torch

        from studio import concept_tokens

        table = attachments(backbone)
        originals = table.get(self.name, {}).get("fused")
        if originals is None:
            raise InvalidArgumentError(f"adapter {self.name!r} is not fused into {backbone.source!r}.")
        del table[self.name]
        concept_tokens.remove(backbone, self.name)
        modules = module_table(backbone)
        with torch.no_grad():
            for module_name, value in originals.items():
                modules[module_name].weight.copy_(value)


def attachments(backbone: Backbone) -> dict[str, dict[str, Any]]:
    """The backbone's one table of what is attached, in attach order: name -> row. A row holds "adapter",
    "weight", "inputs" (as given to `attach`), "fused" (the weights a fused adapter replaced; absent when
    attached unfused) and the kind's own fields (`Adapter._entry`)."""
    return backbone.__dict__.setdefault("attachments", {})


def attached_of(backbone: Backbone, kind: type[Adapter]) -> dict[str, dict[str, Any]]:
    """The rows of adapters of `kind` (subclasses too) attached unfused, in attach order."""
    return {name: entry for name, entry in attachments(backbone).items()
            if isinstance(entry["adapter"], kind) and entry.get("fused") is None}


def check_family(backbone: Backbone, family: str, what: str, base: str = "") -> None:
    """Refuse `backbone` when it is not of `family`, the one `what` (an adapter, a config) was made for:
    the one family check of every kind, done before anything changes."""
    if backbone.family.name != family:
        raise IncompatibleAdapterError(
            f"{what} was made for {family} ({base or 'unknown base'}), but the backbone {backbone.source!r} is "
            f"{backbone.family.name}; load a {family} backbone or use one made for {backbone.family.name}.")


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


def read_manifest(metadata: dict[str, str], where: str | Path = "") -> dict[str, Any] | None:
    """The studio manifest of a file's metadata, decoded; None when it has none (another tool wrote the file)."""
    text = metadata.get(MANIFEST_KEY)
    if text is None:
        return None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as error:
        manifest = error
    if not isinstance(manifest, dict):
        raise AdapterFileError(f"{str(where)!r}: its {MANIFEST_KEY} metadata is not a JSON object ({manifest}); the "
                               f"file was damaged or edited: write it again from its source.")
    return manifest


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
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
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
    """A studio adapter file, or what another tool wrote and a kind reads (`Adapter.read_folder`,
    `Adapter.read_foreign`): LoRA / LyCORIS files of diffusers/PEFT, kohya and LyCORIS, published IP-Adapters
    (reading those needs the `backbone` to map their key names), control models' diffusers folders or hub ids."""
    readers = sorted({klass for cls in adapter_kinds().values() for klass in cls.__mro__ if klass.__dict__.get("reads")},
                     key=lambda cls: cls.reads)
    for reader in readers:
        adapter = reader.read_folder(path, backbone)
        if adapter is not None:
            return adapter
    tensors, metadata = read_safetensors(path)
    manifest = read_manifest(metadata, path)
    if manifest is not None:
        adapter = adapter_kinds().get_or_raise(manifest.get("kind", "")).from_manifest(manifest, tensors)
    else:
        if backbone is None:
            raise AdapterFileError(f"{str(path)!r} has no studio manifest: it was written by another tool, and "
                                   f"reading it needs the backbone it is for (pass backbone=..., --backbone).")
        adapter = next((found for reader in readers
                        if (found := reader.read_foreign(Path(path), tensors, metadata, backbone,
                                                         allow_partial=allow_partial)) is not None), None)
        if adapter is None:
            raise AdapterFileError(f"{str(path)!r} has no studio manifest and no kind reads its keys "
                                   f"(e.g. {next(iter(tensors), 'none')!r}).")
    adapter.path = Path(path)
    return adapter

"""LoRA and DoRA: low-rank weight changes, attached unfused through PEFT or fused into the weights.

The tensors are kept in the diffusers/PEFT layout (`unet.<module>.lora_A.weight` (r, in),
`.lora_B.weight` (out, r), DoRA's `.lora_magnitude_vector` (out,)), with the alpha/rank scale folded
into `lora_B`, so a studio LoRA file is also a file `pipe.load_lora_weights` reads. Files written by
other tools (kohya, LyCORIS, older diffusers) are read by `studio.lora_formats` into the same form.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.adapters.base import (
    AdapterConfig,
    IncompatibleAdapterError,
    Trainable,
    WeightAdapter,
    attached_of,
    components,
    module_table,
    option,
    register,
    register_alias,
)

from studio import concept_tokens
from studio.blocks import parse_weight
from studio.errors import InvalidArgumentError
from studio.limits import check_rank

if TYPE_CHECKING:
    import torch

    from studio.backbones import Backbone
    from studio.deltas import Delta

# Which modules a LoRA trains, by preset: attention projections (the kohya / diffusers default),
# every linear layer, or every linear and conv layer (kohya's LoCon).
TARGET_PRESETS = {
    "attention": r"(attn\d?|attention|self_attn)\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out"
                 r"|q_proj|k_proj|v_proj|out_proj)$",
    "all-linear": r".*",
    "locon": r".*",
    # the attention and feed-forward layers inside the transformer blocks (UNet and DiT; what SD3/Flux LoRA
    # trainers target), without a DiT's adaLN modulation, timestep/text embedders and output layer: those read
    # what every prompt shares (the timestep, the pooled text), so changing them moves every prompt (world-dit,
    # README: base shapes -1 / -4 points against -8 / -9 with locon, the new concept 6-9 points lower)
    "blocks": r"transformer_blocks\.\d+\.(attn\d?\.|ff\.|ff_context\.|proj_mlp$|proj_out$)",
}
SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector")


@dataclass(kw_only=True)
class LoraConfig(AdapterConfig):
    rank: int = option(16, "Rank [default: the recipe's].")
    alpha: float | None = option(None, "kohya's alpha: B's forward scale alpha / rank while training (with Adam: "
                                       "its learning rate x alpha / rank) [default: the recipe's, else rank].")
    dora: bool = option(False, "DoRA (Liu et al. 2024, arXiv:2402.09353): magnitude and direction trained apart.")
    target: str = option("attention", f"{', '.join(TARGET_PRESETS)}, or a regex over module names.")
    text_encoder: bool = option(False, "Train the text encoders' attention too.")
    source_format: str = "studio"  # studio | diffusers | kohya | lycoris: who wrote the file

    def __post_init__(self):
        super().__post_init__()
        check_lora_rank(self.rank)
        if self.alpha is not None and not self.alpha > 0:
            raise InvalidArgumentError(f"alpha={self.alpha!r} must be > 0, or None for alpha = rank.")
        if self.target not in TARGET_PRESETS:
            try:
                re.compile(self.target)
            except re.error as error:
                raise InvalidArgumentError(f"target={self.target!r} is neither a preset "
                                           f"({', '.join(TARGET_PRESETS)}) nor a valid regular expression: {error}.") from error

    @classmethod
    def prepare_training_options(cls, options: dict[str, Any], run: Any) -> None:
        """A run's rank is checked before any model loads."""
        if options.get("rank") is not None:
            check_lora_rank(options["rank"])
        super().prepare_training_options(options, run)


def check_lora_rank(rank: Any) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise InvalidArgumentError(f"rank={rank!r} must be an integer >= 1 (e.g. 16).")


register_alias("dora", "lora", dora=True)  # DoRA trains as a LoRA with dora=True


def target_modules(backbone: Backbone, target: str = "attention", *, text_encoder: bool = False) -> list[str]:
    """The module names (`<component>.<path>`) a LoRA with this target preset or pattern changes."""
    import torch

    pattern = re.compile(TARGET_PRESETS.get(target, target))
    names = []
    for name, module in module_table(backbone).items():
        component = name.split(".", 1)[0]
        if component.startswith("text_encoder") and not text_encoder:
            continue
        if isinstance(module, torch.nn.Conv2d) and target != "locon":
            continue
        if component in ("unet", "transformer") and target == "all-linear" and not isinstance(module, torch.nn.Linear):
            continue
        if pattern.search(name.split(".", 1)[1]):
            names.append(name)
    if not names:
        raise InvalidArgumentError(f"target={target!r} matches no module of {backbone.source!r}.")
    return names


def layer_widths(modules: dict[str, Any], names: list[str]) -> list[int]:
    """Each module's smaller side (out features, or in x kernel for a conv): the most a LoRA rank can use."""
    return [min(modules[n].weight.shape[0], modules[n].weight[0].numel()) for n in names]


def _split(key: str) -> tuple[str, str]:
    """`unet.a.b.lora_A.weight` -> (`unet.a.b`, `.lora_A.weight`)."""
    for suffix in SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix
    raise InvalidArgumentError(f"{key!r} is not a LoRA tensor name (expected one ending in {', '.join(SUFFIXES)}).")


class PeftAdapter(WeightAdapter, Trainable):
    """A weight-space kind that PEFT injects (LoRA, DoRA, orthogonal LoRA, OFT, BOFT). `tensors` are
    PEFT's state dict per component, keyed `<component>.<PEFT key without the adapter name>`."""

    suffixes: tuple[str, ...] = ()

    def target_names(self) -> list[str]:
        """The module names the tensors belong to."""
        return sorted({next(k[: -len(s)] for s in self.suffixes if k.endswith(s)) for k in self.tensors})

    def peft_config(self, names: list[str]):
        """The PEFT config that injects this adapter into these modules of one component."""
        raise NotImplementedError

    def _entry(self, backbone: Backbone, weight: Any, inputs: dict[str, Any]) -> dict[str, Any]:
        super()._entry(backbone, weight, inputs)
        concept_tokens.check(backbone, self.name, self.tokens)
        return {"weight": parse_weight(weight, what="adapter weight")}

    def _apply(self, backbone: Backbone, entry: dict[str, Any]) -> None:
        """Inject unfused through PEFT, at the row's weight; other attached adapters stay active."""
        from peft import inject_adapter_in_model

        parts = components(backbone)
        by_component: dict[str, list[str]] = {}
        for name in self.target_names():
            by_component.setdefault(name.split(".", 1)[0], []).append(name)
        for component, names in by_component.items():
            with warnings.catch_warnings():  # PEFT warns whenever a second adapter joins a model
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                inject_adapter_in_model(self.peft_config(names), parts[component], adapter_name=self.name)
        self.load_values(backbone, self.tensors)
        concept_tokens.add(backbone, self.name, self.tokens)
        activate(backbone)

    def load_values(self, backbone: Backbone, tensors: dict[str, torch.Tensor]) -> None:
        """Put `tensors` (this adapter's layout) into its injected PEFT layers (attach, resume)."""
        from peft import set_peft_model_state_dict

        for component, model in components(backbone).items():
            state = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == component}
            if not state:
                continue
            result = set_peft_model_state_dict(model, state, adapter_name=self.name)
            unexpected = [k for k in result.unexpected_keys if self.name in k]
            if unexpected:
                raise IncompatibleAdapterError(f"adapter {self.name!r}: PEFT did not place {unexpected[:3]}.")

    def _reweight(self, backbone: Backbone, entry: dict[str, Any], weight: Any) -> Any:
        entry["weight"] = parse_weight(weight, what="adapter weight")
        activate(backbone)
        return entry["weight"]

    def _remove(self, backbone: Backbone, entry: dict[str, Any]) -> None:
        """Remove the adapter's layers; once none is left a module is unwrapped, so the backbone's
        modules, state-dict keys and outputs are exactly those before `attach`."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        concept_tokens.remove(backbone, self.name)
        for model in components(backbone).values():
            for parent in list(model.modules()):
                for child_name, child in list(parent.named_children()):
                    if not isinstance(child, BaseTunerLayer):
                        continue
                    if self.name in child._get_available_adapters():
                        child.delete_adapter(self.name)
                    if not child._get_available_adapters():
                        setattr(parent, child_name, child.get_base_layer())
            config = getattr(model, "peft_config", None)
            if isinstance(config, dict):
                config.pop(self.name, None)
                if not config:
                    del model.peft_config
        activate(backbone)

    # ------------------------------------------------------------------------------------ training

    def trainable_parameters(self, backbone: Backbone) -> dict[str, list[torch.nn.Parameter]]:
        """The attached adapter's parameters by PEFT sub-layer (`lora_A`, `lora_B`, `oft_R`...), made
        trainable; everything else stays frozen."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        groups: dict[str, list[torch.nn.Parameter]] = {}
        for model in components(backbone).values():
            for module in model.modules():
                if isinstance(module, BaseTunerLayer) and self.name in module._get_available_adapters():
                    for layer_name in module.adapter_layer_names:
                        layer = getattr(module, layer_name)
                        if self.name in layer and self.trains(layer_name):
                            groups.setdefault(layer_name, []).extend(_params(layer[self.name]))
        for params in groups.values():
            for p in params:
                p.requires_grad_(True)
        return groups

    def trains(self, layer_name: str) -> bool:
        """Whether the PEFT sub-layer `layer_name` (lora_A, lora_B, ...) trains."""
        return True

    def sync_from(self, backbone: Backbone) -> None:
        """Read the attached (trained) values back into `tensors`."""
        from peft import get_peft_model_state_dict

        tensors = {}
        for component, model in components(backbone).items():
            if not any(n.startswith(component + ".") for n in self.target_names()):
                continue
            state = get_peft_model_state_dict(model, adapter_name=self.name)
            tensors |= {f"{component}.{k}": v.detach().clone() for k, v in state.items()}
        self.tensors = tensors


def _params(layer) -> list[torch.nn.Parameter]:
    import torch

    return [layer] if isinstance(layer, torch.nn.Parameter) else list(layer.parameters())


@register("lora")
class LoraAdapter(PeftAdapter):
    """A LoRA (or DoRA when `config.dora`): `tensors` in the PEFT layout with the scale folded in."""

    config_class = LoraConfig
    suffixes = SUFFIXES

    def __init__(self, config: LoraConfig, tensors: dict[str, torch.Tensor]):
        super().__init__(config, tensors)
        if not config.targets:
            config.targets = self.target_names()

    # ------------------------------------------------------------------------------- construction

    @classmethod
    def create(cls, backbone: Backbone, config: LoraConfig, *, seed: int = 0) -> LoraAdapter:
        """A fresh adapter to train: lora_A as PEFT initialises it (Kaiming-uniform), lora_B zero, so
        it starts as the identity; DoRA magnitudes start at the base weights' row norms."""
        import torch

        generator = torch.Generator().manual_seed(seed)
        modules = module_table(backbone)
        config.targets = target_modules(backbone, config.target, text_encoder=config.text_encoder)
        config.family, config.base = backbone.family.name, config.base or backbone.source
        check_rank(config.rank, layer_widths(modules, config.targets))
        tensors = {}
        for name in config.targets:
            weight = modules[name].weight
            fan_in = weight[0].numel()
            bound = 1 / math.sqrt(fan_in)  # PEFT's kaiming_uniform_(a=sqrt(5)) bound
            tensors[f"{name}.lora_A.weight"] = (torch.rand(config.rank, *weight.shape[1:], generator=generator)
                                                * 2 - 1) * bound
            tensors[f"{name}.lora_B.weight"] = torch.zeros(weight.shape[0], config.rank,
                                                           *([1, 1] if weight.dim() == 4 else []))
            if config.dora:
                tensors[f"{name}.lora_magnitude_vector"] = weight.detach().float().flatten(1).norm(dim=1)
        return cls(config, tensors)
    @classmethod
    def from_deltas(cls, deltas: dict[str, Delta], config: LoraConfig) -> LoraAdapter:
        """From per-module deltas (dense ones become exact low-rank factors by SVD)."""
        from studio.deltas import Dense

        tensors = {}
        for name, delta in deltas.items():
            low = (delta.low_rank() if isinstance(delta, Dense) else delta).folded()
            tensors[f"{name}.lora_A.weight"] = low.down.contiguous()
            tensors[f"{name}.lora_B.weight"] = low.up.contiguous()
        config.targets = sorted(deltas)
        return cls(config, tensors)

    reads = 100  # asked last: any LoRA-like file another tool wrote

    @classmethod
    def read_foreign(cls, path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                     backbone: Backbone, *, allow_partial: bool = False) -> LoraAdapter:
        return cls.from_foreign(tensors, metadata, backbone, allow_partial=allow_partial, source=path.name)

    @classmethod
    def from_foreign(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str], backbone: Backbone, *,
                     allow_partial: bool = False, source: str = "") -> LoraAdapter:
        """A LoRA / LoCon / LoHa / LoKr file written by diffusers, PEFT, kohya or LyCORIS."""
        from studio.lora_formats import read_foreign

        tensors, tokens = concept_tokens.split(tensors)  # embeddings bundled A1111's way
        deltas, magnitudes, layout = read_foreign(tensors, metadata, backbone, allow_partial=allow_partial,
                                                  source=source)
        ranks = Counter(d.rank for d in deltas.values() if hasattr(d, "rank"))
        config = LoraConfig(family=backbone.family.name, base=backbone.source, name=source.rsplit(".", 1)[0],
                            rank=ranks.most_common(1)[0][0] if ranks else 1, dora=bool(magnitudes),
                            source_format=layout)
        adapter = cls.from_deltas(deltas, config)
        for name, magnitude in magnitudes.items():
            adapter.tensors[f"{name}.lora_magnitude_vector"] = magnitude
        adapter.tokens = tokens
        return adapter

    # ----------------------------------------------------------------------------------- deltas

    def factors(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per module: {"down": lora_A, "up": lora_B[, "magnitude": ...]}."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        names = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora_magnitude_vector": "magnitude"}
        for key, value in self.tensors.items():
            module, suffix = _split(key)
            out.setdefault(module, {})[names[suffix]] = value
        return out

    def deltas(self, backbone: Backbone | None = None, *, weight: float = 1.0) -> dict[str, Delta]:
        """Low-rank per module; DoRA's change depends on the base weight, so it needs the backbone
        and comes back dense."""
        from studio.deltas import Dense, LowRank

        result: dict[str, Delta] = {}
        modules = module_table(backbone) if backbone is not None else {}
        for name, f in self.factors().items():
            rank = float(f["down"].shape[0])
            low = LowRank(up=f["up"].float() * weight, down=f["down"].float(), alpha=rank)
            if "magnitude" not in f:
                result[name] = low
                continue
            if backbone is None:
                raise InvalidArgumentError(f"{self.name!r} is a DoRA: its change depends on the base weights; "
                                           f"pass the backbone.")
            # DoRA: W' = m (W + w BA) / ||W + w BA||, norms per output row (arXiv:2402.09353 eq. 5; PEFT's weighting)
            base = modules[name].weight.detach().float()
            changed = base + low.dense()
            norm = changed.flatten(1).norm(dim=1).view(-1, *([1] * (changed.dim() - 1)))
            result[name] = Dense(f["magnitude"].float().view_as(norm) * changed / norm - base)
        return result

    # ---------------------------------------------------------------------------- attach/detach

    def check_backbone(self, backbone: Backbone) -> None:
        super().check_backbone(backbone)
        modules = module_table(backbone)
        for name, f in self.factors().items():
            weight = modules[name].weight
            want = (weight.shape[0], weight[0].numel())
            got = (f["up"].shape[0], f["down"][0].numel())
            if want != got:
                raise IncompatibleAdapterError(
                    f"adapter {self.name!r} changes {name} as {got[0]}x{got[1]}, but in {backbone.source!r} it is "
                    f"{want[0]}x{want[1]}: the adapter was made on {self.config.base or 'another model'}."
                )

    def peft_config(self, names: list[str]):
        """One PEFT LoraConfig for these modules of one component (ranks per module; alpha = rank,
        since the scale is folded into lora_B)."""
        from peft import LoraConfig as PeftLoraConfig

        factors = self.factors()
        ranks = {n.split(".", 1)[1]: factors[n]["down"].shape[0] for n in names}
        common = Counter(ranks.values()).most_common(1)[0][0]
        pattern = {f"^{re.escape(k)}$": r for k, r in ranks.items() if r != common}
        return PeftLoraConfig(r=common, lora_alpha=common, target_modules=sorted(ranks), rank_pattern=pattern,
                              alpha_pattern=pattern, use_dora=self.config.dora, init_lora_weights=False)


def attached_adapters(backbone: Backbone) -> dict[str, dict[str, Any]]:
    """The rows of the weight adapters PEFT injected (attached unfused), in attach order."""
    return attached_of(backbone, PeftAdapter)


def activate(backbone: Backbone) -> None:
    """Every attached adapter active in every PEFT layer that has it, each at its weight."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    from studio.blocks import weight_of

    attached = attached_adapters(backbone)
    for component, model in components(backbone).items():
        for path, module in model.named_modules():
            if not isinstance(module, BaseTunerLayer):
                continue
            present = [n for n in attached if n in module._get_available_adapters()]
            if not present:
                continue
            module.set_adapter(present)
            for name in present:
                if isinstance(module, LoraLayer):  # OFT/BOFT layers have no scale (attached at 1)
                    module.set_scale(name, weight_of(attached[name]["weight"], f"{component}.{path}"))
            for parameter in module.parameters():
                parameter.requires_grad_(False)  # PEFT's set_adapter marks active adapters trainable


class without:
    """Inside the block the backbone computes as if `adapter` were not attached (a reference for a
    loss): its LoRA layers at scale 0, its DoRA and OFT/BOFT layers switched off by PEFT's own flag (a
    DoRA layer at scale 0 still rescales its weight; the flag turns off every adapter of such a layer).
    Set directly: `set_weight` would re-run PEFT's set_adapter, which resets what trains."""

    def __init__(self, backbone: Backbone, adapter: PeftAdapter):
        from peft.tuners.lora import LoraLayer
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.name = adapter.name
        layers = [m for model in components(backbone).values() for m in model.modules()
                  if isinstance(m, BaseTunerLayer) and self.name in m._get_available_adapters()]
        self.scaled = [m for m in layers if isinstance(m, LoraLayer) and not m.use_dora.get(self.name, False)]
        scaled = {id(m) for m in self.scaled}
        self.switched = [m for m in layers if id(m) not in scaled]

    def __enter__(self) -> without:
        self.saved = [layer.scaling[self.name] for layer in self.scaled]
        self.flags = [layer._disable_adapters for layer in self.switched]
        for layer in self.scaled:
            layer.scaling[self.name] = 0.0
        for layer in self.switched:
            layer._disable_adapters = True
        return self

    def __exit__(self, *exc: Any) -> None:
        for layer, value in zip(self.scaled, self.saved, strict=True):
            layer.scaling[self.name] = value
        for layer, flag in zip(self.switched, self.flags, strict=True):
            layer._disable_adapters = flag

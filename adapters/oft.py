"""Orthogonal fine-tuning through PEFT: OFT (Qiu et al. 2023, arXiv:2306.07280) rotates each target
layer's input space with a block-diagonal orthogonal matrix (Cayley transform of a skew-symmetric
one, identity at start); BOFT (Liu et al. 2024, arXiv:2311.06243) builds the rotation from butterfly
factors, so few parameters reach every input. Rotations keep the layer's hyperspherical energy, which
is why they forget less of the base model than additive LoRA.

Their change to a weight is not low-rank: `deltas` gives it dense (computed by PEFT's own merge on a
copy of the layer), so the merge engine and `fuse` treat them like any other weight-space kind.
"""

from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from studio.adapters.base import AdapterConfig, module_table, option, register
from studio.adapters.lora import TARGET_PRESETS, PeftAdapter, target_modules

from studio.errors import InvalidArgumentError

if TYPE_CHECKING:

    from studio.backbones import Backbone
    from studio.deltas import Delta


@dataclass(kw_only=True)
class OftConfig(AdapterConfig):
    block_size: int = option(8, "size of each orthogonal block (PEFT's oft_block_size) [default: the recipe's].",
                             keyword="oft_block_size")
    coft: bool = False  # constrained OFT: keep ||R - I|| <= eps
    eps: float = 6e-5
    target: str = option("attention", "attention or all-linear: the linear layers OFT rotates.")
    text_encoder: bool = option(False, "Rotate the text encoders' attention too.")

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.block_size, int) or self.block_size < 2:
            raise InvalidArgumentError(f"block_size={self.block_size!r} must be an integer >= 2 (e.g. 8).")
        if self.target not in TARGET_PRESETS or self.target == "locon":
            raise InvalidArgumentError(f"target={self.target!r}: OFT acts on linear layers; use attention or all-linear.")


@dataclass(kw_only=True)
class BoftConfig(OftConfig):
    butterfly_factors: int = 2  # BOFT's m: more factors reach more of the input space


@register("oft")
class OftAdapter(PeftAdapter):
    config_class = OftConfig
    sample_options = {"block_size": 4}
    pattern = re.compile(r"\.oft_[A-Za-z_]+(\.weight)?$")

    def target_names(self) -> list[str]:
        return self.config.targets or sorted({self.pattern.split(k)[0] for k in self.tensors})

    def peft_config(self, names: list[str]):
        from peft import OFTConfig

        return OFTConfig(r=0, oft_block_size=self.config.block_size, coft=self.config.coft, eps=self.config.eps,
                         target_modules=sorted(n.split(".", 1)[1] for n in names), init_weights=True)

    @classmethod
    def create(cls, backbone: Backbone, config: OftConfig, *, seed: int = 0) -> OftAdapter:
        """Identity rotations on the target layers whose input size the block size divides."""
        modules = module_table(backbone)
        names = target_modules(backbone, config.target, text_encoder=config.text_encoder)
        config.targets = [n for n in names if modules[n].weight.shape[1] % config.block_size == 0]
        if not config.targets:
            raise InvalidArgumentError(f"block_size={config.block_size} divides the input size of no target layer "
                                       f"of {backbone.source!r}; try 4 or 8.")
        config.family, config.base = backbone.family.name, config.base or backbone.source
        adapter = cls(config, {})
        adapter.attach(backbone)
        adapter.sync_from(backbone)
        adapter.detach(backbone)
        return adapter

    def _entry(self, backbone: Backbone, weight: Any, inputs: dict[str, Any]) -> dict[str, Any]:
        self._check_whole(weight)
        return super()._entry(backbone, weight, inputs)

    def _reweight(self, backbone: Backbone, entry: dict[str, Any], weight: Any) -> Any:
        self._check_whole(weight)
        return super()._reweight(backbone, entry, weight)

    def _check_whole(self, weight: Any) -> None:
        if weight != 1.0:
            raise InvalidArgumentError(f"{self.kind} rotates weights and has no partial strength when attached "
                                       f"(weight={weight}); fuse it with a weight instead, which blends the change.")

    def deltas(self, backbone: Backbone | None = None, *, weight: float = 1.0) -> dict[str, Delta]:
        """ΔW per layer, from PEFT's merge applied to a copy of the layer."""
        import torch
        from peft import inject_adapter_in_model, set_peft_model_state_dict

        from studio.deltas import Dense

        if backbone is None:
            raise InvalidArgumentError(f"{self.kind}'s change is a rotation of the base weights; pass the backbone.")
        modules = module_table(backbone)
        result: dict[str, Delta] = {}
        for name in self.target_names():
            holder = torch.nn.Module()  # a one-layer model for PEFT to inject into
            holder.add_module("layer", copy.deepcopy(modules[name]))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # BOFT's note that its CUDA kernel is absent on CPU
                inject_adapter_in_model(self.peft_config(["x.layer"]), holder, adapter_name=self.name)
            state = {f"layer{k[len(name):]}": v for k, v in self.tensors.items() if k.startswith(name + ".")}
            set_peft_model_state_dict(holder, state, adapter_name=self.name)
            layer = holder.layer
            layer.merge(adapter_names=[self.name])
            merged = layer.get_base_layer().weight.detach().float()
            result[name] = Dense((merged - modules[name].weight.detach().float()) * weight)
        return result


@register("boft")
class BoftAdapter(OftAdapter):
    config_class = BoftConfig
    pattern = re.compile(r"\.boft_[A-Za-z_]+(\.weight)?$")

    def peft_config(self, names: list[str]):
        from peft import BOFTConfig

        return BOFTConfig(boft_block_size=self.config.block_size, boft_n_butterfly_factor=self.config.butterfly_factors,
                          target_modules=sorted(n.split(".", 1)[1] for n in names), init_weights=True)


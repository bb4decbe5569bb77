"""Householder reflection adaptation through PEFT: HRA (Yuan et al. 2024, arXiv:2405.17484, "Bridging The Gap
between Low-rank and Orthogonal Adaptation via Householder Reflection Adaptation") multiplies each target layer's
weight by a chain of r Householder reflections, W' = W (I - 2 u₁u₁ᵀ/‖u₁‖²) ... (I - 2 u_r u_rᵀ/‖u_r‖²): an
orthogonal change like OFT's (it keeps the layer's hyperspherical energy) whose rank-r form is LoRA-like (the
change W' - W has rank <= r). With `apply_gs` the u's are Gram-Schmidt orthogonalised first, the paper's
regularised variant. The u's start in pairs that cancel, so a new adapter is the identity.

Like OFT it rotates and has no partial strength when attached (a weight other than 1 is refused; fusing with a
weight blends the change); `deltas` gives the change dense, by PEFT's own merge on a copy of the layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from studio.adapters.base import AdapterConfig, module_table, option, register
from studio.adapters.lora import TARGET_PRESETS, target_modules
from studio.adapters.oft import OftAdapter

from studio.errors import InvalidArgumentError

if TYPE_CHECKING:
    from studio.backbones import Backbone


@dataclass(kw_only=True)
class HraConfig(AdapterConfig):
    rank: int = option(8, "number of Householder reflections per layer (even: they start in cancelling pairs).")
    apply_gs: bool = option(False, "Gram-Schmidt orthogonalise the reflections (HRA's regularised variant).")
    target: str = option("attention", "attention, all-linear or locon: the layers HRA reflects.")
    text_encoder: bool = option(False, "Reflect the text encoders' attention too.")

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 2 or self.rank % 2:
            raise InvalidArgumentError(f"rank={self.rank!r} must be an even integer >= 2 (e.g. 8): HRA's reflections "
                                       f"start in pairs that cancel.")
        if self.target not in TARGET_PRESETS:
            raise InvalidArgumentError(f"target={self.target!r}; choose one of {', '.join(TARGET_PRESETS)}.")


@register("hra")
class HraAdapter(OftAdapter):
    """HRA: the reflections' vectors `hra_u` (in_features, r) per layer, in the PEFT layout."""

    config_class = HraConfig
    sample_options = {"rank": 2}
    pattern = re.compile(r"\.hra_[A-Za-z_]+(\.weight)?$")

    def peft_config(self, names: list[str]):
        from peft import HRAConfig

        return HRAConfig(r=self.config.rank, apply_GS=self.config.apply_gs, init_weights=True,
                         target_modules=sorted(n.split(".", 1)[1] for n in names))

    @classmethod
    def create(cls, backbone: Backbone, config: HraConfig, *, seed: int = 0) -> HraAdapter:
        """Identity reflections (cancelling pairs, PEFT's initialisation) on the target layers wider than the rank."""
        import torch

        modules = module_table(backbone)
        names = target_modules(backbone, config.target, text_encoder=config.text_encoder)
        config.targets = [n for n in names if modules[n].weight[0].numel() > config.rank]
        if not config.targets:
            raise InvalidArgumentError(f"rank={config.rank} is not below the input size of any target layer of "
                                       f"{backbone.source!r}; lower it.")
        config.family, config.base = backbone.family.name, config.base or backbone.source
        adapter = cls(config, {})
        with torch.random.fork_rng(devices=[]):  # PEFT draws the first of each pair from torch's generator
            torch.manual_seed(seed)
            adapter.attach(backbone)
        adapter.sync_from(backbone)
        adapter.detach(backbone)
        return adapter

"""Orthogonal adaptation (Po et al. 2024, arXiv:2312.02432): LoRAs trained apart that merge by summing.

Per target layer there is one orthogonal basis O (m x m, m = the layer's input size), the same for
everyone: it follows from the layer's name and size and a public seed. An adapter's input-side factor
(PEFT's lora_A, the paper's B_i^T) is r columns of O chosen by the adapter's own concept seed, and is
frozen; only the output side (lora_B) trains. Two adapters with disjoint columns then have
B_i^T B_j = 0: each one's update ignores the inputs the other one reads, and their sum interferes
little. The file is a standard LoRA (any LoRA loader reads it); the manifest keeps the basis seed and
the columns per module, which the merge plan uses to report overlap.

The basis is a randomised DCT, O = diag(s) P C (C the orthonormal DCT-II matrix, P a random row
permutation, s random signs), rather than the QR of a Gaussian matrix: any of its columns costs O(m)
and is bit-identical on every machine, where a QR costs O(m^3) per layer (minutes for SDXL's 5120-wide
layers) and depends on the LAPACK build. It is exactly orthogonal, which is all the method needs.
"""

from __future__ import annotations

import math
import warnings
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from studio.adapters.base import module_table, option, register
from studio.adapters.lora import LoraAdapter, LoraConfig, layer_widths, target_modules

from studio.errors import InvalidArgumentError
from studio.limits import check_rank

if TYPE_CHECKING:

    from studio.backbones import Backbone

PUBLIC_BASIS_SEED = 20240101  # shared by every studio user: adapters made anywhere share bases
HASHED = 1 << 20  # concept seeds from here on are hashes (hashed_seed), below it seeds someone chose


def hashed_seed(text: str) -> int:
    """The default concept seed: a stable hash of the trigger (or the adapter's name), so two people who train
    different concepts with the defaults take different columns. Two hashes share a layer's block with
    probability 1 / (that layer's width // rank); the merge refuses such a pair (studio.merge.plan)."""
    return HASHED + zlib.crc32(text.strip().lower().encode()) % (2**31 - HASHED)


def disjoint_concepts(config: OrthogonalConfig, widths: list[int]) -> int:
    """How many concepts stay disjoint in every layer of these input widths: the seeds' blocks in the
    narrowest one."""
    return config.slots or min(widths) // config.rank


@dataclass(kw_only=True)
class OrthogonalConfig(LoraConfig):
    rank: int = option(20, "Rank (the paper's r) [default: the recipe's].")
    concept_seed: int = option(0, "which basis columns, one per concept [default: a hash of the trigger].")
    # > 0: each layer's rank is min(rank, its input size // slots), so `slots` concepts (seeds 0..slots-1) stay
    # disjoint in every layer and wide layers (a 3x3 conv reads 9x its channels) get the rank they can hold;
    # 0: `rank` everywhere, and the narrowest layer decides how many concepts are disjoint
    slots: int = option(0, "each layer's rank is min(rank, its input size // slots), so that many concepts stay "
                           "disjoint in every layer; 0 = rank everywhere [default: the recipe's].",
                        keyword="concept_slots")
    basis_seed: int = PUBLIC_BASIS_SEED
    columns: dict[str, list[int]] = field(default_factory=dict)  # module -> its columns of the basis

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.slots, bool) or not isinstance(self.slots, int) or self.slots < 0:
            raise InvalidArgumentError(f"slots={self.slots!r} must be a whole number >= 0 (0 = one rank everywhere).")
        if self.dora:
            raise InvalidArgumentError("an orthogonal adapter cannot be a DoRA: DoRA's norm couples the concepts.")

    @classmethod
    def prepare_training_options(cls, options: dict[str, Any], run: Any) -> None:
        """A run without a concept seed takes the hash of its trigger (or its name), so adapters trained apart
        take different columns."""
        super().prepare_training_options(options, run)
        if options.get("concept_seed") is None:
            options["concept_seed"] = hashed_seed(run.trigger or run.name or run.paths()["out"].stem)


def _layer_rng(seed: int, name: str, size: int, salt: int) -> np.random.Generator:
    """A generator that depends only on (seed, layer name, size, salt): PCG64 is the same everywhere."""
    return np.random.default_rng([seed, zlib.crc32(name.encode()), size, salt])


def basis_columns(name: str, size: int, columns: list[int], seed: int = PUBLIC_BASIS_SEED) -> np.ndarray:
    """Columns `columns` of layer `name`'s shared orthogonal basis O = diag(s) P C, as (size, r) float64."""
    rng = _layer_rng(seed, name, size, 0)
    signs = rng.choice([-1.0, 1.0], size=size)
    perm = rng.permutation(size)  # row i of O is row perm[i] of C
    k = np.asarray(columns, dtype=np.float64)[None, :]  # (1, r)
    n = perm.astype(np.float64)[:, None]  # (size, 1)
    dct = np.cos(math.pi * (2 * n + 1) * k / (2 * size)) * np.where(k == 0, math.sqrt(1 / size), math.sqrt(2 / size))
    return signs[:, None] * dct  # (size, r)


def choose_columns(name: str, size: int, rank: int, concept_seed: int, seed: int = PUBLIC_BASIS_SEED) -> list[int]:
    """The concept's r columns of layer `name`'s basis: block `concept_seed mod (size // r)` of a shared
    permutation of the columns. The paper draws them at random, which lets two concepts share columns
    (two rank-16 draws from 64 share 4 on average); blocks make concept seeds 0, 1, ..., size // r - 1
    exactly disjoint in every layer."""
    if rank > size:
        raise InvalidArgumentError(f"rank {rank} exceeds the input size {size} of {name}; choose a rank <= {size}.")
    order = _layer_rng(seed, name, size, 1).permutation(size)
    block = concept_seed % (size // rank)
    return sorted(int(c) for c in order[block * rank : (block + 1) * rank])


@register("orthogonal")
class OrthogonalAdapter(LoraAdapter):
    """A LoRA whose lora_A rows are frozen columns of the shared basis."""

    config_class = OrthogonalConfig
    sample_options = {"concept_seed": 3, "rank": 4}

    def training_note(self, backbone: Backbone, trigger: str = "") -> str:
        """Which basis columns it took, and how likely another default one shares them."""
        config, table = self.config, module_table(backbone)
        blocks = disjoint_concepts(config, [table[name].weight[0].numel() for name in config.targets])
        seed = config.concept_seed
        origin = f"the hash of {trigger or config.name!r}" if seed >= HASHED else "chosen"
        return (f"orthogonal: concept seed {seed} ({origin}) takes block {seed % blocks} of {blocks} disjoint in the "
                f"narrowest layer; an adapter with another seed shares it with probability 1/{blocks}, and "
                f"`studio merge --method orthogonal` refuses such a pair")

    @classmethod
    def create(cls, backbone: Backbone, config: OrthogonalConfig, *, seed: int = 0) -> OrthogonalAdapter:
        import torch

        modules = module_table(backbone)
        config.targets = target_modules(backbone, config.target, text_encoder=config.text_encoder)
        config.family, config.base = backbone.family.name, config.base or backbone.source
        check_rank(config.rank, layer_widths(modules, config.targets))
        tensors = {}
        narrowest = min(modules[name].weight[0].numel() for name in config.targets)
        chosen = config.concept_seed < HASHED  # a hashed seed lands on any block by design
        if chosen and config.slots and config.concept_seed >= config.slots:
            warnings.warn(f"concept seed {config.concept_seed} with {config.slots} slots shares columns with seed "
                          f"{config.concept_seed % config.slots}; use seeds 0..{config.slots - 1} or more slots.",
                          stacklevel=2)
        elif chosen and not config.slots and config.concept_seed >= narrowest // config.rank:
            warnings.warn(f"concept seed {config.concept_seed} at rank {config.rank}: layers {narrowest} wide hold "
                          f"only {narrowest // config.rank} disjoint concepts (seeds 0..{narrowest // config.rank - 1});"
                          f" this adapter shares columns with seed {config.concept_seed % (narrowest // config.rank)}"
                          f" there. Use a smaller seed or rank.", stacklevel=2)
        for name in config.targets:
            weight = modules[name].weight  # (out, in) or a conv's (out, in, kh, kw): its input is in * kh * kw wide
            size = weight[0].numel()
            rank = max(1, min(config.rank, size // config.slots)) if config.slots else config.rank
            cols = choose_columns(name, size, rank, config.concept_seed, config.basis_seed)
            config.columns[name] = cols
            basis = torch.from_numpy(basis_columns(name, size, cols, config.basis_seed).T.copy()).float()  # (r, size)
            tensors[f"{name}.lora_A.weight"] = basis.view(rank, *weight.shape[1:])
            tensors[f"{name}.lora_B.weight"] = torch.zeros(weight.shape[0], rank, *([1, 1] if weight.dim() == 4
                                                                                    else []))
        return cls(config, tensors)

    def trains(self, layer_name: str) -> bool:
        return layer_name != "lora_A"  # the paper: B_i (input side) frozen, only A_i trains


def overlap(a: OrthogonalConfig, b: OrthogonalConfig) -> dict[str, int]:
    """Per shared module, how many basis columns two orthogonal adapters both use (0 = exactly orthogonal)."""
    if a.basis_seed != b.basis_seed:
        raise InvalidArgumentError(f"the adapters use different bases ({a.basis_seed} and {b.basis_seed}); "
                                   f"their overlap is not structural.")
    return {name: len(set(cols) & set(b.columns[name])) for name, cols in a.columns.items() if name in b.columns}


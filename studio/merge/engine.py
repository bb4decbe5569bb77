"""Merge adapter files into one: load and check the sources, apply a method per module, write the
result as a standard LoRA file (its manifest records the sources, method and parameters), bake it into
a backbone or export it for other tools."""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from studio.adapters.base import Adapter, IncompatibleAdapterError, WeightAdapter, load_adapter
from studio.blocks import BlockWeights, parse_weight, weight_of
from studio.deltas import Delta, Dense, LowRank
from studio.errors import InvalidArgumentError
from studio.home import atomic_path
from studio.merge.methods import METHODS, as_low_rank, rerank

if TYPE_CHECKING:
    from studio.adapters.lora import LoraAdapter
    from studio.backbones import Backbone


@dataclass
class MergeResult:
    adapter: LoraAdapter
    # per module: the Frobenius norm the rank limit cut, relative to the merged change (0 = exact)
    truncation: dict[str, float] = field(default_factory=dict)
    path: Path | None = None

    @property
    def max_truncation(self) -> float:
        return max(self.truncation.values(), default=0.0)


def load_sources(sources: list[str | Path | Adapter], backbone: Backbone | None = None) -> list[WeightAdapter]:
    """Adapters from files or objects; refused unless all are weight-space kinds of one family."""
    if len(sources) < 1:
        raise InvalidArgumentError("nothing to merge: name at least one adapter file.")
    adapters = [s if isinstance(s, Adapter) else load_adapter(s, backbone) for s in sources]
    for adapter in adapters:
        if not isinstance(adapter, WeightAdapter):
            raise InvalidArgumentError(f"adapter {adapter.name!r} is a {adapter.kind} adapter, which acts on "
                                       f"attention or residuals, not weights: it cannot be merged; attach it beside "
                                       f"the merged file instead.")
    first = adapters[0]
    for other in adapters[1:]:
        if other.config.family != first.config.family:
            raise IncompatibleAdapterError(
                f"adapter {first.name!r} is for {first.config.family} ({first.config.base or 'unknown base'}) but "
                f"{other.name!r} is for {other.config.family} ({other.config.base or 'unknown base'}); merge "
                f"adapters made for one backbone family.")
    if backbone is not None:
        for adapter in adapters:
            adapter.check_backbone(backbone)
    return adapters


def source_deltas(adapters: list[WeightAdapter], backbone: Backbone | None = None) -> list[dict[str, Delta]]:
    """Each adapter's change per module at weight 1, with shapes checked across adapters."""
    per_adapter = [a.deltas(backbone) for a in adapters]
    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    for adapter, deltas in zip(adapters, per_adapter, strict=True):
        for module, delta in deltas.items():
            seen = shapes.setdefault(module, (tuple(delta.shape), adapter.name))
            if seen[0] != tuple(delta.shape):
                raise IncompatibleAdapterError(
                    f"{module} is {seen[0]} in adapter {seen[1]!r} but {tuple(delta.shape)} in {adapter.name!r}: "
                    f"they were made on different architectures of the {adapter.config.family} family.")
    return per_adapter


def method_parameters(name: str, given: dict[str, Any]) -> dict[str, Any]:
    """The parameters `name` takes, from `given` (None = the method's default); others are refused."""
    fn = METHODS.get_or_raise(name)
    accepted = {p for p in inspect.signature(fn).parameters if p not in ("deltas", "weights")}
    used = {k: v for k, v in given.items() if v is not None}
    extra = sorted(set(used) - accepted - {"rank"})
    if extra:
        raise InvalidArgumentError(f"method {name!r} takes no {', '.join(extra)}; it takes "
                                   f"{', '.join(sorted(accepted)) or 'no parameters'} (plus rank for the saved file).")
    return {k: v for k, v in used.items() if k in accepted}


def merge_deltas(per_adapter: list[dict[str, Delta]], weights: list[float | BlockWeights], method: str = "linear", *,
                 rank: int | None = None, **params: Any) -> tuple[dict[str, LowRank], dict[str, float]]:
    """Apply `method` module by module to the adapters that change it, each at its (block) weight, and
    store each result at once as factors of at most `rank` (default: the sum of the inputs' ranks at
    that module), so a dense method holds one module's dense changes at a time. Returns the factors
    and, per module, the relative error the rank limit cut."""
    fn = METHODS.get_or_raise(method)
    kwargs = method_parameters(method, {**params, **({"rank": rank} if method == "svd" else {})})
    factors: dict[str, LowRank] = {}
    errors: dict[str, float] = {}
    modules = sorted({m for deltas in per_adapter for m in deltas})
    for module in modules:
        present = [(deltas[module], weight_of(w, module)) for deltas, w in zip(per_adapter, weights, strict=True)
                   if module in deltas]
        if all(w == 0 for _, w in present):
            continue
        merged = fn([d for d, _ in present], [w for _, w in present], **kwargs)
        parts = [merged.delta] if isinstance(merged, Dense) else [merged.up, merged.down]
        if not all(torch.isfinite(p).all() for p in parts):
            raise InvalidArgumentError(f"the merge made {module} NaN or Inf (an input holds NaN/Inf, or the weights "
                                       f"are extreme); nothing was written.")
        limit = rank or sum(as_low_rank(d).rank for d, _ in present)
        factors[module], errors[module] = store(merged, limit, fast=rank is not None)
    return factors, errors


def store(delta: Delta, limit: int, *, fast: bool = False) -> tuple[LowRank, float]:
    """`delta` as factors of rank <= `limit`, and the relative Frobenius error of the cut; `fast` allows a
    randomised SVD when `limit` is small against the matrix (a rank the user chose, so a cut is expected)."""
    if isinstance(delta, LowRank):
        if delta.rank <= limit:
            return delta, 0.0
        low, cut = rerank(delta, limit)
        return low, cut / max(float(delta.dense().norm()), 1e-30)
    matrix = delta.dense().flatten(1)  # (out, in * kh * kw)
    total = float(matrix.norm())
    if total == 0:
        conv = [1, 1] if delta.delta.dim() == 4 else []
        return LowRank(up=torch.zeros(matrix.shape[0], 1, *conv), down=torch.zeros(1, *delta.shape[1:]), alpha=1.0), 0.0
    if fast and 2 * limit < min(matrix.shape):
        # randomised SVD (Halko et al. 2011) when the rank is small against the matrix: the top singular
        # triplets at a fraction of a full SVD's cost; the error reported is measured, not assumed
        with torch.random.fork_rng(devices=[]):  # the same file from the same inputs, every time
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(matrix, q=min(limit + 16, min(matrix.shape)), niter=4)
        vh = v.T
    else:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    keep = max(1, min(limit, int((s > s[0] * 1e-6).sum())))
    up = u[:, :keep] * s[:keep]
    if delta.delta.dim() == 4:
        up = up[:, :, None, None]
    low = LowRank(up=up, down=vh[:keep].reshape(keep, *delta.shape[1:]), alpha=float(keep))
    if len(s) == min(matrix.shape):  # a full SVD: the cut is what the dropped singular values hold
        cut = float(s[keep:].double().square().sum().sqrt())
    else:  # randomised: ‖M‖² − what was kept (float64; cancellation only matters when the cut is tiny)
        cut = max(float(matrix.double().square().sum()) - float(s[:keep].double().square().sum()), 0.0) ** 0.5
    return low, cut / total


def check_out(out: str | Path | None, overwrite: bool) -> None:
    """An output path that can be written and is new (or `overwrite`)."""
    from studio.outputs import check_new, check_writable

    if out is not None:
        check_new(check_writable(out), overwrite=overwrite)


def merge(sources: list[str | Path | Adapter], *, method: str = "linear",
          weights: list[float | str | BlockWeights] | None = None, rank: int | None = None,
          density: float | None = None, seed: int | None = None, max_overlap: float | None = None,
          backbone: Backbone | None = None, name: str = "", out: str | Path | None = None,
          overwrite: bool = False) -> MergeResult:
    """Merge adapters into one LoRA with the given weights; with `out`, write it (atomically, refusing an
    existing path unless `overwrite`). `weights`: one per source, a number or a block spec
    ("1,up_blocks.1=0"). The learned merge, which searches the weights, is `studio.merge(method="learned")`
    (studio.merge.api)."""
    from studio.adapters.lora import LoraAdapter, LoraConfig
    from studio.hashing import sha256_file

    check_out(out, overwrite)
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise InvalidArgumentError(f"rank={rank!r} must be an integer >= 1.")
    adapters = load_sources(sources, backbone)
    weights = [1.0] * len(adapters) if weights is None else [parse_weight(w) for w in weights]
    if len(weights) != len(adapters):
        raise InvalidArgumentError(f"{len(adapters)} adapters but {len(weights)} weights; give one weight each.")
    params = {"density": density, "seed": seed, "max_overlap": max_overlap}
    per_adapter = source_deltas(adapters, backbone)
    factors, errors = merge_deltas(per_adapter, weights, method, rank=rank, **params)
    if method == "svd":
        params["rank"] = rank
    first = adapters[0]
    triggers = list(dict.fromkeys(w for a in adapters for w in a.config.trigger_words))
    record = {"method": method, "parameters": {k: v for k, v in params.items() if v is not None},
              "sources": [{"name": a.name, "kind": a.kind, "weight": str(w),
                           "path": str(a.path) if a.path else None,
                           "sha256": sha256_file(a.path) if a.path else None}
                          for a, w in zip(adapters, weights, strict=True)]}
    config = LoraConfig(family=first.config.family, base=first.config.base, base_hash=first.config.base_hash,
                        name=name or (Path(out).stem if out else "merged"), trigger_words=triggers,
                        rank=max((f.rank for f in factors.values()), default=1),
                        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), merge=record)
    adapter = LoraAdapter.from_deltas(factors, config)
    adapter.tokens = merged_tokens(adapters)
    result = MergeResult(adapter=adapter, truncation=errors)
    if out is not None:
        result.path = adapter.save(out, overwrite=overwrite)
    return result


def merged_tokens(adapters: list[Adapter]) -> dict[str, dict[str, Any]]:
    """The sources' concept tokens, all of them: a sum of weights does not touch a token (which is why
    pivotal-tuned concepts survive merges); two sources with one trigger are refused."""
    tokens: dict[str, dict[str, Any]] = {}
    owner: dict[str, str] = {}
    for adapter in adapters:
        for trigger, vectors in adapter.tokens.items():
            if trigger in tokens:
                raise InvalidArgumentError(f"adapters {owner[trigger]!r} and {adapter.name!r} both learned the token "
                                           f"{trigger!r}; a merged adapter can hold one of them. Retrain one with "
                                           f"another trigger.")
            tokens[trigger], owner[trigger] = vectors, adapter.name
    return tokens


def bake(adapters: list[tuple[WeightAdapter, float]], backbone: Backbone, out: str | Path, *,
         single_file: bool = False, overwrite: bool = False) -> Path:
    """Fuse adapters into `backbone`'s weights and save it as a diffusers folder (or one original-layout
    .safetensors file); the in-memory backbone is restored afterwards."""
    from studio.formats import save_single_file

    out = Path(out)
    if out.exists() and not overwrite:
        raise InvalidArgumentError(f"{str(out)!r} exists; choose another --bake path or pass --overwrite.")
    if single_file and out.suffix != ".safetensors":
        raise InvalidArgumentError(f"a single-file backbone {str(out)!r} must end in .safetensors.")
    fused = []
    try:
        for adapter, weight in adapters:
            adapter.fuse(backbone, weight)
            fused.append(adapter)
        if single_file:
            save_single_file(backbone, out)
        else:
            with atomic_path(out, folder=True) as tmp:
                backbone.pipe.save_pretrained(tmp, safe_serialization=True)
    finally:
        for adapter in reversed(fused):
            adapter.unfuse(backbone)
    return out

"""The interference plan: before merging, how much adapters will disturb each other, per block.

Per module changed by two adapters a and b:
- cosine: <ΔW_a, ΔW_b> / (‖ΔW_a‖ ‖ΔW_b‖), the alignment of the two changes (sign conflicts < 0);
- overlap: ‖Q_aᵀ Q_b‖² / min(r_a, r_b) for orthonormal bases Q of the input subspaces the adapters
  read (their LoRA down rows); orthogonal adapters give ~0, two LoRAs on the same data ~1;
- crosstalk: ‖ΔW_b Q_a‖ / ‖ΔW_a‖, how strongly b's change acts on the inputs a responds to, relative
  to a's own change (the larger of both directions): in a plain sum this is what bleeds.
All three come from the low-rank factors (r x r products), never from dense out x in matrices.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.blocks import block_name
from studio.merge.methods import as_low_rank, crosstalk, inner, subspace_overlap

if TYPE_CHECKING:
    from studio.adapters.base import Adapter
    from studio.backbones import Backbone

# Recommendation thresholds on the norm-weighted crosstalk (see bench/merge.py for how the methods
# fared on the shapes world at these levels).
LOW_CROSSTALK = 0.1
ORTHOGONAL_OVERLAP = 0.05


@dataclass
class PairStats:
    cosine: float = 0.0
    overlap: float = 0.0
    crosstalk: float = 0.0
    modules: int = 0


@dataclass
class MergePlan:
    adapters: list[str]
    blocks: dict[str, dict[str, PairStats]] = field(default_factory=dict)  # block -> "a+b" -> stats
    pairs: dict[str, PairStats] = field(default_factory=dict)  # "a+b" -> stats over all modules
    score: float = 0.0  # overall interference: the largest pair's crosstalk, in [0, ~1]
    method: str = "linear"
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """The plan as text: one row per block and pair, then the verdict."""
        lines = [f"{'block':<34} {'pair':<30} {'modules':>7} {'cosine':>7} {'overlap':>8} {'crosstalk':>9}"]
        for block, pairs in self.blocks.items():
            for pair, s in pairs.items():
                lines.append(f"{block:<34} {pair:<30} {s.modules:>7} {s.cosine:>7.3f} {s.overlap:>8.3f} "
                             f"{s.crosstalk:>9.3f}")
        for pair, s in self.pairs.items():
            lines.append(f"{'(all)':<34} {pair:<30} {s.modules:>7} {s.cosine:>7.3f} {s.overlap:>8.3f} "
                         f"{s.crosstalk:>9.3f}")
        lines.append(f"interference score {self.score:.3f}: recommended method '{self.method}' ({self.reason})")
        return "\n".join(lines)


def plan(sources: list[str | Path | Adapter], backbone: Backbone | None = None) -> MergePlan:
    """The interference plan of `sources` (files or adapters, all of one family)."""
    from studio.merge.engine import load_sources, source_deltas

    adapters = load_sources(sources, backbone)
    names = unique_names([a.name for a in adapters])
    per_adapter = [{m: as_low_rank(d) for m, d in deltas.items()} for deltas in source_deltas(adapters, backbone)]
    result = MergePlan(adapters=names)
    sums: dict[tuple[str, str], list[float]] = {}  # (block, pair) -> weighted sums
    for (i, a), (j, b) in combinations(enumerate(per_adapter), 2):
        pair = f"{names[i]}+{names[j]}"
        for module in sorted(set(a) & set(b)):
            da, db = a[module], b[module]
            na, nb = inner(da, da) ** 0.5, inner(db, db) ** 0.5
            if na == 0 or nb == 0:
                continue
            weight = na * nb  # large changes count more
            values = (inner(da, db) / weight, subspace_overlap(da, db), max(crosstalk(da, db), crosstalk(db, da)))
            for key in ((block_name(module), pair), ("(all)", pair)):
                acc = sums.setdefault(key, [0.0, 0.0, 0.0, 0.0, 0])
                for k, v in enumerate(values):
                    acc[k] += weight * v
                acc[3] += weight
                acc[4] += 1
    for (block, pair), (cos, ovl, ct, total, count) in sums.items():
        stats = PairStats(cosine=cos / total, overlap=ovl / total, crosstalk=ct / total, modules=count)
        if block == "(all)":
            result.pairs[pair] = stats
        else:
            result.blocks.setdefault(block, {})[pair] = stats
    result.blocks = dict(sorted(result.blocks.items(), key=lambda kv: _block_order(kv[0])))
    result.score = max((s.crosstalk for s in result.pairs.values()), default=0.0)
    result.method, result.reason = recommend(result, [a.kind for a in adapters])
    return result


def recommend(result: MergePlan, kinds: list[str]) -> tuple[str, str]:
    if not result.pairs:
        return "linear", "the adapters change different modules: a plain sum cannot interfere"
    overlap = max(s.overlap for s in result.pairs.values())
    if overlap <= ORTHOGONAL_OVERLAP:
        return "orthogonal", (f"input subspaces overlap by at most {overlap:.1%}: the exact sum keeps each "
                              f"adapter's effect")
    if result.score <= LOW_CROSSTALK:
        return "linear", f"crosstalk {result.score:.2f} <= {LOW_CROSSTALK}: the plain sum interferes little"
    if any(s.cosine < 0 for s in result.pairs.values()):
        return "ties", (f"crosstalk {result.score:.2f} with opposed changes (cosine < 0): TIES elects one sign "
                        f"per weight")
    hint = " (retrain as orthogonal adapters to merge without interference)" if "orthogonal" not in kinds else ""
    return "ties", f"crosstalk {result.score:.2f} > {LOW_CROSSTALK}: TIES keeps each adapter's largest changes{hint}"


def unique_names(names: list[str]) -> list[str]:
    """`names` with repeats told apart: a, a -> a, a#2."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return out


def _block_order(block: str) -> tuple[int, str, int]:
    order = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2, "transformer_blocks": 3,
             "single_transformer_blocks": 4}
    parts = block.split(".")
    group = parts[1] if len(parts) > 1 else parts[0]
    index = int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else 0
    return (order.get(group, 9 if not block.startswith("text_encoder") else 10), block.split(".")[0], index)

"""Per-block weights: `"1,up_blocks.1=0,down_blocks=0.5"` (UNets) or `"transformer_blocks.0-5=0.3"` (DiTs).

diffusers' `set_adapters(adapter_weights={"unet": {...}})` offers block weights for UNets only; these
rules match module names of any backbone, so the same syntax serves DiT transformer blocks and text
encoders (`text_encoder=0`), at attach time and in merges.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from studio.backbones import BLOCK_GROUPS
from studio.errors import InvalidArgumentError

_BLOCK = re.compile(r"^(?P<component>[^.]+)\.(?P<block>(?:" + "|".join(BLOCK_GROUPS) + r")(?:\.\d+)?)(?:\.|$)")


def block_name(module: str) -> str:
    """The block a module belongs to, from its name alone: "unet.up_blocks.1", "transformer.transformer_blocks.3",
    "unet.mid_block", or the component ("text_encoder") for modules outside the denoiser's block lists."""
    found = _BLOCK.match(module)
    if found:
        return f"{found['component']}.{found['block']}"
    head, _, rest = module.partition(".")
    top = rest.split(".", 1)[0]
    return head if head.startswith("text_encoder") or not top else f"{head}.{top}"


@dataclass(frozen=True)
class BlockWeights:
    """A default weight and rules (name pattern -> weight); the most specific matching rule wins."""

    default: float
    rules: tuple[tuple[tuple[str, ...], float], ...] = ()

    def __call__(self, module: str) -> float:
        parts = module.split(".")
        best, best_len = self.default, 0
        for pattern, weight in self.rules:
            if len(pattern) >= best_len and _contains(parts, pattern):
                best, best_len = weight, len(pattern)
        return best

    def __mul__(self, factor: float) -> BlockWeights:
        return BlockWeights(self.default * factor, tuple((p, w * factor) for p, w in self.rules))

    def __str__(self) -> str:
        return ",".join([_num(self.default)] + [f"{'.'.join(p)}={_num(w)}" for p, w in self.rules])


def _num(value: float) -> str:
    return f"{value:g}"


def _contains(parts: list[str], pattern: tuple[str, ...]) -> bool:
    """`pattern` occurs as consecutive name parts; a part "a-b" matches the integers a..b."""
    for start in range(len(parts) - len(pattern) + 1):
        if all(_part_matches(parts[start + i], p) for i, p in enumerate(pattern)):
            return True
    return False


def _part_matches(part: str, pattern: str) -> bool:
    if "-" in pattern and part.isdigit():
        low, _, high = pattern.partition("-")
        return low.isdigit() and high.isdigit() and int(low) <= int(part) <= int(high)
    return part == pattern


def parse_weight(spec: str | float | BlockWeights, *, what: str = "weight") -> float | BlockWeights:
    """A finite number, or a block-weight spec: items separated by commas, `pattern=weight` rules and
    at most one bare number (the default for unmatched modules, 1 when absent)."""
    if isinstance(spec, bool):
        raise InvalidArgumentError(f"{what} {spec!r} must be a number (e.g. 0.8) or block weights.")
    parsed = _parse(spec, what)
    values = [parsed.default, *(w for _, w in parsed.rules)] if isinstance(parsed, BlockWeights) else [parsed]
    if not all(math.isfinite(v) for v in values):
        raise InvalidArgumentError(f"{what} {spec!r} must be finite (e.g. 0.8).")
    return parsed


def _parse(spec: str | float | BlockWeights, what: str) -> float | BlockWeights:
    if isinstance(spec, (int, float, BlockWeights)):
        return float(spec) if not isinstance(spec, BlockWeights) else spec
    text = str(spec).strip()
    try:
        return float(text)
    except ValueError:
        pass
    default, rules = 1.0, []
    for item in filter(None, (i.strip() for i in text.split(","))):
        pattern, eq, value = item.partition("=")
        try:
            number = float(value if eq else pattern)
        except ValueError:
            raise InvalidArgumentError(
                f"{what} {text!r}: {item!r} is not a number or a `block=weight` rule; write e.g. "
                f"'0.8' or '1,up_blocks.1=0,down_blocks=0.5' or 'transformer_blocks.0-5=0.3'.") from None
        if eq:
            if not re.fullmatch(r"[A-Za-z_][\w]*(\.(\d+(-\d+)?|[A-Za-z_]\w*))*", pattern.strip()):
                raise InvalidArgumentError(f"{what} {text!r}: block pattern {pattern!r} must be a dotted module "
                                           f"path such as 'up_blocks.1' or 'transformer_blocks.0-5'.")
            rules.append((tuple(pattern.strip().split(".")), number))
        else:
            default = number
    if not rules:
        return default
    return BlockWeights(default, tuple(rules))


def weight_of(weight: float | BlockWeights, module: str) -> float:
    return weight(module) if isinstance(weight, BlockWeights) else float(weight)

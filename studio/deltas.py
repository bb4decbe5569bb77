"""What a weight-space adapter does to one module: a low-rank or a dense change of its weight.

Every weight-space kind (LoRA, DoRA, orthogonal LoRA, OFT, LoHa/LoKr read from files, erasers)
describes itself as `{module name: Delta}`, module names being the pipeline's own dotted paths with
the component first (`unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k`). Fusing,
exporting and merging all work on this one form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LowRank:
    """ΔW = (alpha / rank) · up @ down. Linear: up (out, r), down (r, in); conv: up (out, r, 1, 1),
    down (r, in, kh, kw), as kohya's LoCon and PEFT store them."""

    up: torch.Tensor
    down: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.up.shape[0], *self.down.shape[1:])

    def dense(self) -> torch.Tensor:
        product = self.up.flatten(1).float() @ self.down.flatten(1).float()  # (out, in * kh * kw)
        return (product * self.scale).view(self.shape)

    def folded(self) -> LowRank:
        """The same change with the scale folded into `up` (alpha = rank), as plain LoRA files need."""
        return LowRank(up=self.up * self.scale, down=self.down, alpha=float(self.rank))


@dataclass
class Dense:
    """ΔW as a full matrix (out, in) or conv kernel (out, in, kh, kw): LoHa, LoKr, OFT, UCE."""

    delta: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.delta.shape)

    def dense(self) -> torch.Tensor:
        return self.delta.float()

    def low_rank(self, rtol: float = 1e-6) -> LowRank:
        """Exact up to `rtol`: an SVD keeping the singular values above rtol · the largest."""
        matrix = self.delta.float().flatten(1)  # (out, in * kh * kw)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        keep = max(1, int((s > s[0] * rtol).sum())) if s.numel() and s[0] > 0 else 1
        up = u[:, :keep] * s[:keep]
        down = vh[:keep].view(keep, *self.delta.shape[1:])
        if self.delta.dim() == 4:
            up = up[:, :, None, None]
        return LowRank(up=up, down=down, alpha=float(keep))


Delta = LowRank | Dense

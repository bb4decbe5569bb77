"""Merge methods: pure functions from one module's deltas (one per adapter) and weights to one delta.

All share the signature `method(deltas, weights, **params) -> Delta`; `METHODS` names them for the
CLI, the API and the UI. Low-rank inputs stay low-rank where the math allows it (concat, SVD re-rank,
orthogonal sum); the sparsifying methods (TIES, DARE, magnitude prune) work on the dense change, as
their papers define them on parameters. We write them here rather than call peft's
`add_weighted_adapter` because peft applies TIES/DARE to the A and B factors separately (not to the
change they make), needs same-rank LoRAs attached to one model, and re-ranks through a dense m x n SVD.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from studio.deltas import Delta, Dense, LowRank
from studio.errors import InvalidArgumentError
from studio.registry import Registry

MergeFn = Callable[..., Delta]
METHODS: Registry[MergeFn] = Registry("merge method", InvalidArgumentError)

DEFAULT_DENSITY = 0.2  # TIES' "keep the top 20 %" (Yadav et al. 2023)


def _check(deltas: Sequence[Delta], weights: Sequence[float]) -> None:
    if not deltas:
        raise InvalidArgumentError("nothing to merge: pass at least one delta.")
    if len(deltas) != len(weights):
        raise InvalidArgumentError(f"{len(deltas)} deltas but {len(weights)} weights; give one weight per adapter.")
    shapes = {tuple(d.shape) for d in deltas}
    if len(shapes) > 1:
        raise InvalidArgumentError(f"the deltas have different shapes {sorted(shapes)}: they were made for "
                                   f"different models.")


def check_density(density: float) -> None:
    if not 0 < density <= 1:
        raise InvalidArgumentError(f"density={density!r} must be in (0, 1] (the fraction of entries kept, e.g. 0.2).")


def as_low_rank(delta: Delta) -> LowRank:
    return delta if isinstance(delta, LowRank) else delta.low_rank()


# ------------------------------------------------------------------------------- exact, low-rank


@METHODS.register("linear")
def merge_linear(deltas: Sequence[Delta], weights: Sequence[float]) -> Delta:
    """Σ w_i ΔW_i (task arithmetic, Ilharco et al. 2023); low-rank inputs give the exact rank-stacked sum."""
    _check(deltas, weights)
    if all(isinstance(d, LowRank) for d in deltas):
        return merge_concat(deltas, weights)
    return Dense(sum(w * d.dense() for d, w in zip(deltas, weights, strict=True)))


@METHODS.register("concat")
def merge_concat(deltas: Sequence[Delta], weights: Sequence[float]) -> LowRank:
    """Rank stacking: up = [w_i s_i up_i], down = [down_i]; exactly Σ w_i ΔW_i at rank Σ r_i."""
    _check(deltas, weights)
    lows = [as_low_rank(d) for d in deltas]
    up = torch.cat([(w * low.scale) * low.up.float() for low, w in zip(lows, weights, strict=True)], dim=1)
    down = torch.cat([low.down.float() for low in lows], dim=0)  # (R, in[, kh, kw])
    return LowRank(up=up, down=down, alpha=float(down.shape[0]))


@METHODS.register("svd")
def merge_svd(deltas: Sequence[Delta], weights: Sequence[float], *, rank: int | None = None) -> LowRank:
    """Σ w_i ΔW_i re-ranked to `rank` (best approximation, Eckart-Young), computed from the stacked
    factors: QR of each side, then an SVD of the small R x R core; never the dense out x in matrix."""
    stacked = merge_concat(deltas, weights)
    return rerank(stacked, rank or max(as_low_rank(d).rank for d in deltas))[0]


def rerank(low: LowRank, rank: int) -> tuple[LowRank, float]:
    """`low` truncated to `rank`, and the Frobenius norm of what was cut."""
    if not isinstance(rank, int) or rank < 1:
        raise InvalidArgumentError(f"rank={rank!r} must be an integer >= 1.")
    up = low.up.flatten(1).float() * low.scale  # (out, R)
    down = low.down.flatten(1).float()  # (R, in * kh * kw)
    q_up, r_up = torch.linalg.qr(up)  # (out, R'), (R', R)
    q_down, r_down = torch.linalg.qr(down.T)  # (in, R''), (R'', R)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)  # core (R', R'')
    keep = min(rank, s.numel())
    new_up = q_up @ (u[:, :keep] * s[:keep])  # (out, keep)
    new_down = vh[:keep] @ q_down.T  # (keep, in * kh * kw)
    cut = float(s[keep:].square().sum().sqrt())
    if low.down.dim() == 4:
        new_up = new_up[:, :, None, None]
    return LowRank(up=new_up, down=new_down.view(keep, *low.down.shape[1:]), alpha=float(keep)), cut


@METHODS.register("orthogonal")
def merge_orthogonal(deltas: Sequence[Delta], weights: Sequence[float], *, max_overlap: float = 0.05) -> LowRank:
    """The exact sum of adapters whose input subspaces are orthogonal (Po et al. 2024, Orthogonal
    Adaptation); refused when two of them overlap by more than `max_overlap`."""
    lows = [as_low_rank(d) for d in deltas]
    for i in range(len(lows)):
        for j in range(i + 1, len(lows)):
            value = subspace_overlap(lows[i], lows[j])
            if value > max_overlap:
                raise InvalidArgumentError(
                    f"adapters {i + 1} and {j + 1} share {value:.0%} of their input subspace (limit "
                    f"{max_overlap:.0%}): they are not orthogonal, so a plain sum would interfere; use "
                    f"method 'ties' or 'svd', or train them as orthogonal adapters with different concept seeds.")
    return merge_concat(lows, weights)


# ------------------------------------------------------------------------------ sparsifying, dense


def _top_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    """True for the `density` fraction of entries of largest magnitude."""
    k = max(1, round(density * x.numel()))
    if k >= x.numel():
        return torch.ones_like(x, dtype=torch.bool)
    threshold = x.abs().flatten().kthvalue(x.numel() - k + 1).values
    return x.abs() >= threshold


def _dense_stack(deltas: Sequence[Delta], weights: Sequence[float]) -> torch.Tensor:
    _check(deltas, weights)
    return torch.stack([w * d.dense() for d, w in zip(deltas, weights, strict=True)])  # (k, out, in[, kh, kw])


def _disjoint_mean(stack: torch.Tensor) -> torch.Tensor:
    """TIES' elect-and-merge: per entry, the sign with the larger total mass, then the mean of the
    entries that agree with it."""
    sign = torch.sign(stack.sum(dim=0))
    agree = (torch.sign(stack) == sign) & (stack != 0)
    count = agree.sum(dim=0).clamp(min=1)
    return (stack * agree).sum(dim=0) / count


@METHODS.register("ties")
def merge_ties(deltas: Sequence[Delta], weights: Sequence[float], *, density: float = DEFAULT_DENSITY) -> Dense:
    """TIES (Yadav et al. 2023, arXiv:2306.01708): trim each to its top `density`, elect signs, disjoint mean."""
    check_density(density)
    stack = _dense_stack(deltas, weights)
    trimmed = torch.stack([t * _top_mask(t, density) for t in stack])
    return Dense(_disjoint_mean(trimmed))


def _dare(stack: torch.Tensor, density: float, seed: int) -> torch.Tensor:
    """DARE (Yu et al. 2024, arXiv:2311.03099): drop entries at random with p = 1 - density, rescale by 1/density."""
    check_density(density)
    generator = torch.Generator().manual_seed(seed)
    keep = torch.rand(stack.shape, generator=generator) < density
    return stack * keep / density


@METHODS.register("dare_linear")
def merge_dare_linear(deltas: Sequence[Delta], weights: Sequence[float], *, density: float = 0.5,
                      seed: int = 0) -> Dense:
    """DARE, then the weighted sum."""
    return Dense(_dare(_dense_stack(deltas, weights), density, seed).sum(dim=0))


@METHODS.register("dare_ties")
def merge_dare_ties(deltas: Sequence[Delta], weights: Sequence[float], *, density: float = 0.5,
                    seed: int = 0) -> Dense:
    """DARE, then TIES' sign election and disjoint mean."""
    return Dense(_disjoint_mean(_dare(_dense_stack(deltas, weights), density, seed)))


@METHODS.register("magnitude_prune")
def merge_magnitude_prune(deltas: Sequence[Delta], weights: Sequence[float], *,
                          density: float = DEFAULT_DENSITY) -> Dense:
    """Each delta pruned to its top `density` entries by magnitude, then summed."""
    check_density(density)
    stack = _dense_stack(deltas, weights)
    return Dense(sum(t * _top_mask(t, density) for t in stack))


# ------------------------------------------------------------------------------------ measures


def _orthonormal_rows(low: LowRank) -> torch.Tensor:
    """An orthonormal basis (in, r) of the input space `low` reads (its down rows)."""
    q, r = torch.linalg.qr(low.down.flatten(1).float().T)
    keep = r.diagonal().abs() > 1e-8 * r.diagonal().abs().max().clamp(min=1e-30)
    return q[:, keep]


def subspace_overlap(a: LowRank, b: LowRank) -> float:
    """‖Q_aᵀ Q_b‖²_F / min(r_a, r_b): 0 for orthogonal input subspaces, 1 when one holds the other."""
    qa, qb = _orthonormal_rows(a), _orthonormal_rows(b)
    if not qa.shape[1] or not qb.shape[1]:
        return 0.0
    return float((qa.T @ qb).square().sum() / min(qa.shape[1], qb.shape[1]))


def inner(a: LowRank, b: LowRank) -> float:
    """<ΔW_a, ΔW_b>_F from the factors: Σ (up_aᵀ up_b) ⊙ (down_a down_bᵀ)."""
    ua, ub = a.up.flatten(1).float() * a.scale, b.up.flatten(1).float() * b.scale
    return float(((ua.T @ ub) * (a.down.flatten(1).float() @ b.down.flatten(1).float().T)).sum())


def crosstalk(a: LowRank, b: LowRank) -> float:
    """How much ΔW_b acts on the inputs ΔW_a reads, relative to ΔW_a itself: ‖ΔW_b Q_a‖ / ‖ΔW_a‖."""
    qa = _orthonormal_rows(a)
    norm_a = inner(a, a) ** 0.5
    if norm_a == 0:
        return 0.0
    acted = (b.up.flatten(1).float() * b.scale) @ (b.down.flatten(1).float() @ qa)  # (out, r_a)
    return float(acted.norm()) / norm_a

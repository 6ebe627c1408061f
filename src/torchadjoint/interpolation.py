"""Dense output: the state at times inside an accepted step, without shortening it."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .tableaux.base import TableauTensors


def _hermite_weights(theta: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cubic Hermite through y0, y1, f0, f1 as weights on ``[k_1 … k_s, f1]``: (m, s+1)."""
    th2, th3 = theta * theta, theta * theta * theta
    h01 = 3 * th2 - 2 * th3  # weight of (y1 - y0) = h Σ b_i k_i
    h10 = theta - 2 * th2 + th3  # weight of h f0
    h11 = th3 - th2  # weight of h f1
    w = h01[:, None] * b[None, :]
    w[:, 0] += h10
    return torch.cat([w, h11[:, None]], dim=1)


def dense_weights(coeffs: TableauTensors, theta: torch.Tensor) -> torch.Tensor:
    """Weights ``W`` (m, s') so that ``y(t0 + θh) = y0 + h W @ K`` for fractions ``θ`` (m,).

    ``s' = s`` for FSAL methods with their own continuous extension (``K`` = stages),
    ``s + 1`` otherwise (``K`` = stages with ``f1`` appended).
    """
    if coeffs.dense is None:
        return _hermite_weights(theta, coeffs.b)
    # θ, θ², …, θ^P as one running product (one op, not P powers and a stack: the dense
    # output runs once per accepted step that passes an output time).
    powers = theta[:, None].expand(-1, coeffs.dense.shape[1]).cumprod(dim=1)
    return powers @ coeffs.dense.T


def interpolate(
    coeffs: TableauTensors,
    y0: torch.Tensor,
    y1: torch.Tensor,
    stages: torch.Tensor,
    f1: Optional[torch.Tensor],
    h: float,
    fractions: Sequence[float],
    linear: bool = False,
) -> torch.Tensor:
    """States at ``t0 + θh`` for each ``θ`` in ``fractions`` (in [0, 1]): shape (m, n).

    ``f1`` (n,) must be given when the weights need it (``dense_weights`` has s + 1
    columns). ``linear=True`` interpolates linearly between ``y0`` and ``y1``.
    """
    theta = torch.tensor(fractions, dtype=y0.dtype, device=y0.device)
    if linear:
        return torch.lerp(y0[None, :], y1[None, :], theta[:, None])
    w = dense_weights(coeffs, theta)
    k = stages if w.shape[1] == stages.shape[0] else torch.cat([stages, f1[None, :]])
    return torch.addmm(y0[None, :], w, k, alpha=h)


def needs_f1(coeffs: TableauTensors, stages: int) -> bool:
    """Whether :func:`interpolate` needs ``f(t1, y1)`` for this tableau."""
    return coeffs.dense is None or coeffs.dense.shape[0] > stages

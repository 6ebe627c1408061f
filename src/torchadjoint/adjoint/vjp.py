"""The augmented dynamics of the continuous adjoint, by vector-Jacobian products.

For the state ``z = [y, a_y, a_θ]`` (flat, lengths n, n, p) running backwards in time::

    dy/dt = f(t, y),   da_y/dt = -a_y · ∂f/∂y,   da_θ/dt = -a_y · ∂f/∂θ

Each evaluation is one call of ``f`` and one ``torch.autograd.grad`` call (no Jacobian).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

FlatFunc = Callable[[float, torch.Tensor], torch.Tensor]


def flat_param_grads(grads: Sequence, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-parameter gradients (None for unused ones → zeros): (p,)."""
    parts = [torch.zeros(p.numel(), dtype=p.dtype, device=p.device) if g is None else g.reshape(-1) for g, p in zip(grads, params)]
    return torch.cat(parts) if parts else torch.zeros(0)


def augmented_dynamics(flat_func: FlatFunc, n: int, params: Sequence[torch.Tensor]) -> FlatFunc:
    """``F_aug(t, z) -> dz/dt`` for ``z = [y, a_y, a_θ]`` (2n + p,)."""
    params = tuple(params)

    def dynamics(t: float, z: torch.Tensor) -> torch.Tensor:
        y, a = z[:n], z[n : 2 * n]
        with torch.enable_grad():
            y = y.detach().requires_grad_(True)
            fy = flat_func(t, y)
            if fy.requires_grad:
                grads = torch.autograd.grad(fy, (y,) + params, a, allow_unused=True)
            else:  # f depends on neither y nor the parameters
                grads = (None,) * (1 + len(params))
        vjp_y = grads[0] if grads[0] is not None else torch.zeros_like(a)
        parts = [fy.detach(), vjp_y.neg()]
        if params:
            parts.append(flat_param_grads(grads[1:], params).neg().to(z.dtype))
        return torch.cat(parts)

    return dynamics

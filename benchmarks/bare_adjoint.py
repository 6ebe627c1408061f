"""A bare dopri5 adjoint loop: what any eager PyTorch loop around the evaluations costs.

The same arithmetic as ``Backsolve``'s accepted steps and nothing else: fixed steps (as
many as the real solves took), no error estimate or step control, no landings, checks,
statistics or autograd.Function. Forward without a graph; backward one solve of
``[y, a_y]`` with ``a_θ += h Σ b_i k_i^θ`` accumulated beside it. :mod:`bench_adjoint`
reports its wall time over the ideal cost (evaluations × unit costs) next to ours: a
floor for the overhead target, measured in the same run.

It computes a real gradient (reported against the reference, so the floor is not the
cost of skipping work), but with fixed steps: not a solver anyone should use.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from torchadjoint.tableaux import DOPRI5


def _dopri5_step(F: Callable, z: torch.Tensor, f0: torch.Tensor, t0: float, h: float, a_rows, c) -> tuple:
    """One dopri5 step of ``dz/dt = F(t, z)`` (flat z): ``(z1, F(t0 + h, z1))``."""
    stages = z.new_empty((7, z.shape[0]))
    rows, columns = stages.unbind(0), stages.T
    rows[0].copy_(f0)
    zi = z
    for i in range(1, 7):
        zi = torch.addmv(z, columns[:, :i], a_rows[i], alpha=h)
        rows[i].copy_(F(t0 + c[i] * h, zi))
    return zi, rows[6]  # FSAL: the last stage input is z1


def bare_adjoint(func: torch.nn.Module, y0: torch.Tensor, t0: float, t1: float, fwd_steps: int, bwd_steps: int,
                 loss_grad: Callable[[torch.Tensor], torch.Tensor]) -> dict:
    """Forward from ``t0`` to ``t1`` in ``fwd_steps`` equal steps, backward in ``bwd_steps``;
    ``loss_grad(y1) -> dL/dy1``. Returns times, evaluation counts and the parameter gradient."""
    params = tuple(func.parameters())
    coeffs = DOPRI5.as_tensors(y0.dtype, y0.device)
    a_rows, c, b = coeffs.a_rows, [float(x) for x in DOPRI5.c], [float(x) for x in DOPRI5.b]
    shape, n = y0.shape, y0.numel()

    def tensor_t(t: float) -> torch.Tensor:
        return torch.scalar_tensor(t, dtype=y0.dtype, device=y0.device)

    start = time.perf_counter()
    with torch.no_grad():
        def f(t: float, y: torch.Tensor) -> torch.Tensor:
            return func(tensor_t(t), y.view(shape)).reshape(-1)

        y, h = y0.reshape(-1), (t1 - t0) / fwd_steps
        fy = f(t0, y)
        for k in range(fwd_steps):
            y, fy = _dopri5_step(f, y, fy, t0 + k * h, h, a_rows, c)
    fwd_s = time.perf_counter() - start

    a_theta = [torch.zeros_like(p) for p in params]
    parts = []  # parameter parts of the evaluations since the current step's first stage

    def augmented(t: float, z: torch.Tensor) -> torch.Tensor:
        y_part, a_part = z.split(n)
        with torch.enable_grad():
            y_leaf = y_part.detach().requires_grad_(True)
            out = func(tensor_t(t), y_leaf.view(shape)).reshape(-1)
            grads = torch.autograd.grad(out, (y_leaf,) + params, a_part.neg())
        parts.append(grads[1:])
        return torch.cat([out.detach(), grads[0]])

    with torch.no_grad():
        z, h = torch.cat([y, loss_grad(y.view(shape)).reshape(-1)]), (t0 - t1) / bwd_steps
        fz = augmented(t1, z)
        for k in range(bwd_steps):
            del parts[:-1]  # keep the first stage's (the previous step's last)
            z, fz = _dopri5_step(augmented, z, fz, t1 + k * h, h, a_rows, c)
            for weight, stage in zip(b, parts):
                if weight:
                    torch._foreach_add_(a_theta, list(stage), alpha=h * weight)
    total_s = time.perf_counter() - start
    grad = torch.cat([g.reshape(-1) for g in a_theta]).detach().double()
    return dict(fwd_nfe=1 + 6 * fwd_steps, bwd_nfe=1 + 6 * bwd_steps, bwd_vjp=1 + 6 * bwd_steps,
                fwd_s=fwd_s, total_s=total_s, grad=grad)

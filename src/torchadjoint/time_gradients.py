"""Gradients with respect to the output times, the same for every gradient method.

The formulas are stated with the adjoint equations (:mod:`torchadjoint.adjoint.vjp`):
for an output time ``t_i`` after the start, ``dL/dt_i = g_i · f(t_i, y(t_i))`` with
``g_i = dL/dy(t_i)`` (:func:`~torchadjoint.adjoint.vjp.output_time_gradient`); for the
start time, ``dL/dt_0 = -a_y(t_0⁺) · f(t_0, y0)``
(:func:`~torchadjoint.adjoint.vjp.start_time_gradient`), where ``a_y(t_0⁺)`` is the adjoint
arriving at ``t_0`` from the later outputs only (moving ``t_0`` moves the trajectory, not
``y0``, so a loss on ``y(t_0)`` itself does not count).

Two identity nodes realise this around any gradient method:

- :class:`StartTime` on the initial state: whatever gradient reaches the state the solve
  started from is ``a_y(t_0⁺)``, because the output ``y(t_0)`` is taken from the
  untracked ``y0`` (see :func:`torchadjoint.solve`), not from the solve;
- :class:`OutputTimes` on the outputs: adds ``g_i · f(t_i, y_i)`` for ``i ≥ 1``.

Their evaluations of ``f`` (one per output time the loss looks at, one for ``t_0``) are
counted in ``stats["time_gradients"]["nfe"]`` of the solution.
"""
from __future__ import annotations

from typing import Optional

import torch

from .adjoint.vjp import output_time_gradient, start_time_gradient
from .step import FlatFunc


def _refuse_double_backward() -> None:
    """These nodes compute ``dL/dt`` without a graph: a backward that builds one
    (``create_graph=True``) would give second derivatives that silently miss every path
    through the output times, so it is refused."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "second derivatives (a backward with create_graph=True) are not supported when t requires grad: the "
            "gradient with respect to the output times is computed without a graph, so differentiating it, or "
            "anything computed alongside it, would silently miss the paths through t. Pass t.detach() to solve; "
            "then gradient=Direct() gives derivatives of any order with respect to y0 and the parameters"
        )


def _count(stats: Optional[dict], calls: int) -> None:
    if stats is not None:
        entry = stats.setdefault("time_gradients", {"nfe": 0})
        entry["nfe"] += calls


def _remember(ctx, flat_func: FlatFunc, x: torch.Tensor, t: torch.Tensor, where, stats: Optional[dict]) -> torch.Tensor:
    """The forward of both nodes: keep what the backward needs, return ``x`` (a view)."""
    ctx.flat_func, ctx.where, ctx.stats = flat_func, where, stats
    ctx.save_for_backward(x.detach())
    ctx.t_shape, ctx.t_dtype, ctx.t_device = t.shape, t.dtype, t.device
    return x.view_as(x)


def _backward(ctx, grad: torch.Tensor, time_gradient) -> tuple:
    """Both nodes' backward: ``grad`` passes through; when ``t`` wants a gradient,
    ``time_gradient(saved, grad) -> (dL/dt, calls of f)`` gives it (without a graph)."""
    _refuse_double_backward()
    (saved,) = ctx.saved_tensors
    grad_t = None
    if ctx.needs_input_grad[2]:
        with torch.no_grad():
            grad_t, calls = time_gradient(saved, grad)
        _count(ctx.stats, calls)
    return None, grad, grad_t, None, None


class StartTime(torch.autograd.Function):
    """Identity on ``y0`` (n,); backward also gives ``dL/dt`` at index 0."""

    @staticmethod
    def forward(ctx, flat_func: FlatFunc, y0: torch.Tensor, t: torch.Tensor, t0: float, stats: Optional[dict] = None):
        return _remember(ctx, flat_func, y0, t, t0, stats)

    @staticmethod
    def backward(ctx, grad_y0):
        def at_start(y0: torch.Tensor, grad_y0: torch.Tensor):
            grad_t = torch.zeros(ctx.t_shape, dtype=ctx.t_dtype, device=ctx.t_device)
            grad_t[0] = start_time_gradient(grad_y0, ctx.flat_func(ctx.where, y0)).to(ctx.t_dtype)
            return grad_t, 1

        return _backward(ctx, grad_y0, at_start)


class OutputTimes(torch.autograd.Function):
    """Identity on ``ys`` (N, n); backward also gives ``dL/dt_i`` for ``i ≥ 1``."""

    @staticmethod
    def forward(ctx, flat_func: FlatFunc, ys: torch.Tensor, t: torch.Tensor, times, stats: Optional[dict] = None):
        return _remember(ctx, flat_func, ys, t, times, stats)

    @staticmethod
    def backward(ctx, grad_ys):
        def at_outputs(ys: torch.Tensor, grad_ys: torch.Tensor):
            grad_t = ys.new_zeros(len(ctx.where))
            looked_at = grad_ys.any(dim=1).tolist()
            for i in range(1, len(ctx.where)):
                # Skip f where the loss does not look: its contribution is zero.
                if looked_at[i]:
                    grad_t[i] = output_time_gradient(grad_ys[i], ctx.flat_func(ctx.where[i], ys[i]))
            return grad_t.to(dtype=ctx.t_dtype, device=ctx.t_device), sum(looked_at[1:])

        return _backward(ctx, grad_ys, at_outputs)

"""Gradients through a converged Newton solve by the implicit function theorem.

A stage value ``Y*`` solves ``G(Y) = base + γh f(t, Y) - Y = 0``. Its derivative with
respect to anything upstream (``base``, the parameters inside ``f``) is
``dY* = (I - γh J*)⁻¹ (d base + γh ∂f/∂θ dθ)`` with ``J* = ∂f/∂y(t, Y*)``: nothing of the
Newton iterations that found ``Y*`` enters. :func:`attach_stage_gradient` builds

    Y = Y* + C(base + γh f(t, Y*) - Y*)        (Y* detached)

where ``C`` returns zeros in the forward pass — the value is ``Y*`` bitwise, the same as
a solve without a graph, which the checkpointed replays rely on — and applies
``(I - γh J*)⁻ᵀ`` to the incoming gradient in the backward pass, with ``J*`` computed
afresh at ``Y*`` by the step's own linear solver (dense or block LU, or transposed GMRES
with vector-Jacobian products). Autograd then carries the gradient through ``base`` and
through the one evaluation ``f(t, Y*)`` to the parameters: the exact IFT gradient.
"""
from __future__ import annotations

import torch

from .jacobian import JacobianEvaluator


class _StageCorrection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, residual, gamma_h, f, t, y_star, jacobian):
        ctx.gamma_h, ctx.f, ctx.t, ctx.y_star, ctx.jacobian = gamma_h, f, t, y_star, jacobian
        return torch.zeros_like(residual)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "double backward through an implicit solver's step is not supported (the implicit function theorem "
                "is applied once); for higher derivatives use an explicit method with gradient=Direct()"
            )
        jac = ctx.jacobian(ctx.f, ctx.t, ctx.y_star)
        exact = ctx.jacobian.factor(jac, ctx.gamma_h)
        if exact.singular:
            raise RuntimeError(f"implicit step at t={ctx.t:.6g}: I - γhJ is singular at the converged stage; "
                               "its gradient does not exist there")
        return exact.solve_transposed(grad), None, None, None, None, None


def attach_stage_gradient(f, t: float, base: torch.Tensor, gamma_h: float, y_star: torch.Tensor,
                          jacobian: JacobianEvaluator) -> torch.Tensor:
    """``Y*`` (n,) with the IFT gradient attached to ``base`` (n,) and to what ``f`` closes
    over (one evaluation of ``f`` at ``Y*``, recorded)."""
    y_star = y_star.detach()
    residual = base + gamma_h * f(t, y_star) - y_star
    if not residual.requires_grad:
        return y_star
    return y_star + _StageCorrection.apply(residual, gamma_h, f, t, y_star, jacobian)

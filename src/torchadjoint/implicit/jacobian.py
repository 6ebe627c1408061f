"""Dense Jacobians ``∂f/∂y`` (n, n) of a flat ``f(t, y: (n,)) -> (n,)``, no graph.

By reverse-mode autograd (``torch.func.jacrev``: one call of ``f`` and one vectorised
backward pass carrying ``n`` cotangents; for small states about 4x cheaper than
``jacfwd``'s dispatch, measured on Robertson's 3 species) when ``f`` allows it, else by
forward differences (``n`` calls of ``f``, one per column). An ``f`` that
``torch.func`` cannot trace — the adjoint dynamics, which call ``torch.autograd.grad``
inside, or user code with data-dependent Python control flow — falls back to
differences the first time, for the rest of the solve.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .newton import NewtonMatrix

FlatFunc = Callable[[float, torch.Tensor], torch.Tensor]


class JacobianEvaluator:
    """``J = ∂f/∂y (t, y)`` as a detached (n, n) tensor.

    Args:
        measured: when only the first ``measured`` entries of the state can feed back
            into ``f`` (the adjoints' seminorm contract: ``a_θ`` never does), the other
            columns are known to be zero and differences skip them.

    ``count`` is the number of Jacobians computed; ``mode`` is ``"autograd"`` or
    ``"differences"`` (after the first failure of ``torch.func``).
    """

    def __init__(self, measured: Optional[int] = None):
        self.measured = measured
        self.count = 0
        self.mode = "autograd"

    def __call__(self, f: FlatFunc, t: float, y: torch.Tensor, fy: Optional[torch.Tensor] = None) -> torch.Tensor:
        self.count += 1
        y = y.detach()
        if self.mode == "autograd":
            try:
                with torch.no_grad():
                    return torch.func.jacrev(lambda x: f(t, x))(y).detach()
            except Exception:  # noqa: BLE001 - any op torch.func cannot trace: use differences
                self.mode = "differences"
        return self._differences(f, t, y, fy)

    def factor(self, jac: torch.Tensor, gamma_h: float):
        """The LU of ``I - γh J`` (see :class:`~.newton.NewtonMatrix`)."""
        return NewtonMatrix(jac, gamma_h)

    def _differences(self, f: FlatFunc, t: float, y: torch.Tensor, fy: Optional[torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            if fy is None:
                fy = f(t, y)
            fy = fy.detach()
            n = y.shape[0]
            cols = n if self.measured is None else min(self.measured, n)
            jac = y.new_zeros((n, n))
            # The classical increment sqrt(eps)·|y_j|, floored by the state's typical size so
            # that entries at zero get a step on the problem's own scale.
            eps = torch.finfo(y.dtype).eps
            typical = float(y[:cols].abs().mean()) if cols else 1.0
            floor = typical if typical > 0 and math.isfinite(typical) else 1.0
            for j in range(cols):
                delta = math.sqrt(eps) * max(abs(float(y[j])), floor)
                shifted = y.clone()
                shifted[j] += delta
                jac[:, j] = (f(t, shifted).detach() - fy) / (float(shifted[j]) - float(y[j]))
            return jac

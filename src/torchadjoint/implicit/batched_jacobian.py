"""Block-diagonal Jacobians for a batch of independent systems, and their batched LU.

The flattened state (n,) of a (B, m) tensor is B contiguous rows of m entries. When row
``b`` of ``f`` depends on row ``b`` of the state alone, ``∂f/∂y`` is block-diagonal with B
(m, m) blocks, and ``m`` probes find all of them at once: the probe ``e_j`` added to every
row (a "coloured" seed) returns column ``j`` of every block. By forward-mode autograd
(``torch.func.jacfwd`` over the m seeds: one vectorised pass) when ``f`` can be traced, else
by forward differences (m calls of ``f``, each row with its own increment).

Rows that do interact (a batch norm, a mean over the batch, a pytree state whose leaves are
not laid out row by row) would make these blocks wrong. So every Jacobian of the user's
``f`` is checked against one directional derivative of the whole ``f`` in a fixed random
direction ``v``: ``J v`` must equal ``blockdiag(J_b) v``, entry by entry, to rounding (autograd) or to the
differences' accuracy. A mismatch raises a ValueError that names the option.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .jacobian import JacobianEvaluator


class BatchedJacobianEvaluator:
    """``J`` as (B, m, m) blocks over the first ``k`` entries of the state.

    Args:
        batch_size: B, the number of independent rows.
        measured: None for the user's ``f`` (blocks over the whole state, checked). For
            adjoint dynamics, the number of leading entries that feed back (``a_y``): blocks
            over those, the rest left out of the iteration matrix, no check (a Newton
            approximation only; the backward solve is not differentiated).

    ``count``: Jacobians computed; ``mode``: "autograd" or "differences".
    """

    def __init__(self, batch_size: int, measured: Optional[int] = None):
        self.batch_size = batch_size
        self.measured = measured
        self.count = 0
        self.mode = "autograd"
        self._dense = None  # an adjoint state that does not split into rows: dense fallback

    def __call__(self, f, t: float, y: torch.Tensor, fy: Optional[torch.Tensor] = None):
        y = y.detach()
        n = y.shape[0]
        k = n if self.measured is None else min(self.measured, n)
        if k % self.batch_size:
            if self.measured is None:
                raise ValueError(
                    f"linear_solver=BatchedDense(batch_size={self.batch_size}): the state has {n} entries, not a "
                    f"multiple of {self.batch_size}; batch_size must be the leading dimension of a tensor state "
                    f"(batch_size, ...), or use Dense()"
                )
            if self._dense is None:
                self._dense = JacobianEvaluator(self.measured)
            self.count += 1
            return self._dense(f, t, y, fy)
        self.count += 1
        m = k // self.batch_size
        blocks = None
        if self.mode == "autograd":
            try:
                blocks = self._autograd(f, t, y, k, m)
            except Exception:  # noqa: BLE001 - any op torch.func cannot trace: use differences
                self.mode = "differences"
        if blocks is None:
            blocks = self._differences(f, t, y, fy, k, m)
        if self.measured is None:
            self._check(f, t, y, fy, blocks)
        return blocks

    def factor(self, jac: torch.Tensor, gamma_h: float):
        if jac.dim() == 2:  # the dense fallback
            return self._dense.factor(jac, gamma_h)
        return BlockNewtonMatrix(jac, gamma_h)

    # -- the blocks -----------------------------------------------------------------------

    def _autograd(self, f, t, y, k, m):
        rows, rest = y[:k].view(self.batch_size, m), y[k:]

        def coloured(u):  # u (m,) added to every row
            return f(t, torch.cat([(rows + u).reshape(k), rest]))[:k]

        with torch.no_grad():
            columns = torch.func.jacfwd(coloured)(y.new_zeros(m))  # (k, m): column j of every block
        return columns.detach().view(self.batch_size, m, m)

    def _differences(self, f, t, y, fy, k, m):
        with torch.no_grad():
            if fy is None:
                fy = f(t, y)
            fy = fy.detach()
            rows = y[:k].view(self.batch_size, m)
            blocks = y.new_zeros((self.batch_size, m, m))
            eps = torch.finfo(y.dtype).eps
            # Each row its own increment sqrt(eps)·max(|y|, the row's typical size).
            typical = rows.abs().mean(dim=1)
            floor = torch.where((typical > 0) & torch.isfinite(typical), typical, torch.ones_like(typical))
            for j in range(m):
                shifted = y.clone()
                shifted_rows = shifted[:k].view(self.batch_size, m)
                shifted_rows[:, j] += math.sqrt(eps) * torch.maximum(rows[:, j].abs(), floor)
                delta = shifted_rows[:, j] - rows[:, j]  # the increment actually represented
                change = (f(t, shifted).detach() - fy)[:k].view(self.batch_size, m)
                blocks[:, :, j] = change / delta[:, None]
            return blocks

    # -- the check ------------------------------------------------------------------------

    def _check(self, f, t, y, fy, blocks):
        """Raise if ``J v`` of the whole ``f`` differs from the blocks' product (rows interact)."""
        generator = torch.Generator().manual_seed(20261129)  # fixed: a solve stays deterministic
        v = torch.randn(y.shape[0], generator=generator, dtype=torch.float64).to(dtype=y.dtype, device=y.device)
        eps = torch.finfo(y.dtype).eps
        with torch.no_grad():
            if self.mode == "autograd":
                whole = torch.func.jvp(lambda x: f(t, x), (y,), (v,))[1].detach()
                tol, floor = math.sqrt(eps), eps
                noise = torch.zeros_like(whole)
            else:
                if fy is None:
                    fy = f(t, y)
                delta = math.sqrt(eps) * max(1.0, float(y.abs().max())) / float(v.abs().max())
                whole = (f(t, y + delta * v).detach() - fy.detach()) / delta
                tol, floor = eps**0.25, eps**0.25
                # The differences' rounding, eps·|f|/delta, is relative to f's size, not J v's.
                noise = fy.detach().abs() * (eps / delta)
            rows = v.view(self.batch_size, -1, 1)
            product = torch.bmm(blocks, rows).reshape(-1)
            # Entry by entry: a coupling in slow rows must not hide under a stiff row's scale
            # (rows at 1e7 next to rows at 1 are the usual stiff batch). The floor, a small
            # fraction of the largest entry, absorbs rounding in entries that are nearly zero.
            scale = torch.bmm(blocks.abs(), rows.abs()).reshape(-1) + whole.abs() + noise
            size = float(scale.max())
            excess = (whole - product).abs() - tol * (scale + floor * size)
            worst = int(torch.argmax(torch.nan_to_num(excess, nan=float("inf"))))
            mismatch = float((whole - product).abs()[worst])
            relative = mismatch / max(float(scale[worst]), 1e-300)
            interacting = not math.isfinite(float(excess[worst])) or float(excess[worst]) > 0
        if interacting:
            if not math.isfinite(size):
                return  # a non-finite Jacobian: the factorisation reports it and Newton fails
            raise ValueError(
                f"linear_solver=BatchedDense(batch_size={self.batch_size}): at t={t:.6g} the rows of the state "
                f"interact through f (a directional derivative of the whole f differs from the block-diagonal "
                f"Jacobian's by {mismatch:.3g} at entry {worst} of the flattened state, relative {relative:.3g}); the state must be a tensor "
                f"(batch_size, ...) whose rows evolve independently (no batch norm or batch mean in f). Use Dense() "
                f"or Krylov() otherwise"
            )


class BlockNewtonMatrix:
    """The LU of ``I - γh J_b`` for every block (B, m, m) (batched ``lu_factor_ex``); entries
    of the state past the blocks get the identity. ``solve``/``solve_transposed`` take (n,)."""

    def __init__(self, blocks: torch.Tensor, gamma_h: float):
        self.gamma_h = gamma_h
        work = blocks.float() if blocks.dtype in (torch.float16, torch.bfloat16) else blocks
        eye = torch.eye(work.shape[-1], dtype=work.dtype, device=work.device)
        self.lu, self.pivots, info = torch.linalg.lu_factor_ex(eye - gamma_h * work)
        self.k = blocks.shape[0] * blocks.shape[1]
        self.singular = bool((info != 0).any()) or not bool(torch.isfinite(self.lu).all())

    def _apply(self, r: torch.Tensor, adjoint: bool) -> torch.Tensor:
        rows = r[: self.k].to(self.lu.dtype).view(self.lu.shape[0], -1, 1)
        x = torch.linalg.lu_solve(self.lu, self.pivots, rows, adjoint=adjoint).reshape(-1).to(r.dtype)
        return torch.cat([x, r[self.k:]]) if r.shape[0] > self.k else x

    def solve(self, r: torch.Tensor) -> torch.Tensor:
        return self._apply(r, adjoint=False)

    def solve_transposed(self, r: torch.Tensor) -> torch.Tensor:
        return self._apply(r, adjoint=True)

"""Fixed-step Adams methods (torchdiffeq's ``explicit_adams``, ``implicit_adams``,
``fixed_adams``): 4th-order Adams–Bashforth, optionally corrected by Adams–Moulton.

Multistep, not Runge–Kutta: a step uses ``f`` at the last four grid points, which the
stepper (:mod:`torchadjoint.multistep.adams_step`) keeps across steps. The first three
steps of a solve (and any step whose size differs from the grid spacing, or that follows
a change of the state by a landing) are taken by Kutta's 3/8 rule, order 4 as well, as
torchdiffeq bootstraps them. The coefficients are checked when the tableau is built:
each formula integrates the polynomials it must integrate exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

import torch

from .base import TableauTensors, cached_cast

# y1 = y0 + h Σ_j β_j f(t0 - j h): Adams–Bashforth 4 (j = 0 … 3).
BASHFORTH4 = (Fraction(55, 24), Fraction(-59, 24), Fraction(37, 24), Fraction(-9, 24))
# y1 = y0 + h Σ_j β_j f(t0 - (j - 1) h): Adams–Moulton, 3 steps, order 4 (j = 0: f at t1).
MOULTON4 = (Fraction(9, 24), Fraction(19, 24), Fraction(-5, 24), Fraction(1, 24))


def _check_exact(coefficients, first_node: int, degree: int, name: str) -> None:
    # ∫_0^1 s^q ds = 1/(q+1) with nodes s_j = first_node - j (in units of h): exact for
    # every polynomial f of degree ≤ `degree` means order degree + 1.
    for q in range(degree + 1):
        total = sum(beta * Fraction(first_node - j) ** q for j, beta in enumerate(coefficients))
        if total != Fraction(1, q + 1):
            raise ValueError(f"{name}: not exact for s^{q} (∫ = {total}, expected 1/{q + 1})")


_check_exact(BASHFORTH4, 0, 3, "Adams–Bashforth 4")
_check_exact(MOULTON4, 1, 3, "Adams–Moulton 4")


@dataclass(frozen=True)
class AdamsTableau:
    """A fixed-step Adams method of order 4.

    ``corrector``: apply Adams–Moulton after the Adams–Bashforth predictor, iterating
    ``f(t1, y1)`` up to ``max_iters`` times (until the correction changes ``y1`` by less
    than ``1e-10`` relative to its size). For the dense output between grid points the
    step reports two "stages", ``f0`` and ``(y1 - y0)/h``, with ``b = (0, 1)``, so the
    cubic Hermite interpolant through ``y0, y1, f0, f1`` applies.
    """

    name: str
    corrector: bool
    max_iters: int = 4
    order: int = 4
    c: tuple = field(init=False, default=(0.0, 1.0))
    b: tuple = field(init=False, default=(0.0, 1.0))
    b_error: None = field(init=False, default=None)
    dense: None = field(init=False, default=None)
    fsal: bool = field(init=False, default=False)

    @property
    def stages(self) -> int:
        return 2

    @property
    def adaptive(self) -> bool:
        return False

    def as_tensors(self, dtype: torch.dtype, device: torch.device) -> TableauTensors:
        """The step's two "stages" as tensors (cached per pair: :func:`~.base.cached_cast`)."""
        return cached_cast(self, dtype, device, self._cast)

    def _cast(self, dtype: torch.dtype, device: torch.device) -> TableauTensors:
        a = torch.zeros(2, 2, dtype=dtype, device=device)
        b = torch.tensor(self.b, dtype=dtype, device=device)
        return TableauTensors(a, b, None, None, (a[0, :0], a[1, :1]))

    def make_stepper(self, controller=None, f=None):
        """The stepper of one solve (it keeps the history of ``f``)."""
        from ..multistep.adams_step import AdamsStepper

        return AdamsStepper(self)


EXPLICIT_ADAMS = AdamsTableau(name="explicit_adams", corrector=False)
IMPLICIT_ADAMS = AdamsTableau(name="implicit_adams", corrector=True)
FIXED_ADAMS = AdamsTableau(name="fixed_adams", corrector=True)

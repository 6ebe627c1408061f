"""Kutta's 3/8 rule: order 4, fixed step (torchdiffeq's ``rk4``).

Same order as the classical method, a smaller error constant, and its stages sit at
``c = 0, 1/3, 2/3, 1``. torchdiffeq's fixed-grid ``rk4`` takes exactly these steps, so the
torchdiffeq-style front door (:mod:`torchadjoint.compat`) maps ``method="rk4"`` here.
"""
from .base import ButcherTableau

RK4_38 = ButcherTableau(
    name="rk4_38",
    order=4,
    c=(0.0, 1 / 3, 2 / 3, 1.0),
    a=((), (1 / 3,), (-1 / 3, 1.0), (1.0, -1.0, 1.0)),
    b=(1 / 8, 3 / 8, 3 / 8, 1 / 8),
)

"""Adaptive Heun: Heun's method (order 2) with Euler (order 1) as the error estimate."""
from .base import ButcherTableau

ADAPTIVE_HEUN = ButcherTableau(
    name="adaptive_heun",
    order=2,
    c=(0.0, 1.0),
    a=((), (1.0,)),
    b=(0.5, 0.5),
    b_error=(0.5, -0.5),
)

"""Heun's method (explicit trapezoidal rule): order 2, fixed step."""
from .base import ButcherTableau

HEUN2 = ButcherTableau(name="heun2", order=2, c=(0.0, 1.0), a=((), (1.0,)), b=(0.5, 0.5))

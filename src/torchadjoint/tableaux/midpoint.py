"""Explicit midpoint rule: order 2, fixed step."""
from .base import ButcherTableau

MIDPOINT = ButcherTableau(name="midpoint", order=2, c=(0.0, 0.5), a=((), (0.5,)), b=(0.0, 1.0))

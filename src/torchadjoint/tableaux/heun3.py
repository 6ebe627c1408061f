"""Heun's third-order method: order 3, fixed step."""
from .base import ButcherTableau

HEUN3 = ButcherTableau(
    name="heun3",
    order=3,
    c=(0.0, 1 / 3, 2 / 3),
    a=((), (1 / 3,), (0.0, 2 / 3)),
    b=(1 / 4, 0.0, 3 / 4),
)

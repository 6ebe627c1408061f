"""Runge–Kutta–Fehlberg 2(1): order 2 with an embedded order-1 estimate."""
from .base import ButcherTableau

FEHLBERG2 = ButcherTableau(
    name="fehlberg2",
    order=2,
    c=(0.0, 0.5, 1.0),
    a=((), (0.5,), (1 / 256, 255 / 256)),
    b=(1 / 512, 255 / 256, 1 / 512),
    b_error=(-1 / 512, 0.0, 1 / 512),
)

"""Kværnø's ESDIRK 3(2): order 3, 4 stages (the first explicit), L-stable, stiffly
accurate, with an embedded order-2 solution (the third stage value).

A. Kværnø, "Singly diagonally implicit Runge–Kutta methods with an explicit first
stage", BIT 44 (2004) 489–502. Every coefficient is a function of γ, the root near 0.436
of 6γ³ − 18γ² + 9γ − 1 = 0 (the value that makes the 3-stage SDIRK part L-stable).
"""
import numpy as np

from .esdirk import ESDIRKTableau

_GAMMA = float(min(r.real for r in np.roots([6.0, -18.0, 9.0, -1.0]) if 0.4 < r.real < 0.5))
_g = _GAMMA
_A31 = (-4 * _g**2 + 6 * _g - 1) / (4 * _g)
_A32 = (-2 * _g + 1) / (4 * _g)
_A41 = (6 * _g - 1) / (12 * _g)
_A42 = -1 / ((24 * _g - 12) * _g)
_A43 = (-6 * _g**2 + 6 * _g - 1) / (6 * _g - 3)

KVAERNO3 = ESDIRKTableau(
    name="kvaerno3",
    order=3,
    c=(0.0, 2 * _g, 1.0, 1.0),
    a=((0.0,), (_g, _g), (_A31, _A32, _g), (_A41, _A42, _A43, _g)),
    b_error=(_A41 - _A31, _A42 - _A32, _A43 - _g, _g),
)

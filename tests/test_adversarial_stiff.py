"""Adversarial probes of the implicit (stiff) methods, written from the README alone.

Every reference is independent of the library: scipy's Radau (tight tolerances), matrix_exp
for linear systems, closed forms, central differences of tight scipy solves, torchdiffeq.
Plain tests guard what was found right; ``xfail(strict=True)`` tests record what was found
wrong, with the measured numbers (the reproducers are in the closing note's folder,
``p*.py``, one per probe).
"""
import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

import torchadjoint as ta
from torchadjoint import compat
from torchadjoint.implicit import BatchedDense, Krylov

F64 = torch.float64
# A fixed rotation mixes a slow and a fast decay, so that no state entry is an eigenvector.
Q = torch.tensor([[0.8, -0.6], [0.6, 0.8]], dtype=F64)


def mixed(rates: torch.Tensor) -> torch.Tensor:
    """(2, 2) matrix ``Q diag(-rates) Qᵀ``: eigenvalues ``-rates``, differentiable in them."""
    return Q @ torch.diag(-rates) @ Q.T


def robertson(k=(0.04, 1e4, 3e7)):
    def f(t, y):
        y1, y2, y3 = y[0], y[1], y[2]
        return torch.stack([-k[0] * y1 + k[1] * y2 * y3, k[0] * y1 - k[1] * y2 * y3 - k[2] * y2 ** 2, k[2] * y2 ** 2])
    return f


def robertson_np(k=(0.04, 1e4, 3e7)):
    def f(t, y):
        y1, y2, y3 = y
        return [-k[0] * y1 + k[1] * y2 * y3, k[0] * y1 - k[1] * y2 * y3 - k[2] * y2 ** 2, k[2] * y2 ** 2]
    return f


def radau(f, t_eval, y0, **kw):
    """(T, n) scipy Radau at rtol 1e-12: the reference for values."""
    return solve_ivp(f, (t_eval[0], t_eval[-1]), y0, method="Radau", rtol=1e-12, atol=1e-20, t_eval=t_eval, **kw).y.T


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------

ROBERTSON_T = np.array([0.0, 1e-3, 0.4, 40.0, 4e3, 4e5])


@pytest.fixture(scope="module")
def robertson_reference():
    return radau(robertson_np(), ROBERTSON_T, [1.0, 0.0, 0.0])


@pytest.mark.parametrize("method", ["kvaerno5"])  # kvaerno3: p01 (7.0 tolerances, 3.4x the evaluations)
def test_robertson_values_land_within_a_few_tolerances(method, robertson_reference):
    # Measured (p01): kvaerno5 3.2, kvaerno3 7.0 tolerances at the worst output time.
    rtol, atol = 1e-6, 1e-10
    sol = ta.solve(robertson(), torch.tensor([1.0, 0.0, 0.0], dtype=F64), torch.tensor(ROBERTSON_T), method=method,
                   rtol=rtol, atol=atol)
    err = np.abs(sol.ys.numpy() - robertson_reference) / (atol + rtol * np.abs(robertson_reference))
    assert err.max() < 20, err.max(axis=0)


def test_robertson_loose_tolerances_in_float32_stay_near_the_tolerance(robertson_reference):
    # Was 50-70 tolerances off (p14b, p14c: 437 Newton failures in 782 steps, 7968 evaluations):
    # Newton handed the next stage the rate of a stage's last iteration, not its largest, and
    # accepted first iterations on it. Now 0.06 tolerances (616 Newton failures in 905 steps,
    # 7589 evaluations); float64 at the same tolerances 0.67 (was 4.8, 1782 evaluations
    # against 3111). scipy's Radau/BDF/LSODA (float64): 0.01/2.5/2.8 with 400-640 evaluations.
    rtol, atol = 1e-4, 1e-8
    sol = ta.solve(robertson(), torch.tensor([1.0, 0.0, 0.0]), torch.tensor(ROBERTSON_T, dtype=torch.float32),
                   method="kvaerno5", rtol=rtol, atol=atol)
    ys = sol.ys.double().numpy()
    err = np.abs(ys - robertson_reference) / (atol + rtol * np.abs(robertson_reference))
    assert err.max() < 10, err.max(axis=1)


def test_odd_output_times_land_exactly():
    # Two outputs 2e-16 apart, a first output 1e-14 after t0, offset times, geometric outputs;
    # measured (p13): 1.4e-9 .. 2.8e-9 against matrix_exp at rtol 1e-8.
    A = mixed(torch.tensor([1.0, 1000.0], dtype=F64))
    y0 = torch.tensor([1.0, -0.5], dtype=F64)
    for tt in (torch.tensor([0.0, 0.5, 0.5 + 2e-16, 1.0], dtype=F64), torch.tensor([0.0, 1e-14, 1.0], dtype=F64),
               torch.tensor([1e6, 1e6 + 1e-9, 1e6 + 1.0], dtype=F64)):  # 50 geometric outputs: p13
        sol = ta.solve(lambda s, y: A @ y, y0, tt, method="kvaerno5", rtol=1e-8, atol=1e-10)
        exact = torch.stack([torch.linalg.matrix_exp(A * (ti - tt[0])) @ y0 for ti in tt])
        assert (sol.ys - exact).abs().max() < 2e-8


def test_discontinuous_forcing_and_untraceable_f():
    # y' = -1000 (y - sign(t - 0.5)): measured 5e-13 off the closed form (p10 d).
    tt = torch.tensor([0.0, 0.4, 0.6, 1.0], dtype=F64)
    sol = ta.solve(lambda t, y: -1000 * (y - torch.sign(t - 0.5)), torch.zeros(1, dtype=F64), tt, method="kvaerno5",
                   rtol=1e-8, atol=1e-10)
    exact = torch.tensor([0.0, -1 + math.exp(-400), 1 - 2 * math.exp(-100), 1.0], dtype=F64)
    assert (sol.ys.flatten() - exact).abs().max() < 1e-8
    # f through NumPy (jacrev cannot trace it): finite-difference Jacobians, 5e-10 off (p10 b).
    A = np.array([[-1.0, 0.5], [0.0, -800.0]])
    y0 = torch.tensor([1.0, 2.0], dtype=F64)
    tt = torch.tensor([0.0, 0.01, 1.0], dtype=F64)
    sol = ta.solve(lambda t, y: torch.from_numpy(A @ y.detach().numpy()), y0, tt, method="kvaerno5", rtol=1e-9,
                   atol=1e-11)
    exact = torch.stack([torch.linalg.matrix_exp(torch.from_numpy(A) * ti) @ y0 for ti in tt])
    assert (sol.ys - exact).abs().max() < 1e-8


def test_blow_up_raises_solve_error_with_the_time():
    with pytest.raises(ta.SolveError) as info:
        ta.solve(lambda t, y: y ** 2, torch.ones(1, dtype=F64), torch.tensor([0.0, 2.0], dtype=F64), method="kvaerno5")
    assert abs(info.value.t - 1.0) < 1e-3
    # (y' = -1000 sqrt(y), not Lipschitz where it reaches 0 at t = 2e-3: SolveError there, p10 c.)


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------


def _linear_loss(ys):
    w = torch.tensor([[1.0, 2.0], [-1.0, 0.5], [0.3, -0.7]], dtype=F64)
    return (ys[1:] * w).sum() + ys[-1].pow(2).sum() + 0.1 * ys[0].sum()


def _linear_grads(rates, tt, solve_with=None):
    """(ys, dL/dy0, dL/drates, dL/dt) for y' = mixed(rates) y, by matrix_exp or a solve."""
    th = rates.clone().requires_grad_()
    y0 = torch.tensor([1.0, -0.5], dtype=F64, requires_grad=True)
    t = tt.clone().requires_grad_()
    if solve_with is None:
        ys = torch.stack([torch.linalg.matrix_exp(mixed(th) * (ti - t[0])) @ y0 for ti in t])
    else:
        ys = solve_with(lambda s, y: mixed(th) @ y, y0, t, [th])
    return (ys.detach(),) + torch.autograd.grad(_linear_loss(ys), (y0, th, t))


@pytest.mark.parametrize("method, gradient", [("kvaerno5", ta.Direct()), ("kvaerno5", ta.Checkpointed())], ids=repr)
def test_stiff_linear_gradients_against_matrix_exp(method, gradient):
    # Eigenvalues -1, -1000 (Direct(checkpoints=2) and kvaerno3: p02, the same numbers); measured (p02): values 1.6e-9, dL/dy0 1e-9 relative, dL/dθ of the
    # slow rate 2e-5 .. 6e-6 relative (the fast rate's is 4.5e-7 and is met to 1e-11 absolute);
    # dL/dt 2e-6 relative: dL/dt_i = g_i·f(t_i, y(t_i)) and f multiplies y's error (1e-9) by
    # the stiffness (1000) at t = 0.01, as it must.
    rates = torch.tensor([1.0, 1000.0], dtype=F64)
    tt = torch.tensor([0.0, 0.01, 0.5, 2.0], dtype=F64)
    ref = _linear_grads(rates, tt)
    got = _linear_grads(rates, tt, lambda f, y0, t, p: ta.solve(f, y0, t, method=method, gradient=gradient, params=p,
                                                                 rtol=1e-7, atol=1e-9).ys)  # p02: rtol 1e-8
    assert (got[0] - ref[0]).abs().max() < 1e-7
    assert (got[1] - ref[1]).abs().max() < 1e-6 * ref[1].abs().max()
    assert (got[2] - ref[2]).abs().max() < 1e-4 * ref[2].abs().max()
    assert (got[3] - ref[3]).abs().max() < 1e-4 * ref[3].abs().max()


@pytest.mark.parametrize("sign, offset, gradient", [(-1, -3e6, ta.Checkpointed())], ids=repr)  # the rest: p03
def test_time_gradients_reversed_and_offset(sign, offset, gradient):
    # Reversed: rates flipped, so backwards in time is the stiff decaying direction. Measured
    # (p03): dL/dt 6.4e-9 relative for every direction and offset at rtol 1e-9 (here 1e-6).
    rates = sign * torch.tensor([1.0, 1000.0], dtype=F64)
    tt = offset + sign * torch.tensor([0.0, 0.003, 0.4, 1.5], dtype=F64)
    ref = _linear_grads(rates, tt)
    got = _linear_grads(rates, tt, lambda f, y0, t, p: ta.solve(f, y0, t, method="kvaerno5", gradient=gradient,
                                                                 params=p, rtol=1e-6, atol=1e-8).ys)
    for g, r in zip(got[1::2], ref[1::2]):  # dL/dy0, dL/dt
        assert (g - r).abs().max() < 5e-5 * r.abs().max()


@pytest.mark.parametrize("gradient", [ta.Direct()], ids=repr)  # Checkpointed: p04 (5.4e-7), left out for time
def test_prothero_robinson_parameter_and_time_gradients(gradient):
    # y' = λ(y - sin 3t) + 3 cos 3t, λ = -200 a parameter, t0 = 0.7 requiring grad. Closed form
    # y = sin 3t + (y0 - sin 3t0) e^{λ(t-t0)}. Measured (p04): values 7.5e-10, dL/dλ 2.6e-8 (Direct),
    # 5.4e-7 (Checkpointed) relative, dL/dt 9e-9 (rtol 1e-9; here 1e-8).
    base = torch.tensor([0.0, 0.005, 0.02, 0.3, 1.0], dtype=F64)

    def grads(use_solver):
        lam = torch.tensor(-200.0, dtype=F64, requires_grad=True)
        y0 = torch.tensor(1.3, dtype=F64, requires_grad=True)
        t = (0.7 + base).requires_grad_()
        if use_solver:
            f = lambda s, y: lam * (y - torch.sin(3 * s)) + 3 * torch.cos(3 * s)
            ys = ta.solve(f, y0, t, method="kvaerno5", gradient=gradient, params=[lam], rtol=1e-8, atol=1e-10).ys
        else:
            ys = torch.sin(3 * t) + (y0 - torch.sin(3 * t[0])) * torch.exp(lam * (t - t[0]))
        loss = (ys * torch.linspace(1, 2, len(base), dtype=F64)).sum() + ys[-1] ** 2
        return (ys.detach(),) + torch.autograd.grad(loss, (y0, lam, t))

    got, ref = grads(True), grads(False)
    assert (got[0] - ref[0]).abs().max() < 5e-8
    for g, r in zip(got[1:], ref[1:]):
        assert (g - r).abs().max() < 5e-6 * r.abs().max()


@pytest.mark.parametrize("kind, gradient", [("dict", ta.Direct())], ids=repr)  # tuple, Checkpointed: p05
def test_tree_states_against_matrix_exp(kind, gradient):
    # A coupled 5-state stiff system split into a dict whose f returns the keys in another
    # order (shapes (2, 1) and (3,)), or a tuple. Measured (p05): values 7e-10, gradients ≤ 8e-9
    # (rtol 1e-9; here 1e-8).
    torch.manual_seed(0)
    A0 = torch.randn(5, 5, dtype=F64) * 0.3 - torch.diag(torch.tensor([1.0, 2.0, 500.0, 1000.0, 3.0], dtype=F64))
    t = torch.tensor([0.0, 0.01, 0.3, 1.0], dtype=F64)
    w = torch.randn(len(t), 5, dtype=F64)

    def run(use_solver):
        y0 = torch.tensor([1.0, -0.5, 0.3, 0.8, -1.2], dtype=F64, requires_grad=True)
        A = A0.clone().requires_grad_()
        if not use_solver:
            ys = torch.stack([torch.linalg.matrix_exp(A * ti) @ y0 for ti in t])
        elif kind == "dict":
            def f(s, y):
                z = A @ torch.cat([y["a"].reshape(-1), y["b"]])
                return {"b": z[2:], "a": z[:2].reshape(2, 1)}
            sol = ta.solve(f, {"a": y0[:2].reshape(2, 1), "b": y0[2:]}, t, method="kvaerno5", gradient=gradient,
                           params=[A], rtol=1e-8, atol=1e-10)
            ys = torch.cat([sol.ys["a"].reshape(len(t), 2), sol.ys["b"]], dim=1)
        else:
            def f(s, y):
                z = A @ torch.cat(y)
                return z[:3], z[3:]
            sol = ta.solve(f, (y0[:3], y0[3:]), t, method="kvaerno5", gradient=gradient, params=[A], rtol=1e-8,
                           atol=1e-10)
            ys = torch.cat(sol.ys, dim=1)
        return (ys.detach(),) + torch.autograd.grad((ys * w).sum(), (y0, A))

    got, ref = run(True), run(False)
    assert (got[0] - ref[0]).abs().max() < 5e-8
    for g, r in zip(got[1:], ref[1:]):
        assert (g - r).abs().max() < 5e-7 * r.abs().max()


@pytest.mark.parametrize("gradient", [ta.Checkpointed()], ids=repr)  # Direct: p09
def test_loss_scale_changes_no_step_and_scales_the_gradient(gradient):
    # Van der Pol μ = 50, loss × 1e-8 and × 1e8. Measured (p09, to t = 1.5 at rtol 1e-6): 2e-15
    # relative, the same backward steps.
    def run(c):
        mu = torch.tensor(50.0, dtype=F64, requires_grad=True)
        y0 = torch.tensor([2.0, 0.0], dtype=F64, requires_grad=True)
        f = lambda s, y: torch.stack([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])
        sol = ta.solve(f, y0, torch.tensor([0.0, 0.2, 0.5], dtype=F64), method="kvaerno5", gradient=gradient,
                       params=[mu], rtol=1e-5, atol=1e-7)
        g = torch.autograd.grad(c * (sol.ys[1:, 0].sum() + sol.ys[-1, 1]), (y0, mu))
        return torch.cat([g[0], g[1].reshape(1)]) / c, (sol.stats.get("backward") or {}).get("steps")

    (g_small, s_small), (g_large, s_large) = run(1e-8), run(1e8)
    assert (g_small - g_large).abs().max() < 1e-12 * g_large.abs().max()
    assert s_small == s_large


@pytest.mark.parametrize("method", ["kvaerno5"])
def test_double_backward_through_an_implicit_step_is_refused_clearly(method):
    th = torch.tensor([1.0, 300.0], dtype=F64, requires_grad=True)
    sol = ta.solve(lambda s, y: mixed(th) @ y, torch.tensor([1.0, -0.5], dtype=F64),
                   torch.tensor([0.0, 1.0], dtype=F64), method=method, gradient=ta.Direct(), params=[th])
    # Refused as soon as the first backward is asked to build a graph (create_graph=True).
    with pytest.raises(RuntimeError, match="double backward through an implicit"):
        torch.autograd.grad(sol.ys[-1].pow(3).sum(), th, create_graph=True)


def _rotation_grads(method, gradient, rtol):
    """(dL/dy0, dL/dθ, dL/dt) on the non-stiff rotation y' = [[-θ0, θ1], [-θ1, -θ0]] y."""
    def A_of(th):
        return torch.stack([torch.stack([-th[0], th[1]]), torch.stack([-th[1], -th[0]])])

    th = torch.tensor([0.3, 2.0], dtype=F64, requires_grad=True)
    y0 = torch.tensor([1.0, -0.5], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.3, 1.1, 2.0], dtype=F64, requires_grad=True)
    if method is None:
        ys = torch.stack([torch.linalg.matrix_exp(A_of(th) * (ti - t[0])) @ y0 for ti in t])
    else:
        ys = ta.solve(lambda s, y: A_of(th) @ y, y0, t, method=method, gradient=gradient, params=[th], rtol=rtol,
                      atol=rtol * 1e-2).ys
    loss = (ys[1:] * torch.tensor([[1.0, -2.0], [0.5, 0.3], [2.0, 1.0]], dtype=F64)).sum()
    return torch.autograd.grad(loss, (y0, th, t))


@pytest.mark.parametrize("gradient", [ta.Backsolve()], ids=repr)  # Quadrature: p16 (6.4e-7)
def test_backsolve_and_quadrature_with_kvaerno3_on_a_non_stiff_problem(gradient):
    # README: Backsolve and Quadrature work with implicit methods on non-stiff problems.
    # Measured (p16): kvaerno3 9.6e-7 / 6.4e-7 relative at rtol 1e-6 (9.4e-10 / 6.4e-10 at 1e-9);
    # here rtol 1e-5.
    got, ref = _rotation_grads("kvaerno3", gradient, 1e-5), _rotation_grads(None, None, None)
    for g, r in zip(got, ref):
        assert (g - r).abs().max() < 1e-4 * r.abs().max()


@pytest.mark.parametrize("gradient", [ta.Backsolve(), ta.Checkpointed(), ta.Quadrature()], ids=repr)
def test_kvaerno5_continuous_adjoint_parameter_gradient_near_the_tolerance(gradient):
    # Was 40-50 tolerances off (p16, rtol 1e-9: dL/dθ relative error 4.9e-8 Backsolve, 4.8e-8
    # Checkpointed, 4.4e-8 Quadrature; y0 and the forward values fine). Two causes:
    # - Newton handed the next stage a rate of ~0 measured after a_θ had converged, so first
    #   iterations were accepted with a_θ 119 tolerances off (test_stiff_tableaux: the same
    #   system as a plain solve). Backsolve 3.8e-9, Checkpointed 2.2e-9 once fixed.
    # - Quadrature read (y, a_y) at its Gauss nodes from cubic Hermite (order 3): 20, 30, 44,
    #   68, 107 tolerances at rtol 1e-7 ... 1e-11, order 4.2 in the steps. With kvaerno5's
    #   order-4 dense output 3.8e-9, as Backsolve on the same steps; both converge at order
    #   5.3 (3.7e-10 at rtol 1e-10, 3.7e-11 at 1e-11). dopri5 / kvaerno3 backward: 0.5-2.5e-9.
    got, ref = _rotation_grads("kvaerno5", gradient, 1e-9), _rotation_grads(None, None, None)
    assert (got[1] - ref[1]).abs().max() < 1e-8 * ref[1].abs().max()


# --------------------------------------------------------------------------------------------
# Linear solvers
# --------------------------------------------------------------------------------------------


VDP_MUS = torch.tensor([1.0, 10.0, 100.0, 300.0], dtype=F64)
VDP_Y0 = torch.tensor([[2.0, 0.0], [1.0, 0.5], [-1.5, 0.2], [2.0, -0.1]], dtype=F64)
VDP_T = torch.tensor([0.0, 0.1, 0.4], dtype=F64)


def _vdp_batch(mu):
    """Van der Pol rows, one μ per row, as one (4, 2) state."""
    return lambda s, y: torch.stack([y[:, 1], mu * (1 - y[:, 0] ** 2) * y[:, 1] - y[:, 0]], dim=1)


def _vdp_row_reference(i, mu):
    """(T, 2) scipy Radau of row i with μ = mu."""
    return radau(lambda s, y: [y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]], VDP_T.numpy(), VDP_Y0[i].numpy())


def _vdp_loss(ys):  # ys (T, b, 2); each row's part depends on its own μ alone
    return ys[-1, :, 0].sum() + 0.5 * ys[2].pow(2).sum()


def _vdp_row_gradient_fd(i):
    """dL/dμ_i by central differences of scipy (rows are independent: row i alone)."""
    def part(mu):
        ys = _vdp_row_reference(i, mu)
        return ys[-1, 0] + 0.5 * (ys[2] ** 2).sum()
    h = 1e-5 * float(VDP_MUS[i])
    return (part(float(VDP_MUS[i]) + h) - part(float(VDP_MUS[i]) - h)) / (2 * h)


def _vdp_gradient(method, gradient, rtol):
    mu = VDP_MUS.clone().requires_grad_()
    sol = ta.solve(_vdp_batch(mu), VDP_Y0, VDP_T, method=method, gradient=gradient, params=[mu], rtol=rtol,
                   atol=rtol * 1e-2)
    return torch.autograd.grad(_vdp_loss(sol.ys), mu)[0]


def test_batched_dense_values():
    # Measured (p06, to t = 2): dense, BatchedDense and Krylov all within 1.7 tolerances of
    # scipy Radau; (p17) BatchedDense + Checkpointed dL/dμ within 2e-6 of central differences
    # (relative to the largest entry) at rtol 1e-6, the dense path's numbers to 4e-8; with
    # Direct the same steps and the dense path's gradient to rounding.
    ref = np.stack([_vdp_row_reference(i, float(m)) for i, m in enumerate(VDP_MUS)], axis=1)
    batched = ta.METHODS["kvaerno5"].with_linear_solver(BatchedDense(batch_size=4))
    ys = ta.solve(_vdp_batch(VDP_MUS), VDP_Y0, VDP_T, method=batched, rtol=1e-6, atol=1e-8).ys.numpy()
    # Scaled by each row's size: the error norm is one RMS over the whole batch, so a
    # component passing near 0 (v of the μ = 10 row, 0.019 at t = 0.4) is held to its row's
    # tolerance, not its own (measured: 0.7 row tolerances, 24 of its own).
    scale = 1e-8 + 1e-6 * np.abs(ref).max(axis=(0, 2), keepdims=True)
    assert (np.abs(ys - ref) / scale).max() < 10
    # (BatchedDense's gradients: p17, left out here for time: Direct's batched transposed solves
    # cost 2.3 s against the dense path's 0.3 s on this batch.)


@pytest.mark.xfail(strict=True, reason=(
    "Direct() through kvaerno5 (README's advice for stiff gradients) is 100-200x the tolerance off on this batch: "
    "dL/dμ error 1.2e-4 of the largest entry at rtol 1e-6 (1.9e-6 at rtol 1e-8), dense and BatchedDense alike, "
    "where Checkpointed with kvaerno5 gives 1.8e-6 (1.1e-7), dopri5 Direct 1.1e-7, kvaerno3 Direct 1.6e-5 (p17, p17b)"))
def test_kvaerno5_direct_gradient_near_the_tolerance():
    g = _vdp_gradient("kvaerno5", ta.Direct(), 1e-6)
    fd = torch.tensor([_vdp_row_gradient_fd(i) for i in (0, 1)], dtype=F64)
    assert (g[:2] - fd).abs().max() < 1e-5 * fd.abs().max(), (g, fd)


def test_krylov_heat_equation_against_matrix_exp():
    # 60-point 1-d heat equation (stiffness 1.5e4): measured (p06) 1.8e-9 off matrix_exp.
    n = 60
    dx = 1.0 / (n + 1)
    L = (torch.diag(-2 * torch.ones(n, dtype=F64)) + torch.diag(torch.ones(n - 1, dtype=F64), 1)
         + torch.diag(torch.ones(n - 1, dtype=F64), -1)) / dx ** 2
    x = torch.linspace(dx, 1 - dx, n, dtype=F64)
    u0 = torch.sin(math.pi * x) + 0.3 * torch.sin(7 * math.pi * x) + x * (1 - x)
    t = torch.tensor([0.0, 1e-3, 0.05], dtype=F64)
    u = ta.solve(lambda s, v: L @ v, u0, t, method=ta.METHODS["kvaerno5"].with_linear_solver(Krylov()), rtol=1e-8,
                 atol=1e-10).ys
    exact = torch.stack([torch.linalg.matrix_exp(L * ti) @ u0 for ti in t])
    assert (u - exact).abs().max() < 2e-8


def test_batched_dense_odd_inputs():
    # Rows that interact, and a batch_size that does not divide the state: clear ValueErrors;
    # a (b,) state and a (b, 2, 3) state: the exact answers (p15 runs a nonlinear (b, 2, 3)
    # state under Checkpointed: the dense path's gradients to 1.3e-6 at rtol 1e-6).
    K4 = ta.METHODS["kvaerno5"].with_linear_solver(BatchedDense(batch_size=4))
    lam = torch.tensor([1.0, 100.0, 1000.0, 5.0], dtype=F64)
    t = torch.tensor([0.0, 0.1, 1.0], dtype=F64)
    with pytest.raises(ValueError, match="rows of the state interact"):
        ta.solve(lambda s, y: -lam[:, None] * (y - y.mean(0)), torch.ones(4, 3, dtype=F64), t, method=K4)
    with pytest.raises(ValueError, match="not a multiple of 5"):
        ta.solve(lambda s, y: -y, torch.ones(4, 3, dtype=F64), t,
                 method=ta.METHODS["kvaerno5"].with_linear_solver(BatchedDense(batch_size=5)))
    ys = ta.solve(lambda s, y: -lam * y, torch.ones(4, dtype=F64), t, method=K4, rtol=1e-7, atol=1e-10).ys
    assert (ys[-1] - torch.exp(-lam)).abs().max() < 1e-6
    ys = ta.solve(lambda s, z: -lam[:, None, None] * z, torch.ones(4, 2, 3, dtype=F64), t[:2], method=K4, rtol=1e-7,
                  atol=1e-10).ys
    assert (ys[-1] - torch.exp(-0.1 * lam)[:, None, None]).abs().max() < 1e-6


# --------------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gradient", [ta.Direct(), ta.Checkpointed()], ids=repr)
def test_event_in_a_fast_transient_and_its_gradients(gradient):
    # y1' = -k y1, y2' = -1000 (y2 - y1), event y2 = 1.5 inside the fast transient (τ ≈ 6.9e-4),
    # t0 = 100. Closed form; τ by bisection, gradients by the implicit function theorem.
    # Measured (p07): τ 1.8e-10 off, gradients ≤ 1e-6 relative.
    L, c = 1000.0, 1.5

    def y2(t, a, b, k):
        c1 = a * L / (L - k)
        return c1 * torch.exp(-k * t) + (b - c1) * torch.exp(-L * t)

    p_ref = [torch.tensor(1.0, dtype=F64), torch.tensor(2.0, dtype=F64), torch.tensor(0.7, dtype=F64)]
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if y2(torch.tensor(mid, dtype=F64), *p_ref) > c else (lo, mid)
    tau = torch.tensor(0.5 * (lo + hi), dtype=F64, requires_grad=True)
    p = [x.clone().requires_grad_() for x in p_ref]
    dG = torch.autograd.grad(y2(tau, *p) - c, [tau] + p)
    ref = [-d / dG[0] for d in dG[1:]]

    a, b, k = [x.clone().requires_grad_() for x in p_ref]
    ev = ta.solve_to_event(lambda s, y: torch.stack([-k * y[0], -L * (y[1] - y[0])]), torch.stack([a, b]),
                           torch.tensor(100.0, dtype=F64), lambda s, y: y[1] - c, method="kvaerno5", gradient=gradient,
                           params=[k], rtol=1e-9, atol=1e-11)
    assert abs(ev.t.item() - 100.0 - tau.item()) < 1e-9
    for g, r in zip(torch.autograd.grad(ev.t, (a, b, k)), ref):
        assert abs(g - r) < 1e-5 * abs(r)


def test_robertson_event_time_on_the_stiff_component():
    # Found here on the Hermite interpolant (τ = 3345.6 against scipy's 3351.0, 1.6e-3 relative);
    # main's bffb89e locates the crossing on an implicit sub-step: now 1.4e-6 relative (p07c).
    c, rtol, atol = 1e-6, 1e-6, 1e-12
    y0 = [0.9664597, 3.074626e-05, 3.350951e-02]  # about y(1): past the initial transient

    def event(t, y):
        return y[1] - c
    event.terminal, event.direction = True, -1
    tau_ref = solve_ivp(robertson_np(), (1.0, 1e8), y0, method="Radau", rtol=1e-11, atol=1e-22,
                        events=event).t_events[0][0]
    ev = ta.solve_to_event(robertson(), torch.tensor(y0, dtype=F64), torch.tensor(1.0, dtype=F64), event,
                           method="kvaerno5", rtol=rtol, atol=atol)
    # y2's slope there is about -c/τ, so a 10-tolerance error in y2 moves τ by ~10·rtol·τ.
    assert abs(ev.t.item() - tau_ref) < 10 * rtol * tau_ref


# --------------------------------------------------------------------------------------------
# The torchdiffeq front door
# --------------------------------------------------------------------------------------------


class _Mixed(torch.nn.Module):
    def __init__(self, rates):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor(rates, dtype=F64))

    def forward(self, t, y):
        return mixed(self.theta) @ y


def test_compat_adams_methods_against_matrix_exp():
    # Eigenvalues -1, -50, step 0.002 (hλ = 0.1). Measured (p08): explicit_adams 5.9e-6,
    # implicit_adams and fixed_adams 4.0e-7 off the exact solution. (torchdiffeq 0.2.x's own
    # Adams methods diverge on this problem with step_size, so it is no oracle here.)
    t = torch.tensor([0.0, 0.05, 0.5, 1.0], dtype=F64)
    y0 = torch.tensor([1.0, -0.5], dtype=F64)
    A = mixed(torch.tensor([1.0, 50.0], dtype=F64))
    exact = torch.stack([torch.linalg.matrix_exp(A * ti) @ y0 for ti in t])
    for method, bound in [("explicit_adams", 2e-5), ("implicit_adams", 2e-6), ("fixed_adams", 2e-6)]:
        with torch.no_grad():
            ys = compat.odeint(_Mixed([1.0, 50.0]), y0, t, method=method, options=dict(step_size=0.002))
        assert (ys - exact).abs().max() < bound, method


def test_compat_scipy_radau_adjoint():
    # scipy_solver with Radau through odeint_adjoint, and kvaerno5 by name with
    # adjoint_options=dict(gradient="checkpointed"); eigenvalues -1, -1000. Measured (p08):
    # Radau values 3e-12, dL/dy0 3.5e-12 relative.
    t = torch.tensor([0.0, 0.05, 0.5, 1.0], dtype=F64)
    ref = _grads_mixed(None, t)
    # (kvaerno5 by name with adjoint_options=dict(gradient="checkpointed"): p08, left out for time.)
    for kwargs in (dict(method="scipy_solver", rtol=1e-10, atol=1e-12, options=dict(solver="Radau")),):
        got = _grads_mixed(kwargs, t)
        assert (got[0] - ref[0]).abs().max() < 1e-6
        assert (got[1] - ref[1]).abs().max() < 1e-5 * ref[1].abs().max()
        assert (got[2] - ref[2]).abs().max() < 1e-4 * ref[2].abs().max()


def _grads_mixed(kwargs, t):
    f = _Mixed([1.0, 1000.0])
    y0 = torch.tensor([1.0, -0.5], dtype=F64, requires_grad=True)
    if kwargs is None:
        ys = torch.stack([torch.linalg.matrix_exp(mixed(f.theta) * ti) @ y0 for ti in t])
    else:
        ys = compat.odeint_adjoint(f, y0, t, **kwargs)
    return (ys.detach(),) + torch.autograd.grad(ys[1:].pow(2).sum(), (y0, f.theta))

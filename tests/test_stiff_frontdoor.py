"""torchdiffeq's remaining methods through the front door: the fixed-step Adams methods
(explicit_adams, implicit_adams, fixed_adams) and the implicit solvers by name."""
import math

import pytest
import torch

import torchadjoint as ta
from torchadjoint import odeint, odeint_adjoint

DT = torch.float64
A = torch.tensor([[-0.3, 1.0], [-1.0, -0.3]], dtype=DT)
Y0 = torch.tensor([1.0, 0.5], dtype=DT)
T = torch.linspace(0.0, 2.0, 5, dtype=DT)


def forced(t, y):
    return torch.stack([y[1], -y[0] - y[0] ** 3 + torch.sin(t) ** 3])


@pytest.mark.parametrize("method", ["explicit_adams", "implicit_adams", "fixed_adams"])
def test_adams_is_fourth_order_and_agrees_with_torchdiffeq(method):
    torchdiffeq = pytest.importorskip("torchdiffeq")
    exact = torch.tensor([math.sin(2.0), math.cos(2.0)], dtype=DT)
    y0 = torch.tensor([0.0, 1.0], dtype=DT)
    t = torch.tensor([0.0, 2.0], dtype=DT)
    errors = []
    for n in (40, 80, 160):
        sol = ta.solve(forced, y0, t, method=method, step_size=2.0 / n)
        errors.append(float((sol.ys[-1] - exact).norm()))
        assert sol.stats["forward"]["bootstrap_steps"] == 3  # RK4 until four values of f are known
    for coarse, fine in zip(errors, errors[1:]):
        assert 3.6 < math.log2(coarse / fine) < 4.4, errors
    ours = odeint(forced, y0, T, method=method, options=dict(step_size=0.025))
    exact_t = torch.stack([torch.sin(T), torch.cos(T)], -1)
    assert (ours - exact_t).abs().max() < 1e-6
    if method != "explicit_adams":
        # Both order 4 (bootstraps and correctors differ in detail): each near the truth.
        # (torchdiffeq's own explicit_adams diverges on this problem at this step: NaN by t = 2.)
        theirs = torchdiffeq.odeint(forced, y0, T, method=method, options=dict(step_size=0.025))
        assert (theirs - exact_t).abs().max() < 1e-5


class Linear(torch.nn.Module):
    """dy/dt = a y with a trainable copy of A."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(A.clone())

    def forward(self, t, y):
        return self.a @ y


@pytest.mark.parametrize("method", ["explicit_adams", "fixed_adams"])
def test_adams_gradients_through_the_adjoint_against_matrix_exp(method):
    a = A.clone().requires_grad_(True)
    y0 = Y0.clone().requires_grad_(True)

    func = Linear()
    ys = odeint_adjoint(func, y0, T, method=method, options=dict(step_size=0.01))
    ys.pow(2).sum().backward()
    exact = torch.stack([torch.linalg.matrix_exp(a * t) @ y0 for t in T])
    ga, gy = torch.autograd.grad(exact.pow(2).sum(), (a, y0))
    assert torch.allclose(y0.grad, gy, rtol=1e-6, atol=1e-8)
    assert torch.allclose(func.a.grad, ga, rtol=1e-6, atol=1e-8)


def test_front_door_refuses_no_torchdiffeq_solver():
    from torchdiffeq._impl.odeint import SOLVERS

    for method in SOLVERS:
        options = None if method in ta.ADAPTIVE_METHODS or method == "scipy_solver" else dict(step_size=0.25)
        y = odeint(forced, torch.tensor([0.0, 1.0], dtype=DT), T, method=method, rtol=1e-5, atol=1e-7, options=options)
        assert y.shape == (5, 2) and bool(torch.isfinite(y).all())


@pytest.mark.parametrize("method", ["kvaerno5"])
def test_implicit_methods_by_name_in_odeint_adjoint(method):
    lam = torch.tensor([-1.0, -1e4], dtype=DT)

    class Stiff(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lam = torch.nn.Parameter(lam.clone())

        def forward(self, t, y):
            return self.lam * y

    func = Stiff()
    y0 = torch.tensor([1.0, 1.0], dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, 1e-4, 1.0], dtype=DT)
    rtol = 1e-7 if method == "kvaerno5" else 1e-5  # order 3 at tight tolerances takes thousands of steps
    ys = odeint_adjoint(func, y0, t, method=method, rtol=rtol, atol=rtol * 1e-2,
                        adjoint_options=dict(gradient="checkpointed"))
    ys.sum().backward()
    # y_i(t) = exp(λ_i t): dL/dy0_i = Σ_t exp(λ_i t), dL/dλ_i = Σ_t t exp(λ_i t).
    e = torch.exp(lam[:, None] * t[None, :])
    assert torch.allclose(y0.grad, e.sum(1), rtol=100 * rtol)
    assert torch.allclose(func.lam.grad, (t * e).sum(1), rtol=1000 * rtol, atol=1e-12)


@pytest.mark.parametrize("solver", ["RK45", "LSODA", "Radau"])
def test_scipy_solver_gradients_by_the_adjoint_against_matrix_exp(solver):
    torchdiffeq = pytest.importorskip("torchdiffeq")

    func = Linear()
    y0 = Y0.clone().requires_grad_(True)
    ys = odeint_adjoint(func, y0, T, method="scipy_solver", rtol=1e-10, atol=1e-12, options=dict(solver=solver))
    ys.pow(2).sum().backward()
    a = A.clone().requires_grad_(True)
    y = Y0.clone().requires_grad_(True)
    exact = torch.stack([torch.linalg.matrix_exp(a * t) @ y for t in T])
    ga, gy = torch.autograd.grad(exact.pow(2).sum(), (a, y))
    assert torch.allclose(ys, exact, atol=1e-8)
    assert torch.allclose(y0.grad, gy, atol=1e-7) and torch.allclose(func.a.grad, ga, atol=1e-7)
    theirs = torchdiffeq.odeint(func, Y0, T, method="scipy_solver", rtol=1e-10, atol=1e-12, options=dict(solver=solver))
    assert torch.allclose(ys.detach(), theirs, atol=1e-8)
    with pytest.warns(UserWarning, match="ignores options .'step_size'."):
        odeint(func, Y0, T, method="scipy_solver", options=dict(step_size=0.1))
    with pytest.raises(ValueError, match="no gradient for t"):
        odeint(func, Y0, T.clone().requires_grad_(True), method="scipy_solver")

"""Gradients with respect to the output times (start time included), for every gradient
method the same way: against matrix_exp solutions and autograd through the solver."""
import pytest
import torch
from torch import nn

from torchadjoint import Backsolve, Direct, solve

from linear_reference import exact_ys

D = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("times", [(0.0, 0.4, 1.0, 1.7), (1.0, 0.2, -0.5)], ids=["increasing", "decreasing"])
@pytest.mark.parametrize("gradient", [Backsolve(), Direct()], ids=["backsolve", "direct"])
def test_time_gradients_match_matrix_exp(times, gradient):
    g = torch.Generator().manual_seed(0)
    A = 0.7 * torch.randn(3, 3, generator=g, dtype=D)
    y0 = torch.randn(3, generator=g, dtype=D)
    w = torch.randn(len(times), 3, generator=g, dtype=D)
    t = torch.tensor(times, dtype=D, requires_grad=True)
    # A loss on y(t_0) too: it must not leak into dL/dt_0 (y(t_0) = y0 whatever t_0 is).
    loss = lambda ys: (w * ys).sum() + (ys**2).sum()
    sol = solve(lambda s, y: A @ y, y0, t, gradient=gradient, **TOL)
    (got,) = torch.autograd.grad(loss(sol.ys), (t,))
    (want,) = torch.autograd.grad(loss(exact_ys(A, y0, t)), (t,))
    assert rel(got, want) < 1e-8, (got, want)
    assert got[0] != 0  # the start time moves the whole trajectory


def test_time_gradients_of_nonlinear_time_dependent_problem_match_direct():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    f = lambda s, y: net(torch.cat([y, torch.sin(3 * s).expand(y.shape[0], 1)], dim=1))
    y0 = torch.randn(4, 2, dtype=D, requires_grad=True)
    t = torch.tensor([0.1, 0.5, 0.9, 1.6], dtype=D, requires_grad=True)
    w = torch.randn(4, 4, 2, dtype=D)
    # Output 2 is not looked at: its time gradient is zero.
    loss = lambda ys: (w[[0, 1, 3]] * torch.tanh(ys[[0, 1, 3]])).sum()
    grads = []
    for gradient in (Backsolve(), Direct()):
        sol = solve(f, y0, t, gradient=gradient, params=list(net.parameters()), **TOL)
        grads.append(torch.autograd.grad(loss(sol.ys), (t, y0)))
    for a, b in zip(*grads):
        assert rel(a, b) < 1e-7
    assert grads[0][0][2] == 0


def test_time_gradient_evaluations_are_counted():
    calls = {"n": 0}

    def f(s, y):
        calls["n"] += 1
        return -y * (1 + s)

    y0 = torch.tensor([1.0, 2.0], dtype=D)
    t = torch.tensor([0.0, 0.5, 1.0, 1.5], dtype=D, requires_grad=True)
    sol = solve(f, y0, t, **TOL)
    calls["n"] = 0
    (sol.ys[1] + sol.ys[3]).sum().backward()
    b = sol.stats["backward"]
    # Two looked-at outputs and the start time, beside the adjoint's own evaluations.
    assert sol.stats["time_gradients"] == {"nfe": 3}
    assert calls["n"] == b["nfe"] + 3
    # y(t) = y0 exp(-(t + t^2/2) + (t0 + t0^2/2)) (t0 = 0): dL/dt_i = g_i · f(t_i, y_i)
    e = lambda s: torch.exp(torch.tensor(-(s + s * s / 2), dtype=D))
    want1 = -(1 + 0.5) * e(0.5) * 3.0
    want3 = -(1 + 1.5) * e(1.5) * 3.0
    assert torch.allclose(t.grad[[1, 3]], torch.stack([want1, want3]), rtol=1e-8)
    assert torch.allclose(t.grad[0], -(want1 / (1 + 0.5) + want3 / (1 + 1.5)), rtol=1e-8)
    assert t.grad[2] == 0

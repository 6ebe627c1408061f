"""Running costs ``∫ ℓ(t, y, f) dt``: values and gradients against the same integral computed
by augmenting the state by hand (autograd through the solver) and against closed forms,
for every gradient method; structure, options and errors."""
import math

import pytest
import torch
from torch import nn

from torchadjoint import Backsolve, Direct, Quadrature, solve
from torchadjoint.adjoint import GRADIENT_METHODS, gradient_method

D = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-12)


def rel(a, b):
    return float((a - b).norm() / b.norm()) if not (a.requires_grad or b.requires_grad) else rel(a.detach(), b.detach())


def methods():
    """Every registered gradient method, default-constructed."""
    return [gradient_method(name) for name in sorted(GRADIENT_METHODS)]


class Field(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()

    def forward(self, t, y):
        return self.net(y) * (1 + 0.3 * torch.sin(t))


def cost(t, y, dy):
    """Depends on t, y and dy; one value per sample: (batch,)."""
    return (y**2).sum(-1) * torch.cos(t) + (dy * y).sum(-1)


def by_hand(func, y0, t, ell, params, c_shape):
    """The same integral as an extra state component, differentiated by autograd through the solver."""

    def augmented(s, state):
        y, _ = state
        dy = func(s, y)
        return dy, ell(s, y, dy)

    sol = solve(augmented, (y0, torch.zeros(c_shape, dtype=D)), t, gradient=Direct(), params=params, **TIGHT)
    return sol.ys[0], sol.ys[1][-1]


# Backsolve's reconstruction check also judges the re-solved integral c, which is 0 at t_0
# and so measured against atol alone there; the gradients themselves are checked below.
@pytest.mark.filterwarnings("ignore::torchadjoint.ReconstructionWarning")
@pytest.mark.parametrize("gradient", methods(), ids=lambda g: type(g).__name__)
def test_gradients_match_hand_augmented_state(gradient):
    func = Field()
    params = list(func.parameters())
    y0 = torch.randn(4, 3, dtype=D, requires_grad=True)
    t = torch.linspace(0.0, 1.0, 5, dtype=D, requires_grad=True)
    w = torch.randn(5, 4, 3, dtype=D)
    ys_ref, c_ref = by_hand(func, y0, t, cost, params, (4,))
    loss_ref = (ys_ref * w).sum() + c_ref.pow(2).sum()
    ref = torch.autograd.grad(loss_ref, [y0, t] + params)

    sol = solve(func, y0, t, gradient=gradient, running_cost=cost, **TIGHT)
    assert sol.running_cost.shape == (4,)
    assert rel(sol.running_cost, c_ref) < 1e-9
    loss = (sol.ys * w).sum() + sol.running_cost.pow(2).sum()
    got = torch.autograd.grad(loss, [y0, t] + params)
    for g, r in zip(got, ref):
        assert rel(g, r) < 1e-7


def test_closed_form_decay():
    # y' = -k y, ℓ = y²: ∫_0^T y0² e^{-2kt} dt = y0² (1 - e^{-2kT}) / (2k); gradients by autograd of that.
    k = torch.tensor(0.7, dtype=D, requires_grad=True)
    y0 = torch.tensor([1.3], dtype=D, requires_grad=True)
    T = torch.tensor(1.9, dtype=D, requires_grad=True)
    exact = y0**2 * (1 - torch.exp(-2 * k * T)) / (2 * k)
    ref = torch.autograd.grad(exact.sum(), (k, y0, T))
    for gradient in (Backsolve(), Quadrature()):
        t = torch.stack([torch.zeros((), dtype=D), T])
        sol = solve(lambda s, y: -k * y, y0, t, params=[k], gradient=gradient,
                    running_cost=lambda s, y, dy: y.pow(2).sum(), **TIGHT)
        assert sol.running_cost.shape == ()
        assert abs(float(sol.running_cost.detach()) - float(exact.detach())) < 1e-9
        got = torch.autograd.grad(sol.running_cost, (k, y0, T))
        for g, r in zip(got, ref):
            assert abs(float(g) - float(r)) < 1e-8 * max(1.0, abs(float(r)))


def test_decreasing_times_give_the_oriented_integral():
    sol_up = solve(lambda s, y: -y, torch.ones(2, dtype=D), torch.tensor([0.0, 1.0], dtype=D),
                   running_cost=lambda s, y, dy: y.sum(), **TIGHT)
    y1 = sol_up.ys[-1]
    sol_down = solve(lambda s, y: -y, y1, torch.tensor([1.0, 0.0], dtype=D),
                     running_cost=lambda s, y, dy: y.sum(), **TIGHT)
    assert abs(float(sol_up.running_cost) - 2 * (1 - math.exp(-1))) < 1e-9
    assert abs(float(sol_down.running_cost) + float(sol_up.running_cost)) < 1e-9


class LearnedCost(nn.Module):
    """A running cost with its own parameters: they get gradients too."""

    def __init__(self):
        super().__init__()
        self.q = nn.Parameter(torch.tensor([0.5, -1.0, 2.0], dtype=D))

    def forward(self, t, y, dy):
        return (self.q * y**2).sum()


def test_cost_module_parameters_get_gradients():
    func, ell = Field(seed=1), LearnedCost()
    y0 = torch.randn(2, 3, dtype=D)
    t = torch.tensor([0.0, 0.8], dtype=D)
    _, c_ref = by_hand(func, y0, t, ell, list(func.parameters()) + [ell.q], ())
    (ref,) = torch.autograd.grad(c_ref, [ell.q])
    for gradient in (Backsolve(), Quadrature()):
        sol = solve(func, y0, t, gradient=gradient, running_cost=ell, **TIGHT)
        (got,) = torch.autograd.grad(sol.running_cost, [ell.q])
        assert rel(got, ref) < 1e-8


def test_pytree_state_with_per_tensor_tolerances_and_norm():
    A = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=D, requires_grad=True)
    y0 = {"x": torch.tensor([1.0, 0.0], dtype=D), "v": torch.tensor([0.5], dtype=D)}

    def f(t, y):
        return {"x": A @ y["x"], "v": -y["v"]}

    calls = []

    def norm(scaled):  # sees the state's own structure
        calls.append(sorted(scaled))
        return torch.cat([scaled["x"], scaled["v"]]).pow(2).mean().sqrt()

    sol = solve(f, y0, torch.tensor([0.0, 2.0], dtype=D), params=[A], gradient=Quadrature(),
                running_cost=lambda t, y, dy: y["x"].pow(2).sum() + dy["v"].pow(2).sum(),
                rtol={"x": 1e-10, "v": 1e-9}, atol=[1e-12, 1e-12], norm=norm)
    # |x| = 1 on a rotation; v = 0.5 e^{-t}: ∫ 1 + 0.25 e^{-2t} dt.
    exact = 2.0 + 0.125 * (1 - math.exp(-4.0))
    assert abs(float(sol.running_cost.detach()) - exact) < 1e-8
    assert calls and calls[0] == ["v", "x"]
    (g,) = torch.autograd.grad(sol.running_cost, [A])
    assert torch.isfinite(g).all()


def test_no_grad_solve_and_stats():
    with torch.no_grad():
        sol = solve(Field(), torch.randn(3, dtype=D), torch.tensor([0.0, 1.0], dtype=D), running_cost=cost)
    assert sol.running_cost.shape == () and not sol.running_cost.requires_grad
    assert sol.stats["forward"]["nfe"] > 0 and sol.ys.shape == (2, 3)


@pytest.mark.parametrize(
    "ell, error, match",
    [
        (lambda t, y, dy: 1.0, TypeError, "return a tensor"),
        (lambda t, y, dy: y.sum().float(), TypeError, "dtype"),
        (lambda t, y, dy: y.sum() * torch.ones(1 + int(t > 0.5), dtype=D), ValueError, "one shape"),
        ("not callable", TypeError, "running_cost"),
    ],
)
def test_bad_costs(ell, error, match):
    with pytest.raises(error, match=match):
        solve(lambda t, y: -y, torch.ones(2, dtype=D), torch.tensor([0.0, 1.0], dtype=D), running_cost=ell)


def test_bad_tolerance_structure():
    with pytest.raises(ValueError, match="rtol has 2 components"):
        solve(lambda t, y: -y, torch.ones(2, dtype=D), torch.tensor([0.0, 1.0], dtype=D),
              running_cost=lambda t, y, dy: y.sum(), rtol=[1e-6, 1e-6])


@pytest.mark.parametrize("gradient", [Backsolve(), Quadrature()], ids=["backsolve", "quadrature"])
def test_reconstruction_check_judges_the_state_not_the_integral(gradient, recwarn):
    """The integral never feeds back into the dynamics, so its backward drift (about rtol
    times its size, judged at t_0 against atol where it is 0) says nothing about the
    gradient: with atol ≪ rtol it must not raise a ReconstructionWarning, and the reported
    drift is the state's alone, as without a cost."""
    field, y0 = Field(), torch.randn(16, 3, dtype=D)
    t = torch.tensor([0.0, 5.0], dtype=D)
    big = lambda t, y, dy: (dy**2).sum() + 10.0  # noqa: E731  (integral ~ 50 at t = 5)
    loose = dict(rtol=1e-3, atol=1e-6)
    with_cost = solve(field, y0, t, running_cost=big, gradient=gradient, **loose)
    (with_cost.ys[-1].sum() + with_cost.running_cost).backward()
    without = solve(field, y0, t, gradient=gradient, **loose)
    without.ys[-1].sum().backward()
    drift_with = with_cost.stats["backward"]["reconstruction_error"]
    drift_without = without.stats["backward"]["reconstruction_error"]
    # The state's own drift, of the order of the solve without a cost (the steps differ).
    assert drift_with < 10 * max(drift_without, 1.0), (drift_with, drift_without)
    assert not [w for w in recwarn if "re-computed y" in str(w.message)]

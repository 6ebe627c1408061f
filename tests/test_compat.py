"""The torchdiffeq-style front door against torchdiffeq itself: the same calls through both
libraries, outputs and gradients (y0, parameters, times) compared, across methods, tuple
states and decreasing time; plus analytic truth where torchdiffeq is not the reference."""
import inspect
import math
import warnings

import pytest
import torch
import torchdiffeq
from torch import nn

import torchadjoint
from torchadjoint import odeint, odeint_adjoint
from torchadjoint.compat.odeint import CONSTRUCTOR_ARGUMENTS

D = torch.float64
ADAPTIVE = ["dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun"]
FIXED = ["euler", "midpoint", "heun2", "heun3", "rk4"]


class Field(nn.Module):
    """A small nonlinear, non-autonomous field with parameters."""

    def __init__(self, n=3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.A = nn.Parameter(0.6 * torch.randn(n, n, generator=g, dtype=D))
        self.b = nn.Parameter(0.1 * torch.randn(n, generator=g, dtype=D))

    def forward(self, t, y):
        return torch.tanh(y @ self.A) + self.b * torch.cos(t)


class TupleField(nn.Module):
    """Two coupled tensors of different shapes: x (2,), v (2, 2)."""

    def __init__(self):
        super().__init__()
        self.k = nn.Parameter(torch.tensor([0.7, -0.3], dtype=D))
        self.M = nn.Parameter(torch.tensor([[0.2, -0.5], [0.4, 0.1]], dtype=D))

    def forward(self, t, state):
        x, v = state
        return v.sum(0) * self.k, torch.tanh(v @ self.M) - 0.1 * x[:, None]


def run(lib, name, make_func, y0, t, **kwargs):
    """Outputs and gradients of L = Σ w·y through one library's ``name`` entry point."""
    func = make_func()
    y0 = tuple(x.clone().requires_grad_() for x in y0) if isinstance(y0, tuple) else y0.clone().requires_grad_()
    t = t.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ys = getattr(lib, name)(func, y0, t, **kwargs)
        leaves = ys if isinstance(ys, tuple) else (ys,)
        loss = sum((x * torch.linspace(-1, 1, x.numel(), dtype=D).view_as(x)).sum() for x in leaves)
        loss.backward()
    y0s = y0 if isinstance(y0, tuple) else (y0,)
    return dict(
        ys=[x.detach() for x in leaves], y0=[x.grad for x in y0s], params=[p.grad for p in func.parameters()], t=t.grad
    )


def assert_close(a, b, rtol, atol, keys=("ys", "y0", "params", "t")):
    for key in keys:
        for x, y in zip(a[key] if isinstance(a[key], list) else [a[key]], b[key] if isinstance(b[key], list) else [b[key]]):
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m: f"{key}: {m}")


T = torch.tensor([0.0, 0.3, 0.7, 1.2], dtype=D)
Y0 = torch.tensor([0.5, -0.4, 0.9], dtype=D)


# Solver tolerance per method (low orders need many steps for tight ones) and the agreement expected.
# torchdiffeq's fehlberg2 and adaptive_heun start each step from their last stage, which is
# not f(t1, y1) for these non-FSAL tableaux (here it is), so they agree to tolerance only.
TOLERANCES = {"dopri5": (1e-9, 1e-6), "dopri8": (1e-9, 1e-6), "bosh3": (1e-7, 1e-4), "fehlberg2": (1e-5, 1e-3),
              "adaptive_heun": (1e-4, 1e-2)}


@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.parametrize("name", ["odeint", "odeint_adjoint"])
def test_adaptive_methods_agree_with_torchdiffeq(method, name):
    solver_tol, tol = TOLERANCES[method]
    kw = dict(method=method, rtol=solver_tol, atol=solver_tol * 1e-2)
    ours = run(torchadjoint, name, Field, Y0, T, **kw)
    theirs = run(torchdiffeq, name, Field, Y0, T, **kw)
    assert_close(ours, theirs, rtol=tol, atol=tol, keys=("ys", "y0", "params"))
    # Time gradients: torchdiffeq's odeint differentiates its interpolant in t (a crude one
    # for the low orders); ours are g_i · f(t_i, y_i), the formula torchdiffeq's adjoint uses.
    reference = theirs if name == "odeint_adjoint" else run(torchdiffeq, "odeint_adjoint", Field, Y0, T, **kw)
    assert_close(ours, reference, rtol=tol, atol=tol, keys=("t",))


@pytest.mark.parametrize("method", FIXED)
def test_fixed_grid_odeint_is_torchdiffeqs_computation(method):
    """Same tableau, same grid, same linear interpolation: equal to rounding, gradients too
    (time gradients aside: torchdiffeq's fixed-grid odeint differentiates its grid)."""
    kw = dict(method=method, options=dict(step_size=0.05))
    ours = run(torchadjoint, "odeint", Field, Y0, T, **kw)
    theirs = run(torchdiffeq, "odeint", Field, Y0, T, **kw)
    assert_close(ours, theirs, rtol=1e-11, atol=1e-12, keys=("ys", "y0", "params"))


@pytest.mark.parametrize("method", FIXED)
def test_fixed_grid_adjoint_is_torchdiffeqs_computation(method):
    """The backward solve steps on the same grid as torchdiffeq's (output intervals are
    multiples of the step), so the discrete adjoints agree to rounding; the time gradients
    are the exact formula in both."""
    t = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=D)
    kw = dict(method=method, options=dict(step_size=0.125))
    ours = run(torchadjoint, "odeint_adjoint", Field, Y0, t, **kw)
    theirs = run(torchdiffeq, "odeint_adjoint", Field, Y0, t, **kw)
    assert_close(ours, theirs, rtol=1e-9, atol=1e-10, keys=("ys", "y0", "params"))
    torch.testing.assert_close(ours["t"][1:], theirs["t"][1:], rtol=1e-9, atol=1e-10)


def test_rk4_is_the_three_eighths_rule():
    """torchdiffeq's rk4 is Kutta's 3/8 rule: one step of it, by hand, on y' = y² + t."""
    y0, h = torch.tensor([0.3], dtype=D), 0.5
    f = lambda t, y: y * y + t  # noqa: E731
    k1 = f(0.0, y0)
    k2 = f(h / 3, y0 + h * k1 / 3)
    k3 = f(2 * h / 3, y0 + h * (k2 - k1 / 3))
    k4 = f(h, y0 + h * (k1 - k2 + k3))
    expected = y0 + h * (k1 + 3 * k2 + 3 * k3 + k4) / 8
    ys = odeint(f, y0, torch.tensor([0.0, h], dtype=D), method="rk4", options=dict(step_size=h))
    torch.testing.assert_close(ys[1], expected, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("name", ["odeint", "odeint_adjoint"])
@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_tuple_states(name, method):
    y0 = (torch.tensor([0.4, -0.2], dtype=D), torch.tensor([[0.3, 0.1], [-0.5, 0.2]], dtype=D))
    kw = dict(method=method, rtol=1e-9, atol=1e-11)
    if method == "rk4":
        kw["options"] = dict(step_size=0.1)
    ours = run(torchadjoint, name, TupleField, y0, T, **kw)
    theirs = run(torchdiffeq, name, TupleField, y0, T, **kw)
    assert [x.shape for x in ours["ys"]] == [(4, 2), (4, 2, 2)]
    tol = 1e-6 if method == "dopri5" else 1e-9
    assert_close(ours, theirs, rtol=tol, atol=tol, keys=("ys", "y0", "params") if method == "rk4" and name == "odeint" else ("ys", "y0", "params", "t"))


@pytest.mark.parametrize("name", ["odeint", "odeint_adjoint"])
@pytest.mark.parametrize("method", ["dopri5", "midpoint"])
def test_decreasing_time(name, method):
    t = torch.tensor([1.2, 0.9, 0.4, -0.1], dtype=D)
    kw = dict(method=method, rtol=1e-9, atol=1e-11)
    if method == "midpoint":
        kw["options"] = dict(step_size=0.05)
    ours = run(torchadjoint, name, Field, Y0, t, **kw)
    theirs = run(torchdiffeq, name, Field, Y0, t, **kw)
    assert_close(ours, theirs, rtol=1e-6, atol=1e-6, keys=("ys", "y0", "params"))
    if method == "dopri5":
        assert_close(ours, theirs, rtol=1e-6, atol=1e-6, keys=("t",))
    elif name == "odeint_adjoint":
        # dL/dt_0: torchdiffeq integrates a time adjoint with the fixed steps; ours is the
        # exact -a_y(t_0)·f(t_0, y_0). The other times use the same formula in both.
        torch.testing.assert_close(ours["t"][1:], theirs["t"][1:], rtol=1e-9, atol=1e-10)


def test_tuple_tolerances_forward_and_backward():
    """Per-tensor tolerances shape the forward and the backward solve (torchdiffeq cannot
    take them into its adjoint: it hands the 2-tuple to its augmented state of 5 tensors);
    the gradients match autograd through the solver."""
    y0 = (torch.tensor([0.4, -0.2], dtype=D), torch.tensor([[0.3, 0.1], [-0.5, 0.2]], dtype=D))
    kw = dict(rtol=(1e-9, 1e-10), atol=(1e-11, 1e-12))
    adjoint = run(torchadjoint, "odeint_adjoint", TupleField, y0, T, **kw)
    direct = run(torchadjoint, "odeint", TupleField, y0, T, **kw)
    assert_close(adjoint, direct, rtol=1e-6, atol=1e-7)

    # The tolerances are per tensor: tightening either one alone costs steps, forward and
    # backward (the backward solve inherits them for y and a_y).
    def evaluations(rtol, atol):
        """(forward, backward) evaluations of f by odeint_adjoint."""
        func = TupleField()
        calls = []
        start = tuple(x.clone().requires_grad_() for x in y0)
        ys = odeint_adjoint(lambda t, y: calls.append(t) or func(t, y), start, T, rtol=rtol, atol=atol,
                            adjoint_params=tuple(func.parameters()))
        forward = len(calls)
        sum(x.sum() for x in ys).backward()
        return forward, len(calls) - forward

    both_loose = evaluations((1e-5, 1e-5), (1e-7, 1e-7))
    first_tight = evaluations((1e-10, 1e-5), (1e-12, 1e-7))
    second_tight = evaluations((1e-5, 1e-10), (1e-7, 1e-12))
    for part in (0, 1):
        assert both_loose[part] < first_tight[part] and both_loose[part] < second_tight[part], (
            both_loose, first_tight, second_tight)


def test_linear_system_against_matrix_exp():
    """Both entry points against the analytic solution and its autograd gradients."""
    g = torch.Generator().manual_seed(3)
    A = (0.5 * torch.randn(3, 3, generator=g, dtype=D)).requires_grad_()
    y0 = torch.randn(3, generator=g, dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.5], dtype=D, requires_grad=True)
    w = torch.randn(3, 3, generator=g, dtype=D)
    exact = torch.stack([torch.linalg.matrix_exp(A * (s - t[0])) @ y0 for s in t])
    truth = torch.autograd.grad((exact * w).sum(), (y0, A, t))
    for fn, kw in ((odeint, {}), (odeint_adjoint, dict(adjoint_params=(A,)))):
        ys = fn(lambda s, y: A @ y, y0, t, rtol=1e-10, atol=1e-12, **kw)
        torch.testing.assert_close(ys, exact.detach(), rtol=1e-8, atol=1e-9)
        grads = torch.autograd.grad((ys * w).sum(), (y0, A, t))
        for got, want in zip(grads, truth):
            torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-8)


def test_odeint_differentiates_closures_like_torchdiffeq():
    """A plain function closing over a tensor that requires grad: odeint (autograd through
    the solver) reaches it even though y0 does not require grad."""
    k = torch.tensor(0.8, dtype=D, requires_grad=True)
    f = lambda t, y: -k * y  # noqa: E731
    t = torch.tensor([0.0, 1.0], dtype=D)
    y = odeint(f, torch.tensor([2.0], dtype=D), t, rtol=1e-10, atol=1e-12)
    (grad,) = torch.autograd.grad(y[-1].sum(), k)
    torch.testing.assert_close(grad, torch.tensor(-2.0 * math.exp(-0.8), dtype=D), rtol=1e-8, atol=1e-10)
    with torch.no_grad():
        assert not odeint(f, torch.tensor([2.0], dtype=D), t).requires_grad


@pytest.mark.parametrize("fn", ["odeint", "odeint_adjoint"])
def test_front_door_errors_name_the_argument(fn):
    """Empty ``t`` and ``t`` (or ``y0``) on the meta device: clear errors naming the
    argument and the fix, as the native solve gives (they were an IndexError and a TypeError
    saying that a Tensor is not a tensor)."""
    call = getattr(torchadjoint, fn)
    func = Field()
    with pytest.raises(ValueError, match="t is empty; give at least the start time"):
        call(func, Y0, torch.tensor([], dtype=D))
    with pytest.raises(ValueError, match="t is on the meta device.*to\\("):
        call(func, Y0, torch.tensor([0.0, 1.0], dtype=D, device="meta"))
    with pytest.raises(ValueError, match="t is on the meta device"):
        call(func, Y0, torch.tensor([0.0, 1.0], dtype=D, device="meta"), event_fn=lambda t, y: y[0])
    with pytest.raises(ValueError, match="y0 is on the meta device"):
        call(func, Y0.to("meta"), T)
    with pytest.raises(ValueError, match="t is on the meta device"):
        torchadjoint.solve(func, Y0, torch.tensor([0.0, 1.0], dtype=D, device="meta"))


def test_adjoint_options_routing_matches_the_constructors():
    """The front door routes adjoint_options keys by the constructor arguments it declares
    for each gradient method (compat.odeint.CONSTRUCTOR_ARGUMENTS): the declaration must be
    each constructor's keyword arguments, in order, so that no argument is lost or invented."""
    assert set(CONSTRUCTOR_ARGUMENTS) == set(torchadjoint.GRADIENT_METHODS.values())
    for cls, declared in CONSTRUCTOR_ARGUMENTS.items():
        actual = tuple(name for name in inspect.signature(cls.__init__).parameters if name != "self")
        assert declared == actual, cls.__name__

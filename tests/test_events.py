"""Terminal events: the event time and state against torchdiffeq's odeint_event and against
closed forms; gradients of the event time (implicit-function theorem) through odeint and
odeint_adjoint, with respect to y0, parameters, t0 and the event function's own parameters."""
import math
import warnings

import pytest
import torch
import torchdiffeq
from torch import nn

import torchadjoint
from torchadjoint import Backsolve, Direct, SolveError, odeint, odeint_adjoint, solve_to_event

D = torch.float64


class Ball(nn.Module):
    """Height and velocity under gravity with linear drag: a tuple state of 0-dim tensors."""

    def __init__(self, g=9.81, k=0.3):
        super().__init__()
        self.g = nn.Parameter(torch.tensor(g, dtype=D))
        self.k = nn.Parameter(torch.tensor(k, dtype=D))

    def forward(self, t, state):
        x, v = state
        return v, -self.g - self.k * v


def ground(t, state):
    return state[0]


def through(lib, interface, method, options, reverse=False):
    """Event time, final state and gradients of L = t_e + v(t_e)² through one library."""
    ball = Ball()
    x0 = torch.tensor(2.0, dtype=D, requires_grad=True)
    v0 = torch.tensor(-1.0 if reverse else 1.0, dtype=D, requires_grad=True)
    t0 = torch.tensor(0.5, dtype=D, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t_e, (x, v) = lib.odeint_event(
            ball, (x0, v0), t0, event_fn=ground, reverse_time=reverse, odeint_interface=getattr(lib, interface),
            method=method, options=options, rtol=1e-9, atol=1e-11,
        )
        (t_e + v[-1] ** 2).backward()
    return dict(t=t_e.detach(), x=x.detach(), v=v.detach(), x0=x0.grad, v0=v0.grad, t0=t0.grad, g=ball.g.grad, k=ball.k.grad)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("method,options", [("dopri5", None), ("rk4", dict(step_size=0.01))])
@pytest.mark.parametrize("interface", ["odeint", "odeint_adjoint"])
def test_against_torchdiffeq_odeint_event(interface, method, options, reverse):
    ours = through(torchadjoint, interface, method, options, reverse)
    # The fixed-grid adjoint: the state at the event is on the step's linear interpolant (as
    # in torchdiffeq) while its adjoint comes from a solve that ends there: agreement O(h²).
    tol = 1e-4 if (interface, method) == ("odeint_adjoint", "rk4") else 1e-6
    theirs = through(torchdiffeq, interface, method, options, reverse)
    assert ours["x"].shape == (2,) and ours["t"].shape == ()
    for key in ("t", "x", "v", "x0", "v0", "g", "k"):
        torch.testing.assert_close(ours[key], theirs[key], rtol=tol, atol=tol, msg=lambda m: f"{key}: {m}")
    # The system is autonomous: moving t0 moves the event by as much. torchdiffeq's odeint
    # gets this wrong for the fixed grid (it differentiates its grid construction).
    expected = 1e-12 if interface == "odeint" else 1e-3  # the adjoint: linear interpolation at the event
    torch.testing.assert_close(ours["t0"], torch.tensor(1.0, dtype=D), rtol=expected, atol=expected)


def free_fall(x0, v0, g):
    """Time to reach the ground from height x0 with upward speed v0 (no drag)."""
    return (v0 + torch.sqrt(v0 * v0 + 2 * g * x0)) / g


@pytest.mark.parametrize("fn", [odeint, odeint_adjoint])
def test_event_time_from_odeint_is_differentiable(fn):
    """With event_fn, odeint and odeint_adjoint return an event time with IFT gradients
    (torchdiffeq's odeint returns one without), against the closed form."""
    ball = Ball(k=0.0)
    x0 = torch.tensor(2.0, dtype=D, requires_grad=True)
    v0 = torch.tensor(1.5, dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=D)
    t_e, (x, v) = fn(ball, (x0, v0), t, event_fn=ground, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(t_e, (x0, v0, ball.g), retain_graph=True)
    exact = free_fall(x0, v0, ball.g)
    truth = torch.autograd.grad(exact, (x0, v0, ball.g))
    torch.testing.assert_close(t_e.detach(), exact.detach(), rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, truth):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)
    assert abs(float(x[-1].detach())) < 1e-9
    # The state at the event moves with it: d v(t_e)/d g = -t_e - g·dt_e/dg (v = v0 - g·t).
    (dv_dg,) = torch.autograd.grad(v[-1], ball.g)
    torch.testing.assert_close(dv_dg, -exact.detach() - ball.g.detach() * truth[2], rtol=1e-7, atol=1e-9)


def test_event_function_parameters_get_gradients():
    """event_fn(t, y) = x - h with a learnable h: dt_e/dh = 1/v(t_e) (torchdiffeq's
    rerouting leaves the event function's own parameters out)."""
    h = torch.tensor(0.5, dtype=D, requires_grad=True)
    ball = Ball(k=0.0)
    y0 = (torch.tensor(2.0, dtype=D), torch.tensor(0.0, dtype=D))
    for fn in (odeint, odeint_adjoint):
        t_e, (x, v) = fn(ball, y0, torch.tensor([0.0, 1.0], dtype=D), event_fn=lambda t, s: s[0] - h, rtol=1e-10, atol=1e-12)
        (grad,) = torch.autograd.grad(t_e, h)
        torch.testing.assert_close(grad, 1.0 / v[-1].detach(), rtol=1e-8, atol=1e-10)


def test_multivariate_event_stops_at_the_first_crossing():
    """Several components: the solve stops when the first one changes sign (either way)."""
    f = lambda t, y: torch.stack([torch.ones_like(y[0]), -torch.ones_like(y[1])])  # noqa: E731
    ev = lambda t, y: torch.stack([y[0] - 0.7, y[1] + 0.4])  # crossings at 0.7 and 0.4  # noqa: E731
    y0 = torch.zeros(2, dtype=D)
    for lib in (torchadjoint, torchdiffeq):
        t_e, ys = lib.odeint(f, y0, torch.tensor([0.0, 1.0], dtype=D), event_fn=ev)
        torch.testing.assert_close(t_e, torch.tensor(0.4, dtype=D), rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(ys[-1], torch.tensor([0.4, -0.4], dtype=D), rtol=1e-8, atol=1e-8)


def test_event_at_the_start():
    y0 = torch.tensor([0.0, 1.0], dtype=D)
    t_e, ys = odeint(lambda t, y: y, y0, torch.tensor([0.25, 1.0], dtype=D), event_fn=lambda t, y: y[0])
    assert float(t_e) == 0.25 and torch.equal(ys[1], y0)


@pytest.mark.parametrize("interp", ["linear", "cubic"])
def test_fixed_grid_event_uses_the_interpolation_chosen(interp):
    """The event is located on the step's linear or cubic interpolant, as torchdiffeq does;
    the two differ by far more than the root finding's accuracy."""
    f = lambda t, y: torch.stack([y[1], -y[0]])  # noqa: E731
    y0 = torch.tensor([1.0, 0.0], dtype=D)
    t = torch.tensor([0.0, 1.0], dtype=D)
    results = {}
    for lib in (torchadjoint, torchdiffeq):
        results[lib] = lib.odeint(f, y0, t, event_fn=lambda s, y: y[0] - 0.5, method="rk4", options=dict(step_size=0.2, interp=interp))
    torch.testing.assert_close(results[torchadjoint][0], results[torchdiffeq][0], rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(results[torchadjoint][1], results[torchdiffeq][1], rtol=1e-7, atol=1e-7)
    err = abs(float(results[torchadjoint][0]) - math.pi / 3)
    assert (err > 1e-4) if interp == "linear" else (err < 1e-4)


def test_root_is_found_to_rounding_on_the_dense_output():
    """dopri5's own continuous extension and the Illinois method: y = exp(-t) reaches 0.3
    at -log(0.3), to the accuracy of the solve itself (torchdiffeq bisects to atol)."""
    t_e, _ = odeint(lambda t, y: -y, torch.tensor([1.0], dtype=D), torch.tensor([0.0, 1.0], dtype=D),
                    event_fn=lambda t, y: y[0] - 0.3, rtol=1e-12, atol=1e-14)
    assert abs(float(t_e) + math.log(0.3)) < 1e-11


def test_solve_to_event_gradcheck():
    """The native entry point: finite differences of the event time and state, float64
    (the implicit-function part; Direct vs Backsolve is checked below)."""
    def fn(a, y0, t0):
        sol = solve_to_event(
            lambda t, y: torch.stack([y[1], -a * y[0] - 0.2 * y[1]]), y0, t0, lambda t, y: y[0] - 0.1 * t,
            gradient=Direct(), rtol=1e-8, atol=1e-10,
        )
        return sol.t, sol.y

    args = (torch.tensor(3.0, dtype=D, requires_grad=True), torch.tensor([1.0, 0.5], dtype=D, requires_grad=True),
            torch.tensor(0.2, dtype=D, requires_grad=True))
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_direct_and_backsolve_agree_natively():
    y0 = torch.tensor([1.0, 0.5], dtype=D, requires_grad=True)
    a = torch.tensor(2.0, dtype=D, requires_grad=True)
    f = lambda t, y: torch.stack([y[1], -a * torch.sin(y[0])])  # noqa: E731
    grads = []
    for gradient in (Direct(), Backsolve()):
        sol = solve_to_event(f, y0, torch.tensor(0.0, dtype=D), lambda t, y: y[0], gradient=gradient, params=[a],
                             rtol=1e-10, atol=1e-12)
        grads.append(torch.autograd.grad(sol.t + sol.y[1], (y0, a)))
    for d, b in zip(*grads):
        torch.testing.assert_close(d, b, rtol=1e-6, atol=1e-8)


def test_event_errors():
    f = lambda t, y: -y  # noqa: E731
    y0 = torch.tensor([1.0], dtype=D)
    with pytest.raises(ValueError, match="len\\(t\\) == 2"):
        odeint(f, y0, torch.tensor([0.0, 1.0, 2.0], dtype=D), event_fn=lambda t, y: y[0])
    with pytest.raises(ValueError, match="step_size"):
        odeint(f, y0, torch.tensor([0.0, 1.0], dtype=D), event_fn=lambda t, y: y[0], method="euler")
    with pytest.raises(TypeError, match="event_fn"):
        odeint(f, y0, torch.tensor([0.0, 1.0], dtype=D), event_fn=lambda t, y: 1.0)
    with pytest.raises(SolveError, match="did not change sign"):
        odeint(lambda t, y: torch.zeros_like(y), y0, torch.tensor([0.0, 1.0], dtype=D), event_fn=lambda t, y: y[0])
    with pytest.raises(SolveError, match="max_num_steps"):
        solve_to_event(f, y0, torch.tensor(0.0, dtype=D), lambda t, y: y[0] + 1.0, method="euler", step_size=0.1,
                       max_num_steps=300)


# --- Regressions: the first crossing in a step, whatever the event function does at its ends.


def falling(g=0.6445):
    """Position and velocity under constant gravity (a tuple of (1,) tensors)."""
    return lambda t, s: (s[1], torch.full_like(s[1], -g))


def first_root(x0, v0, level, g=0.6445):
    """The first t > 0 with x0 + v0 t - g t²/2 = level."""
    return (v0 + math.sqrt(v0 * v0 + 2 * g * (x0 - level))) / g


@pytest.mark.parametrize("method,options", [("dopri5", None), ("rk4", dict(step_size=0.05, interp="cubic"))])
@pytest.mark.parametrize("interface", ["odeint", "odeint_adjoint"])
def test_end_time_trick_does_not_hide_the_crossing(interface, method, options):
    """torchdiffeq's physics example: ``torch.zeros(1) if t > T else position``. The step
    that ends past T ends exactly at zero; the crossing inside it, before T, is the event
    (it was skipped, and the solve ran on to t = 27.5 below ground)."""
    y0 = (torch.tensor([9.518], dtype=D), torch.tensor([-0.4819], dtype=D))
    T = 6.0786
    ev = lambda t, s: torch.zeros(1) if t > T else s[0] - 0.211  # noqa: E731
    kwargs = dict(method=method, options=options, rtol=1e-8, atol=1e-8)
    if interface == "odeint_adjoint":
        kwargs["adjoint_params"] = ()
    t_e, (x, _) = torchadjoint.odeint_event(falling(), y0, torch.tensor([0.0], dtype=D), event_fn=ev,
                                            odeint_interface=getattr(torchadjoint, interface), **kwargs)
    expected = first_root(9.518, -0.4819, 0.211)
    assert expected < T
    assert abs(float(t_e) - expected) < 1e-6 and abs(float(x[-1]) - 0.211) < 1e-6
    # With the trick's time before the crossing, the event is the end time itself.
    ev_early = lambda t, s: torch.zeros(1) if t > 3.0 else s[0] - 0.211  # noqa: E731
    t_e, _ = torchadjoint.odeint_event(falling(), y0, torch.tensor([0.0], dtype=D), event_fn=ev_early,
                                       odeint_interface=getattr(torchadjoint, interface), **kwargs)
    assert 3.0 < float(t_e) < 3.0 + 1e-12


@pytest.mark.parametrize("reverse", [False, True])
def test_first_of_several_roots_in_one_step(reverse):
    """One euler step of size 1 over y = t; the event function has roots at 0.3, 0.55 and 0.8
    inside it (ends of opposite sign): the first, 0.3, is the event (reversed: y = -t = |t|)."""
    s = -1.0 if reverse else 1.0
    ev = lambda t, y: -(y[0] - 0.3) * (y[0] - 0.55) * (y[0] - 0.8)  # noqa: E731
    t_e, ys = torchadjoint.odeint_event(lambda t, y: torch.full_like(y, s), torch.zeros(1, dtype=D),
                                        torch.tensor(0.0, dtype=D), event_fn=ev, reverse_time=reverse,
                                        method="euler", options=dict(step_size=1.0))
    assert abs(float(t_e) - s * 0.3) < 1e-12


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("zero_from", [1.0, 0.7])
def test_event_function_exactly_zero_from_some_time_on(zero_from, reverse):
    """The event function is exactly zero from ``zero_from`` on (a step end, or inside the
    step), and crosses at 0.4 before: 0.4 is the event, not the start of the zeros."""
    s = -1.0 if reverse else 1.0
    ev = lambda t, y: torch.zeros(()) if s * t >= zero_from else 0.4 - y[0]  # y = |t|  # noqa: E731
    for method, options in (("euler", dict(step_size=1.0)), ("dopri5", dict(first_step=1.0))):
        t_e, _ = torchadjoint.odeint_event(lambda t, y: torch.full_like(y, s), torch.zeros(1, dtype=D),
                                           torch.tensor(0.0, dtype=D), event_fn=ev, reverse_time=reverse,
                                           method=method, options=options)
        assert abs(float(t_e) - s * 0.4) < 1e-12, (method, float(t_e))


def test_event_function_discontinuous_in_the_state():
    """``sign(0.37 - y)``: no root, a jump; located by bisection to rounding."""
    ev = lambda t, y: torch.where(y[0] < 0.37, 1.0, -1.0).to(y)  # noqa: E731
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        t_e, _ = odeint(lambda t, y: torch.ones_like(y), torch.zeros(1, dtype=D), torch.tensor([0.0, 1.0], dtype=D),
                        event_fn=ev, method="rk4", options=dict(step_size=0.25))
    assert 0.37 <= float(t_e) < 0.37 + 1e-12


def test_event_function_may_return_0_dim_and_1_element_tensors():
    """A 0-dim event value is one component, as in torchdiffeq: ``torch.sum(...)`` at some
    times and a (1,) tensor at others."""
    ev = lambda t, y: torch.sum(y - 0.5) if t < 0.2 else (y - 0.5)  # noqa: E731
    y0 = torch.zeros(1, dtype=D)
    t_e, _ = odeint(lambda t, y: torch.ones_like(y), y0, torch.tensor([0.0, 1.0], dtype=D), event_fn=ev)
    assert abs(float(t_e) - 0.5) < 1e-12
    with pytest.raises(TypeError, match="shape it returned at t0"):
        odeint(lambda t, y: torch.ones_like(y), y0, torch.tensor([0.0, 1.0], dtype=D),
               event_fn=lambda t, y: (y - 0.5) if t < 0.2 else torch.cat([y, y]) - 0.5)


class Linear32(nn.Module):
    """``dy/dt = a + (y - (a t + b))^5``: the exact solution is ``a t + b`` (0-dim state)."""

    def __init__(self, dtype):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.2, dtype=dtype))
        self.b = nn.Parameter(torch.tensor(3.0, dtype=dtype))

    def forward(self, t, y):
        return self.a + (y - (self.a * t + self.b)) ** 5


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
def test_fixed_step_event_time_in_float32_is_as_accurate_as_torchdiffeq(method, reverse):
    """Fixed steps of 0.01 with the cubic interpolant, float32: the event time within 1.2× of
    torchdiffeq's error (both are float32 rounding over ~160 steps). rk4 used to be 1.0e-4 off
    forward, 3.6× torchdiffeq's: the step's
    ``addmv`` rounded the state once per stage, which drifts over the 155 steps (see
    ``step.advance``)."""
    d = torch.float32
    times = torch.tensor([1.0, 8.0 / 3.0], dtype=d)
    t = times.flip(0) if reverse else times
    errors = []
    for lib in (torchadjoint, torchdiffeq):
        func = Linear32(d)
        with torch.no_grad():
            t_e, _ = lib.odeint(func, 0.2 * t[0] + 3.0, t, event_fn=lambda s, y: torch.sum(y - (0.2 * t[1] + 3.0)),
                                method=method, options={"step_size": 0.01, "interp": "cubic"})
        errors.append(abs(float(t_e - t[1]) / float(t[1])))
    ours, theirs = errors
    assert ours <= 1.2 * theirs + 1e-6, (ours, theirs)


def test_one_rounding_of_the_state_per_step():
    """rk4 and euler on a constant field in float32 take the same state through the same
    roundings: the stage combination is added to the state once per step."""
    d = torch.float32
    ys = [torchadjoint.solve(lambda t, y: torch.full_like(y, 0.2), torch.tensor([3.2], dtype=d),
                             torch.tensor([1.0, 2.5], dtype=d), method=m, step_size=0.01).ys[-1] for m in ("euler", "rk4")]
    assert torch.equal(ys[0], ys[1])


@pytest.mark.parametrize("interface", ["odeint", "odeint_adjoint"])
def test_event_time_of_an_end_time_trick_is_differentiable_with_zero_gradient(interface):
    """When the event is the trick's end time T, the event time does not move with the
    parameters: a loss on it backpropagates (as in torchdiffeq) and gives them zero, while the
    state there keeps its gradient."""
    g = torch.tensor(0.6445, dtype=D, requires_grad=True)
    y0 = (torch.tensor([9.518], dtype=D), torch.tensor([-0.4819], dtype=D))
    ev = lambda t, s: torch.zeros(1) if t > 3.0 else s[0] - 0.211  # noqa: E731
    f = lambda t, s: (s[1], -g * torch.ones_like(s[1]))  # noqa: E731
    kwargs = dict(adjoint_params=(g,)) if interface == "odeint_adjoint" else {}
    t_e, (x, v) = torchadjoint.odeint_event(f, y0, torch.tensor([0.0], dtype=D), event_fn=ev, rtol=1e-10, atol=1e-10,
                                            odeint_interface=getattr(torchadjoint, interface), **kwargs)
    (dt,) = torch.autograd.grad(t_e, g, retain_graph=True)
    assert float(dt) == 0.0
    (dx,) = torch.autograd.grad(x[-1].sum(), g)
    torch.testing.assert_close(dx, -0.5 * t_e.detach() ** 2, rtol=1e-7, atol=1e-9)


def test_gradient_through_an_event_that_jumps_in_the_state_is_an_error():
    """``sign(y - level)`` crosses by a jump in y: the event time moves with y0 but has no
    derivative here. Backpropagating a loss on it is an error naming the time, not a silent
    zero; the state at the event keeps its gradient, and a jump in t alone (above) is fine."""
    y0 = torch.tensor([0.0], dtype=D, requires_grad=True)
    ev = lambda t, y: torch.where(y[0] < 0.37, 1.0, -1.0).to(y)  # noqa: E731
    t_e, ys = odeint(lambda t, y: torch.ones_like(y), y0, torch.tensor([0.0, 1.0], dtype=D), event_fn=ev)
    with pytest.raises(SolveError, match="jumps in y"):
        t_e.backward(retain_graph=True)
    (grad,) = torch.autograd.grad(ys[-1].sum() + 0.0 * t_e, y0)
    torch.testing.assert_close(grad, torch.ones(1, dtype=D))

"""Every torchdiffeq option and adjoint argument of the front door, each exercised so that
the test fails if the option were ignored; keys torchdiffeq ignores (with a warning) are
ignored with a warning here too; and the errors for what is not accepted."""
import math
import warnings

import pytest
import torch
import torchdiffeq
from torch import nn

import torchadjoint
from torchadjoint import GRADIENT_METHODS, SolveError, odeint, odeint_adjoint
from torchadjoint.compat import OPTIONS

D = torch.float64
T = torch.tensor([0.0, 0.5, 1.0], dtype=D)
Y0 = torch.tensor([1.0, -0.5], dtype=D)


def spiral(t, y):
    return torch.stack([-0.3 * y[0] + 2.0 * y[1], -2.0 * y[0] - 0.3 * y[1]]) + 0.1 * torch.sin(3 * t)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.tensor([[-0.3, 2.0], [-2.0, -0.3]], dtype=D))
        self.c = nn.Parameter(torch.tensor([0.2, -0.1], dtype=D))

    def forward(self, t, y):
        return torch.tanh(y @ self.W.T) + self.c * t


def recording(func):
    """``func`` that records the times it is called at (as floats)."""
    calls = []

    def wrapped(t, y):
        calls.append(float(t))
        return func(t, y)

    return wrapped, calls


def both(fn_name, func, y0=Y0, t=T, **kw):
    """The same call through torchadjoint and torchdiffeq."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(torchadjoint, fn_name)(func, y0, t, **kw), getattr(torchdiffeq, fn_name)(func, y0, t, **kw)


def close(a, b, tol):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ---------------------------------------------------------------- adaptive-method options


def test_min_step_and_max_step_force_steps_of_exactly_that_size():
    """min_step = max_step = 0.1 makes dopri5 a fixed-step method in both libraries: the
    results then agree to rounding. Tight tolerances would otherwise take smaller steps
    (min_step ignored), loose ones larger (max_step ignored)."""
    for rtol in (1e-12, 1e-2):
        ours, theirs = both("odeint", spiral, rtol=rtol, atol=rtol, options=dict(min_step=0.1, max_step=0.1))
        close(ours, theirs, 1e-13)
        free = odeint(spiral, Y0, T, rtol=rtol, atol=rtol)
        assert (free - ours).abs().max() > 1e-9


def test_first_step_and_ifactor():
    """first_step sets the first step (its second stage is at t0 + h/5); ifactor=1 never
    lets a step grow, so with small errors every step is first_step long — as in torchdiffeq."""
    f, calls = recording(spiral)
    odeint(f, Y0, T, options=dict(first_step=0.05))
    assert calls[1] == pytest.approx(0.01, abs=1e-15)  # no initial-step selection call
    ours, theirs = both("odeint", spiral, rtol=1e-3, atol=1e-3, options=dict(first_step=0.05, ifactor=1.0))
    close(ours, theirs, 1e-13)
    assert (odeint(spiral, Y0, T, rtol=1e-3, atol=1e-3, options=dict(first_step=0.05)) - ours).abs().max() > 1e-8


def test_safety_shrinks_steps():
    def nfe(**options):
        f, calls = recording(spiral)
        y = odeint(f, Y0, T, rtol=1e-6, atol=1e-8, options=options)
        return len(calls), y

    default, y_default = nfe()
    careful, y_careful = nfe(safety=0.3)
    assert careful > 1.5 * default
    close(y_careful, y_default, 1e-5)


def test_dfactor_limits_the_shrink_after_a_rejection():
    """A first step of 1 is far too long: with dfactor=0.9 it shrinks by at most 10% per
    rejection, so it takes many more rejections (evaluations) than with 0.01."""

    def nfe(dfactor):
        f, calls = recording(spiral)
        odeint(f, Y0, T, rtol=1e-8, atol=1e-10, options=dict(first_step=1.0, dfactor=dfactor))
        return len(calls)

    assert nfe(0.9) > nfe(0.01) + 50


def test_max_num_steps():
    with pytest.raises(SolveError, match="max_num_steps"):
        odeint(spiral, Y0, T, rtol=1e-10, atol=1e-12, options=dict(max_num_steps=5))
    odeint(spiral, Y0, T, rtol=1e-10, atol=1e-12, options=dict(max_num_steps=500))


def test_norm_receives_the_state_structure():
    """A user norm sees the tuple; a norm that measures only x lets v go uncontrolled."""
    y0 = (torch.tensor([1.0], dtype=D), torch.tensor([0.0], dtype=D))
    f = lambda t, s: (s[1], -25.0 * s[0])  # noqa: E731
    seen = []

    def only_x(err):
        seen.append(type(err))
        return err[0].abs().max()

    t = torch.tensor([0.0, 2.0], dtype=D)
    x_ctl, v_ctl = odeint(f, y0, t, rtol=1e-8, atol=1e-10, options=dict(norm=only_x))
    assert seen and all(s is tuple for s in seen)
    x_ref, v_ref = odeint(f, y0, t, rtol=1e-8, atol=1e-10)
    exact_x = math.cos(10.0)
    assert abs(float(x_ref[-1]) - exact_x) < 1e-7
    assert abs(float(x_ctl[-1]) - exact_x) < 1e-6
    theirs = torchdiffeq.odeint(f, y0, t, rtol=1e-8, atol=1e-10, options=dict(norm=only_x))
    close(x_ctl, theirs[0], 1e-6)


def test_default_tuple_norm_is_the_mixed_norm():
    """torchdiffeq measures a tuple state by its largest per-tensor RMS; a plain RMS over
    the concatenation (diluted by a large quiet tensor) would take fewer steps."""
    y0 = (torch.tensor([1.0], dtype=D), torch.zeros(50, dtype=D))
    f = lambda t, s: (-3.0 * s[0] * torch.cos(3 * t), 0.0 * s[1])  # noqa: E731
    counts = {}
    for norm in (None, lambda e: torch.cat([x.reshape(-1) for x in e]).pow(2).mean().sqrt()):
        g, calls = recording(f)
        odeint(g, y0, T, rtol=1e-6, atol=1e-8, options=None if norm is None else dict(norm=norm))
        counts[norm is None] = len(calls)
    assert counts[True] > counts[False]


def test_dtype_is_validated():
    """dtype is torchdiffeq's time dtype; times here are float64 host numbers whatever it
    says (never less precise), so only its validity is checked."""
    with pytest.raises(TypeError, match="dtype"):
        odeint(spiral, Y0, T, options=dict(dtype="float32"))
    y32 = odeint(spiral, Y0.float(), T.float(), rtol=1e-5, atol=1e-6, options=dict(dtype=torch.float32))
    ref = torchdiffeq.odeint(spiral, Y0.float(), T.float(), rtol=1e-5, atol=1e-6, options=dict(dtype=torch.float32))
    assert y32.dtype == torch.float32
    close(y32, ref, 1e-4)


def test_step_t_lands_steps_and_nudges_end_stages():
    """Steps land on step_t, and (as in torchdiffeq) the stages at a step's end are
    evaluated one ulp before it."""
    for lib in (torchadjoint, torchdiffeq):
        f, calls = recording(spiral)
        lib.odeint(f, Y0, T, options=dict(step_t=torch.tensor([0.37], dtype=D)))
        assert math.nextafter(0.37, 0.0) in calls, lib.__name__
    f, calls = recording(spiral)
    odeint(f, Y0, T)
    assert not any(abs(c - 0.37) < 1e-12 for c in calls)


def test_jump_t_handles_a_discontinuity():
    """f jumps at t = 0.5: with jump_t the solve restarts just after it (f evaluated at
    nextafter(0.5, 1)), the step before sees only the left piece, and the result is exact."""
    f = lambda t, y: torch.where(t < 0.5, 1.0, -2.0) * torch.ones_like(y)  # noqa: E731
    exact = torch.tensor([0.0, 0.5, -0.5], dtype=D)
    g, calls = recording(f)
    y = odeint(g, torch.zeros(1, dtype=D), T, rtol=1e-8, atol=1e-10, options=dict(jump_t=[0.5]))
    close(y[:, 0], exact, 1e-12)
    assert math.nextafter(0.5, 1.0) in calls and math.nextafter(0.5, 0.0) in calls
    g, plain = recording(f)
    odeint(g, torch.zeros(1, dtype=D), T, rtol=1e-8, atol=1e-10)
    assert len(plain) > len(calls)
    theirs = torchdiffeq.odeint(f, torch.zeros(1, dtype=D), T, rtol=1e-8, atol=1e-10, options=dict(jump_t=torch.tensor([0.5])))
    close(y, theirs, 1e-12)


# ---------------------------------------------------------------- fixed-grid options


def test_step_size():
    for h in (0.25, 0.1):
        ours, theirs = both("odeint", spiral, method="euler", options=dict(step_size=h))
        close(ours, theirs, 1e-14)
    assert (odeint(spiral, Y0, T, method="euler", options=dict(step_size=0.25))
            - odeint(spiral, Y0, T, method="euler", options=dict(step_size=0.1))).abs().max() > 1e-3


def test_default_grid_is_the_output_times():
    ours, theirs = both("odeint", spiral, method="rk4")
    close(ours, theirs, 1e-14)


def test_grid_constructor():
    calls = []

    def grid(func, y0, t):
        calls.append((func, t.shape))
        return torch.tensor([0.0, 0.1, 0.15, 0.5, 0.9, 1.0], dtype=D)

    ours, theirs = both("odeint", spiral, method="heun2", options=dict(grid_constructor=grid))
    close(ours, theirs, 1e-14)
    assert calls[0] == (spiral, (3,))  # the user's func and all output times
    uniform = odeint(spiral, Y0, T, method="heun2", options=dict(step_size=0.1))
    assert (ours - uniform).abs().max() > 1e-4
    with pytest.raises(ValueError, match="mutually exclusive"):
        odeint(spiral, Y0, T, method="heun2", options=dict(grid_constructor=grid, step_size=0.1))


def test_interp():
    t = torch.tensor([0.0, 0.3, 1.0], dtype=D)  # 0.3 inside a step of 0.25 … 0.5
    linear, cubic = (odeint(spiral, Y0, t, method="midpoint", options=dict(step_size=0.25, interp=k)) for k in ("linear", "cubic"))
    assert (linear[1] - cubic[1]).abs().max() > 1e-4
    for kind, ours in (("linear", linear), ("cubic", cubic)):
        theirs = torchdiffeq.odeint(spiral, Y0, t, method="midpoint", options=dict(step_size=0.25, interp=kind))
        close(ours, theirs, 1e-14)
    with pytest.raises(ValueError, match="interp"):
        odeint(spiral, Y0, t, method="midpoint", options=dict(step_size=0.25, interp="quintic"))


@pytest.mark.parametrize("method", ["euler", "rk4", "heun2"])
def test_perturb_evaluates_inside_each_step(method):
    """f with a jump exactly at grid points (0.5 is one): perturb=True evaluates the first
    stage just after the step's start and end stages just before its end, as torchdiffeq."""
    left = lambda t, y: torch.where(t <= 0.5, 1.0, 2.0) * torch.ones_like(y)  # noqa: E731
    right = lambda t, y: torch.where(t < 0.5, 1.0, 2.0) * torch.ones_like(y)  # noqa: E731
    y0 = torch.zeros(1, dtype=D)
    for f in (left, right):
        results = {}
        for perturb in (False, True):
            ours, theirs = both("odeint", f, y0=y0, method=method, options=dict(step_size=0.1, perturb=perturb))
            close(ours, theirs, 1e-14)
            results[perturb] = ours
        close(results[True][-1], torch.tensor([1.5], dtype=D), 1e-12)  # exact: each step sees one piece
    # Without perturb, one of the two conventions must put a wrong value into a step.
    assert any(
        (odeint(f, y0, T, method=method, options=dict(step_size=0.1)) - torch.tensor([[0.0], [0.5], [1.5]], dtype=D)).abs().max() > 1e-3
        for f in (left, right)
    )


def test_perturb_in_the_adjoint():
    """The backward solve of odeint_adjoint evaluates inside its (reversed) steps too:
    dL/dy0 for y' = c(t)·y with c jumping at a grid point matches torchdiffeq."""
    c = lambda t: torch.where(t < 0.5, 1.0, -1.0)  # noqa: E731
    f = lambda t, y: c(t) * y  # noqa: E731
    grads = {}
    for lib in (torchadjoint, torchdiffeq):
        y0 = torch.tensor([1.0], dtype=D, requires_grad=True)
        y = lib.odeint_adjoint(f, y0, T, method="rk4", options=dict(step_size=0.1, perturb=True), adjoint_params=())
        y[-1].sum().backward()
        grads[lib] = y0.grad
    close(grads[torchadjoint], grads[torchdiffeq], 1e-12)
    close(grads[torchadjoint], torch.tensor([1.0], dtype=D), 1e-6)  # exp(0.5 - 0.5)
    y0 = torch.tensor([1.0], dtype=D, requires_grad=True)
    y = odeint_adjoint(f, y0, T, method="rk4", options=dict(step_size=0.1, perturb=True), adjoint_params=(),
                       adjoint_options=dict(step_size=0.1, perturb=False))
    y[-1].sum().backward()
    assert abs(float(y0.grad) - 1.0) > 1e-2  # the backward steps see the wrong piece


# ---------------------------------------------------------------- adjoint arguments


def adjoint_grads(**kw):
    net = Net()
    y0 = Y0.clone().requires_grad_()
    calls = []
    counted = lambda t, y: calls.append(float(t)) or net(t, y)  # noqa: E731
    y = odeint_adjoint(counted, y0, T, adjoint_params=tuple(net.parameters()), **kw)
    n_forward = len(calls)
    (y ** 2).sum().backward()
    return [y0.grad] + [p.grad for p in net.parameters()], len(calls) - n_forward


def reference_grads():
    net = Net()
    y0 = Y0.clone().requires_grad_()
    (odeint(net, y0, T, rtol=1e-12, atol=1e-12) ** 2).sum().backward()
    return [y0.grad] + [p.grad for p in net.parameters()]


def error(grads, ref):
    return max(float((g - r).abs().max()) for g, r in zip(grads, ref))


def test_adjoint_rtol_atol():
    ref = reference_grads()
    tight, tight_nfe = adjoint_grads(rtol=1e-10, atol=1e-12)
    loose, loose_nfe = adjoint_grads(rtol=1e-10, atol=1e-12, adjoint_rtol=1e-4, adjoint_atol=1e-6)
    assert loose_nfe < tight_nfe
    assert error(tight, ref) < 1e-7 < error(loose, ref) < 1e-2
    # Each on its own loosens the backward solve.
    assert adjoint_grads(rtol=1e-10, atol=1e-12, adjoint_rtol=1e-4)[1] < tight_nfe
    assert adjoint_grads(rtol=1e-10, atol=1e-12, adjoint_atol=1e-4)[1] < tight_nfe


def test_adjoint_method_and_options():
    """A different backward method with its own options; torchdiffeq computes the same
    discrete adjoint (fixed steps on the same grid)."""
    kw = dict(method="rk4", options=dict(step_size=0.05), adjoint_method="euler", adjoint_options=dict(step_size=0.1))
    grads = {}
    for lib in (torchadjoint, torchdiffeq):
        net = Net()
        y0 = Y0.clone().requires_grad_()
        (lib.odeint_adjoint(net, y0, T, **kw) ** 2).sum().backward()
        grads[lib] = [y0.grad] + [p.grad for p in net.parameters()]
    assert error(grads[torchadjoint], grads[torchdiffeq]) < 1e-12
    assert error(grads[torchadjoint], reference_grads()) > 1e-3  # Euler backwards is not accurate
    with pytest.raises(ValueError, match="adjoint_options"):
        odeint_adjoint(Net(), Y0, T, method="rk4", options=dict(step_size=0.1), adjoint_method="euler")


def test_adjoint_norm_seminorm_and_callable():
    ref = reference_grads()
    full, full_nfe = adjoint_grads(rtol=1e-8, atol=1e-10)
    semi, semi_nfe = adjoint_grads(rtol=1e-8, atol=1e-10, adjoint_options=dict(norm="seminorm"))
    assert semi_nfe < full_nfe
    assert error(semi, ref) < 1e-5 and error(full, ref) < 1e-5
    seen = []

    def only_state(parts):
        seen.append([tuple(x.shape) for x in parts])
        t, y, a_y, *a_params = parts
        return torch.stack([y.pow(2).mean().sqrt(), a_y.pow(2).mean().sqrt()]).max()

    custom, custom_nfe = adjoint_grads(rtol=1e-8, atol=1e-10, adjoint_options=dict(norm=only_state))
    assert seen[0] == [(), (2,), (2,), (2, 2), (2,)]  # (t, y, a_y, *a_θ) as in torchdiffeq
    assert custom_nfe == semi_nfe
    assert error(custom, semi) < 1e-12


def test_adjoint_params_subset():
    """Only adjoint_params are differentiated. A tensor func uses that requires grad but is
    left out is an error here (torchdiffeq silently gives it no gradient)."""
    ref = reference_grads()
    net = Net()
    net.c.requires_grad_(False)
    y0 = Y0.clone().requires_grad_()
    (odeint_adjoint(net, y0, T, rtol=1e-10, atol=1e-12) ** 2).sum().backward()  # c left out: not requiring grad
    assert net.W.grad is not None and net.c.grad is None
    close(net.W.grad, ref[1], 1e-6)
    net = Net()
    y0 = Y0.clone().requires_grad_()
    with pytest.raises(ValueError, match="not among its params"):
        odeint_adjoint(net, y0, T, adjoint_params=(net.W,))
    with pytest.raises(ValueError, match="adjoint_params"):
        odeint_adjoint(spiral, Y0, T)


@pytest.mark.parametrize("name", sorted(GRADIENT_METHODS))
def test_adjoint_options_gradient_selects_a_method(name):
    """adjoint_options['gradient'] picks any registered gradient method; its own
    constructor arguments ride along as further keys."""
    ref = reference_grads()
    options = dict(gradient=name)
    if name == "checkpointed":
        options["checkpoints"] = 4
    grads, backward_nfe = adjoint_grads(rtol=1e-10, atol=1e-12, adjoint_options=options)
    assert error(grads, ref) < 1e-6
    if name == "direct":
        assert backward_nfe == 0  # autograd through the recorded steps: f is not called again
    else:
        assert backward_nfe > 0


def test_adjoint_options_gradient_errors():
    with pytest.raises(ValueError, match="GRADIENT_METHODS"):
        odeint_adjoint(Net(), Y0, T, adjoint_options=dict(gradient="telepathy"))
    with pytest.raises(ValueError, match="takes no"):
        odeint_adjoint(Net(), Y0, T, adjoint_rtol=1e-3, adjoint_options=dict(gradient="direct"))
    net = Net()
    y0 = Y0.clone().requires_grad_()
    odeint_adjoint(net, y0, T, adjoint_options=dict(gradient=torchadjoint.Direct())).sum().backward()
    assert y0.grad is not None


# ---------------------------------------------------------------- methods and errors


def ignored(call):
    """Run ``call``; return the texts of the warnings it gave that say a key is ignored."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    return result, [str(w.message) for w in caught if "ignored" in str(w.message)]


@pytest.mark.parametrize("method,options", [
    ("dopri5", dict(grid_points=torch.tensor([0.5]))),  # an old torchdiffeq key
    ("dopri5", dict(step_size=0.1)),  # a fixed-grid key with an adaptive method
    ("dopri5", dict(step_size=0.1, interp="cubic", perturb=True, eps=1e-3)),
    ("rk4", dict(step_size=0.25, first_step=0.1, rtol=1e-3)),  # adaptive keys with a fixed grid
    ("rk4", dict(step_size=0.25, dtype=torch.float64, grid_points=None)),
])
@pytest.mark.parametrize("fn", ["odeint", "odeint_adjoint"])
def test_keys_torchdiffeq_ignores_are_ignored_with_a_warning_naming_them(fn, method, options):
    """torchdiffeq's solvers warn about the keys they don't use and go on; so does the front
    door (programs pass ``options=dict(step_size=...)`` whatever ``--method`` is). The
    result is the solve without those keys, and the warning names each of them once."""
    used = {k: v for k, v in options.items() if k in (("step_size",) if method == "rk4" else ())}
    func = Net()
    expected = getattr(torchadjoint, fn)(func, Y0, T, method=method, options=used or None)
    y, messages = ignored(lambda: getattr(torchadjoint, fn)(func, Y0, T, method=method, options=options))
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    dropped = [k for k in options if k not in used]
    assert len(messages) == 1, messages
    assert all(repr(k) in messages[0] for k in dropped) and method in messages[0]
    if fn == "odeint_adjoint":  # the backward solve (options inherited) neither warns again nor fails
        y, messages = ignored(lambda: getattr(torchadjoint, fn)(func, Y0.clone().requires_grad_(), T, method=method,
                                                                options=options).sum().backward())
        assert len(messages) == 1, messages


def test_adjoint_options_keys_torchdiffeq_ignores_are_ignored_with_a_warning():
    func = Net()
    y0 = Y0.clone().requires_grad_()
    _, messages = ignored(lambda: odeint_adjoint(func, y0, T, adjoint_options=dict(rtoll=1e-3, step_size=0.1)).sum().backward())
    assert len(messages) == 1 and "adjoint_options" in messages[0] and "'rtoll'" in messages[0] and "'step_size'" in messages[0]
    assert y0.grad is not None


def test_native_solve_keeps_strict_errors_for_options():
    """Only the torchdiffeq front door is lenient: the native API refuses what it would not use."""
    with pytest.raises(ValueError, match="step_size"):
        torchadjoint.solve(spiral, Y0, T, method="dopri5", step_size=0.1)
    with pytest.raises(TypeError, match="grid_points"):
        torchadjoint.solve(spiral, Y0, T, method="dopri5", grid_points=[0.5])
    with pytest.raises(TypeError, match="grid_points"):
        torchadjoint.solve_to_event(spiral, Y0, T[0], lambda t, y: y[0], grid_points=[0.5])


def test_options_must_be_a_dict():
    with pytest.raises(TypeError, match="options must be a dict"):
        odeint(spiral, Y0, T, options=[("step_size", 0.1)])
    assert set(OPTIONS) >= {"step_size", "first_step", "norm"}


@pytest.mark.parametrize("method", ["scipy_solver"])
def test_methods_not_provided_name_the_ones_that_are(method):
    # scipy_solver is served by scipy itself (compat.scipy_solver), but not with events.
    with pytest.raises(ValueError, match=method) as info:
        odeint(spiral, Y0, T[:2], method=method, event_fn=lambda t, y: y[..., 0])
    assert "dopri5" in str(info.value) and "rk4" in str(info.value)


def test_every_torchdiffeq_explicit_method_is_accepted():
    from torchdiffeq._impl.odeint import SOLVERS

    explicit = [m for m in SOLVERS if m not in ("explicit_adams", "implicit_adams", "fixed_adams", "scipy_solver")]
    for method in explicit:
        options = None if method in torchadjoint.ADAPTIVE_METHODS else dict(step_size=0.25)
        y = odeint(spiral, Y0, T, method=method, rtol=1e-4, atol=1e-6, options=options)
        assert y.shape == (3, 2)
    with pytest.raises(ValueError, match="Invalid method"):
        odeint(spiral, Y0, T, method="dopri6")



def test_backward_solve_is_bounded_like_the_forward():
    """torchdiffeq's backward default of 2**31 - 1 steps is not inherited: left unset, the
    backward solve gets the native bounded default, as the forward does."""
    from torchadjoint.compat.options import plan_backward, plan_solve
    from torchadjoint.options import DEFAULT_MAX_NUM_STEPS
    from torchadjoint.tableaux import METHODS

    tableau = METHODS["dopri5"]
    forward = plan_solve(tableau, "dopri5", None, spiral, Y0, T, Y0.dtype)
    native, _ = plan_backward(tableau, "dopri5", {}, forward, spiral, Y0, T, Y0.dtype)
    assert native["max_num_steps"] == DEFAULT_MAX_NUM_STEPS
    native, _ = plan_backward(tableau, "dopri5", {"max_num_steps": 7}, forward, spiral, Y0, T, Y0.dtype)
    assert native["max_num_steps"] == 7

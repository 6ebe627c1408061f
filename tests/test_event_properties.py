"""Event properties, drawn by hypothesis: the *first* crossing is found, whatever the steps.

The trajectory is a ball under gravity, ``x(s) = x0 + v0·s - g·s²/2`` in the elapsed time
``s = direction·(t - t0)`` (forward or reversed time, any start time), so every crossing is
known in closed form, and dopri5, bosh3 and rk4 with its cubic interpolant integrate and
interpolate it exactly: what remains is the event search and rounding. The event function
has one to four components, drawn from:

- ``x - level``: a root (the ball falls through ``level``), or, with ``level`` above ``x0``
  and below the apex, two roots (up and down; the first counts);
- ``s_stop - s``: a component that crosses at a given time;
- ``where(x > level2, 1, -1)``: a jump with no zero (discontinuous in ``y``);
- an end-time trick: the whole event value becomes exactly zero from ``s_T`` on
  (discontinuous in ``t``), with ``s_T`` on a step end for rk4, so the event function is
  exactly zero at a step's end and at the next step's start.

Expected: the earliest of the components' crossings, within a bound scaled by the dtype's
rounding (float32 state rounding accumulates over the steps) and the crossing's speed.

A component that crosses and crosses back inside one step, with the step's ends on the same
side, is not seen (by torchdiffeq either; see docs/migration.md): the two-root case is drawn
with ``max_step`` (or ``step_size``) below the time between the roots, the documented remedy.

Gradients of the event time: against central differences and the closed form, float64.
"""
import math
import warnings

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import torchadjoint

F64, F32 = torch.float64, torch.float32


def root(x0, v0, g, level, first=False):
    """Elapsed time at which x(s) = level: the later root (the ball falls through ``level``),
    or with ``first`` the earlier one (on the way up)."""
    disc = v0 * v0 + 2 * g * (x0 - level)
    return (v0 - math.sqrt(disc)) / g if first else (v0 + math.sqrt(disc)) / g


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from([F32, F64]))
    direction = draw(st.sampled_from([1.0, -1.0]))
    t0 = draw(st.sampled_from([0.0, 0.37, -2.5, 100.0]))
    x0 = draw(st.floats(1.0, 10.0))
    v0 = draw(st.floats(-3.0, 3.0))
    g = draw(st.floats(0.5, 10.0))
    apex = x0 + (v0 * v0 / (2 * g) if v0 > 0 else 0.0)
    method = draw(st.sampled_from(["dopri5", "bosh3", "rk4"]))
    options = {}
    if method == "rk4":
        h = draw(st.floats(0.01, 0.5))
        options = dict(step_size=h, interp="cubic")
    else:
        rtol = draw(st.sampled_from([1e-3, 1e-6, 1e-9]))
        options = dict(first_step=draw(st.sampled_from([None, 1e-3, 0.3, 2.0])))
        options = {k: v for k, v in options.items() if v is not None}
    up = v0 > 0.5 and draw(st.booleans())
    crossings, parts = [], []
    if up:
        # Two roots: up through ``level`` and down again; the first is the event.
        level = x0 + draw(st.floats(0.1, 0.8)) * (apex - x0)
        s_up, s_down = root(x0, v0, g, level, first=True), root(x0, v0, g, level)
        assume(s_down - s_up > 0.05)
        crossings.append(("up", s_up, abs(v0 - g * s_up)))
        if method == "rk4":
            assume(options["step_size"] < 0.5 * (s_down - s_up))
        else:
            options["max_step"] = 0.5 * (s_down - s_up)
    else:
        level = x0 - draw(st.floats(0.1, 5.0))
        s = root(x0, v0, g, level)
        crossings.append(("level", s, abs(v0 - g * s)))
    parts.append(("level", level))
    if draw(st.booleans()):
        s_stop = draw(st.floats(0.05, 4.0))
        parts.append(("stop", s_stop))
        crossings.append(("stop", s_stop, 1.0))
    if draw(st.booleans()):
        level2 = x0 - draw(st.floats(0.1, 5.0))
        parts.append(("jump", level2))
        s = root(x0, v0, g, level2)
        crossings.append(("jump", s, abs(v0 - g * s)))
    trick = draw(st.booleans())
    if trick:
        if method == "rk4":
            s_T = options["step_size"] * draw(st.integers(1, 30))  # on a step end
        else:
            s_T = draw(st.floats(0.05, 4.0))
        crossings.append(("trick", s_T, 1.0))
    return dict(dtype=dtype, direction=direction, t0=t0, x0=x0, v0=v0, g=g, method=method, options=options,
                rtol=rtol if method != "rk4" else 1e-6, parts=parts, s_T=s_T if trick else None, crossings=crossings)


def make_event_fn(case):
    direction, t0 = case["direction"], case["t0"]

    def event_fn(t, state):
        x = state[0]
        s = direction * (t - t0)
        comps = []
        for kind, value in case["parts"]:
            if kind == "level":
                comps.append(x - value)
            elif kind == "stop":
                comps.append((value - s).reshape(1).to(x))
            else:
                comps.append(torch.where(x > value, 1.0, -1.0).to(x))
        c = torch.cat(comps)
        if case["s_T"] is not None and s >= case["s_T"]:
            return torch.zeros_like(c)
        return c

    return event_fn


def solve(case, interface="odeint", **params):
    d, direction = case["dtype"], case["direction"]
    x0 = params.get("x0", torch.tensor([case["x0"]], dtype=d))
    v0 = params.get("v0", torch.tensor([case["v0"]], dtype=d))
    g = params.get("g", torch.tensor(case["g"], dtype=d))

    def f(t, state):  # in the elapsed time s, dx/ds = v, dv/ds = -g
        return direction * state[1], -direction * g * torch.ones_like(state[1])

    kwargs = dict(adjoint_params=tuple(p for p in (g,) if p.requires_grad)) if interface == "odeint_adjoint" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torchadjoint.odeint_event(
            f, (x0, v0), torch.tensor(case["t0"], dtype=d), event_fn=make_event_fn(case),
            reverse_time=direction < 0, method=case["method"], options=case["options"] or None,
            rtol=case["rtol"], atol=case["rtol"] * 1e-2, odeint_interface=getattr(torchadjoint, interface), **kwargs,
        )


@settings(max_examples=max(settings().max_examples, 100))
@given(cases())
def test_first_crossing_is_found(case):
    t_e, (x, v) = solve(case)
    kind, s_star, speed = min(case["crossings"], key=lambda c: c[1])
    t_star = case["t0"] + case["direction"] * s_star
    eps = torch.finfo(case["dtype"]).eps
    # Rounding of the time itself, and of the state (accumulating over the steps) seen
    # through the crossing's speed.
    steps = s_star / case["options"]["step_size"] if case["method"] == "rk4" else 50
    scale = max(abs(case["x0"]), abs(case["v0"]) * s_star, case["g"] * s_star ** 2, 1.0)
    bound = 16 * eps * (abs(t_star) + s_star + 1.0) + 16 * eps * (steps + 10) * scale / speed
    assert abs(float(t_e) - t_star) <= bound, (kind, float(t_e), t_star, bound)
    # The time is on the crossed side: the event function is no longer positive there.
    assert x.shape == (2, 1) and torch.isfinite(x).all()


@st.composite
def gradient_cases(draw):
    return dict(
        dtype=F64, direction=draw(st.sampled_from([1.0, -1.0])), t0=draw(st.sampled_from([0.0, 1.5])),
        x0=draw(st.floats(1.0, 10.0)), v0=draw(st.floats(-3.0, 3.0)), g=draw(st.floats(0.5, 10.0)),
        method=draw(st.sampled_from(["dopri5", "rk4"])), options=None, rtol=1e-10,
        parts=[("level", draw(st.floats(-3.0, 0.9)))], s_T=None, crossings=None,
    )


@settings(max_examples=max(settings().max_examples // 5, 20))
@given(gradient_cases(), st.sampled_from(["odeint", "odeint_adjoint"]))
def test_event_time_gradients_match_finite_differences(case, interface):
    """dt_e/d(x0, v0, g) from the implicit-function theorem against central differences of
    the event time itself and against the closed form."""
    if case["method"] == "rk4":
        case["options"] = dict(step_size=0.05, interp="cubic")
    level = case["parts"][0][1]
    assume(level < case["x0"] - 0.05)
    values = dict(x0=case["x0"], v0=case["v0"], g=case["g"])
    leaves = {"x0": torch.tensor([values["x0"]], dtype=F64, requires_grad=True),
              "v0": torch.tensor([values["v0"]], dtype=F64, requires_grad=True),
              "g": torch.tensor(values["g"], dtype=F64, requires_grad=True)}
    t_e, _ = solve(case, interface, **leaves)
    grads = torch.autograd.grad(t_e, list(leaves.values()))
    x0, v0, g = values["x0"], values["v0"], values["g"]
    s = root(x0, v0, g, level)
    speed = v0 - g * s  # negative: falling through the level
    closed = {"x0": -1.0 / speed, "v0": -s / speed, "g": 0.5 * s * s / speed}
    eps = 1e-6
    for (name, leaf), grad in zip(leaves.items(), grads):
        bumped = {}
        for sign in (1, -1):
            tweak = {k: v.detach().clone() for k, v in leaves.items()}
            tweak[name] = tweak[name] + sign * eps
            bumped[sign] = float(solve(case, interface, **tweak)[0])
        numeric = (bumped[1] - bumped[-1]) / (2 * eps) * case["direction"]
        analytic = float(grad) * case["direction"]
        assert abs(analytic - numeric) <= 1e-5 * (1 + abs(numeric)), (name, analytic, numeric)
        assert abs(analytic - closed[name]) <= 1e-6 * (1 + abs(closed[name])), (name, analytic, closed[name])

"""Every solver option and state form, each tested so the test fails if it were ignored.

Where a test needs the step sequence it runs the same validated options through
``problem.solve_flat`` with an ``on_accept`` hook (what ``solve`` runs underneath).
"""
import math

import numpy as np
import pytest
import torch

import torchadjoint as ta
from torchadjoint.controller import PIController, rms_norm, seminorm
from torchadjoint.options import SolverOptions
from torchadjoint.problem import Problem, solve_flat
from torchadjoint.validation import check_state, check_times

DT = torch.float64
A = torch.tensor([[-0.3, 1.0, 0.0], [-1.0, -0.3, 0.5], [0.2, 0.0, -0.8]], dtype=DT)
Y0 = torch.tensor([1.0, 0.5, -0.7], dtype=DT)


def linear(t, y):
    return y @ A.T  # acts on the last dimension: any batch shape in front


def exact(t, y0=Y0):
    return torch.stack([y0 @ torch.linalg.matrix_exp(A * float(s)).T for s in t])


def van_der_pol(t, y):
    return torch.stack([y[1], (1 - y[0] ** 2) * y[1] - y[0]])


class Counted:
    """f with a record of every time it was evaluated at."""

    def __init__(self, func):
        self.func, self.times = func, []

    def __call__(self, t, y):
        self.times.append(float(t))
        return self.func(t, y)


def accepted_steps(func, y0, t, method="dopri5", **options):
    """(solve result, [(t0, t1, h_next) of every accepted step]) through solve_flat."""
    flattener, dtype, device = check_state(y0)
    problem = Problem(func, flattener, check_times(t), (), dtype, device)
    steps = []
    result = solve_flat(problem, SolverOptions.build(method=method, **options), flattener.flatten(y0),
                        on_accept=lambda info: steps.append((info.t0, info.t1, info.h_next)))
    return result, steps


# --- state forms --------------------------------------------------------------------

def test_batched_state_any_shape():
    torch.manual_seed(0)
    y0 = torch.randn(4, 2, 3, dtype=DT)
    t = torch.linspace(0.0, 2.0, 7, dtype=DT)
    sol = ta.solve(linear, y0, t, rtol=1e-9, atol=1e-11)
    assert sol.ys.shape == (7, 4, 2, 3) and sol.ys.dtype == DT
    expected = torch.stack([y0 @ torch.linalg.matrix_exp(A * float(s)).T for s in t])
    assert float((sol.ys - expected).abs().max()) < 1e-8
    assert torch.equal(sol.ys[0], y0)
    # The same numbers as one flat vector: the batch is one state, not a loop over samples.
    flat = ta.solve(lambda s, y: linear(s, y.view(4, 2, 3)).reshape(-1), y0.reshape(-1), t, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(flat.ys.view(7, 4, 2, 3), sol.ys, rtol=0, atol=1e-14)
    assert flat.stats["forward"] == sol.stats["forward"]


def harmonic_flat(t, y):
    return torch.cat([y[2:], -y[:2] - 0.1 * y[2:]])


@pytest.mark.parametrize("form", ["tuple", "list", "dict"])
def test_pytree_state(form):
    x0, v0 = torch.tensor([1.0, 0.0], dtype=DT), torch.tensor([0.0, 2.0], dtype=DT)
    t = torch.linspace(0.0, 3.0, 5, dtype=DT)
    if form == "dict":
        y0 = {"x": x0, "v": v0}

        def func(s, y):
            # Keys in another order than the state's on purpose: entries go by key.
            return {"v": -y["x"] - 0.1 * y["v"], "x": y["v"]}

        get = lambda ys: (ys["x"], ys["v"])  # noqa: E731
    else:
        y0 = (x0, v0) if form == "tuple" else [x0, v0]

        def func(s, y):
            x, v = y
            return [v, -x - 0.1 * v] if form == "list" else (v, -x - 0.1 * v)

        get = lambda ys: (ys[0], ys[1])  # noqa: E731
    sol = ta.solve(func, y0, t, rtol=1e-8, atol=1e-10)
    assert type(sol.ys) is type(y0)
    xs, vs = get(sol.ys)
    assert xs.shape == (5, 2) and vs.shape == (5, 2)
    flat = ta.solve(harmonic_flat, torch.cat([x0, v0]), t, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(torch.cat([xs, vs], dim=1), flat.ys, rtol=0, atol=1e-14)
    assert sol.stats["forward"] == flat.stats["forward"]
    x_final, _ = get(sol.y_final)
    assert torch.equal(x_final, xs[-1])


def test_nested_pytree_and_scalar_leaves():
    y0 = {"a": (torch.tensor(1.0, dtype=DT), torch.ones(2, 2, dtype=DT)), "b": torch.zeros(3, dtype=DT)}

    def func(t, y):
        (s, m), b = y["a"], y["b"]
        return {"a": (-s, -2 * m), "b": torch.ones(3, dtype=DT)}

    t = torch.tensor([0.0, 1.0], dtype=DT)
    sol = ta.solve(func, y0, t, rtol=1e-10, atol=1e-12)
    assert sol.ys["a"][0].shape == (2,)
    assert float(sol.ys["a"][0][-1]) == pytest.approx(math.exp(-1), abs=1e-9)
    assert torch.allclose(sol.ys["a"][1][-1], torch.full((2, 2), math.exp(-2), dtype=DT), atol=1e-9)
    assert torch.allclose(sol.ys["b"][-1], torch.ones(3, dtype=DT), atol=1e-12)


# --- tolerances and norms -----------------------------------------------------------

SCALES = torch.tensor([1.0, 1e-6], dtype=DT)


def two_scales(t, y):
    return -y * torch.tensor([1.0, 2.0], dtype=DT)


def relative_errors(sol, t):
    truth = SCALES * torch.exp(-torch.outer(t, torch.tensor([1.0, 2.0], dtype=DT)))
    return ((sol.ys - truth).abs() / truth.abs()).max(dim=0).values


def test_per_component_atol():
    t = torch.linspace(0.0, 2.0, 5, dtype=DT)
    scalar = ta.solve(two_scales, SCALES, t, rtol=1e-8, atol=1e-7)
    tensor = ta.solve(two_scales, SCALES, t, rtol=1e-8, atol=torch.tensor([1e-7, 1e-16], dtype=DT))
    # The scalar atol swamps the tiny component; per-component, it is solved to rtol too.
    assert relative_errors(scalar, t)[1] > 1e-5
    assert relative_errors(tensor, t)[1] < 1e-7
    assert tensor.stats["forward"]["nfe"] > scalar.stats["forward"]["nfe"]


def test_per_component_rtol():
    t = torch.linspace(0.0, 2.0, 5, dtype=DT)
    loose = ta.solve(two_scales, SCALES, t, rtol=1e-3, atol=0.0)
    mixed = ta.solve(two_scales, SCALES, t, rtol=torch.tensor([1e-3, 1e-10], dtype=DT), atol=0.0)
    assert relative_errors(loose, t)[1] > 1e-5
    assert relative_errors(mixed, t)[1] < 1e-8


def test_per_tensor_tolerances_for_a_pytree():
    t = torch.linspace(0.0, 2.0, 5, dtype=DT)
    y0 = (SCALES[:1], SCALES[1:])

    def func(s, y):
        return (-y[0], -2 * y[1])

    loose = ta.solve(func, y0, t, rtol=1e-8, atol=1e-7)
    per_leaf = ta.solve(func, y0, t, rtol=1e-8, atol=(1e-7, 1e-16))
    as_dict = ta.solve(lambda s, y: {"a": -y["a"], "b": -2 * y["b"]}, {"a": y0[0], "b": y0[1]}, t,
                       rtol=1e-8, atol={"a": 1e-7, "b": 1e-16})
    truth = 1e-6 * torch.exp(-2 * t)
    assert float(((loose.ys[1][:, 0] - truth) / truth).abs().max()) > 1e-5
    assert float(((per_leaf.ys[1][:, 0] - truth) / truth).abs().max()) < 1e-7
    torch.testing.assert_close(as_dict.ys["b"], per_leaf.ys[1], rtol=0, atol=0)


def test_user_norm_sees_the_structure_and_is_used():
    seen = []

    def slow_only(err):
        seen.append(type(err))
        return rms_norm(err["slow"].reshape(-1))

    def func(t, y):
        return {"slow": -y["slow"], "fast": torch.cos(40 * t) * torch.ones_like(y["fast"])}

    y0 = {"slow": torch.ones(2, dtype=DT), "fast": torch.zeros(2, dtype=DT)}
    t = torch.linspace(0.0, 2.0, 5, dtype=DT)
    both = ta.solve(func, y0, t, rtol=1e-7, atol=1e-9)
    slow = ta.solve(func, y0, t, rtol=1e-7, atol=1e-9, norm=slow_only)
    assert seen and all(k is dict for k in seen)
    assert slow.stats["forward"]["nfe"] < both.stats["forward"]["nfe"] / 2  # the fast part no longer limits steps
    truth_slow = torch.exp(-t)[:, None].expand(5, 2)
    assert float((slow.ys["slow"] - truth_slow).abs().max()) < 1e-7
    truth_fast = (torch.sin(40 * t) / 40)[:, None].expand(5, 2)
    assert float((slow.ys["fast"] - truth_fast).abs().max()) > 1e-6  # ... and is not controlled
    assert float((both.ys["fast"] - truth_fast).abs().max()) < 1e-7


def test_max_norm_is_stricter_than_rms():
    t = torch.tensor([0.0, 10.0], dtype=DT)
    y0 = torch.tensor([2.0, 0.0], dtype=DT)
    rms = ta.solve(van_der_pol, y0, t, rtol=1e-6, atol=1e-8)
    inf = ta.solve(van_der_pol, y0, t, rtol=1e-6, atol=1e-8, norm=lambda e: e.abs().max())
    assert inf.stats["forward"]["nfe"] > rms.stats["forward"]["nfe"]


# --- step-size options --------------------------------------------------------------

def test_first_step_skips_the_probe_and_is_taken():
    t = torch.tensor([0.0, 1.0], dtype=DT)
    auto = Counted(linear)
    ta.solve(auto, Y0, t)
    given = Counted(linear)
    sol = ta.solve(given, Y0, t, first_step=1e-3)
    # dopri5's second stage sits at c_2 = 1/5 of the first step.
    assert given.times[1] == pytest.approx(0.2e-3, rel=1e-12)
    assert auto.times[1] != pytest.approx(0.2e-3)
    _, steps = accepted_steps(linear, Y0, t, first_step=1e-3)
    assert steps[0][:2] == (0.0, pytest.approx(1e-3, rel=1e-12))
    assert sol.stats["forward"]["nfe"] == len(given.times)


def test_max_step_bounds_every_step():
    t = torch.tensor([0.0, 2.0], dtype=DT)
    _, free = accepted_steps(linear, Y0, t, rtol=1e-3, atol=1e-6)
    _, bounded = accepted_steps(linear, Y0, t, rtol=1e-3, atol=1e-6, max_step=0.05)
    assert max(t1 - t0 for t0, t1, _ in free) > 0.2
    assert all(t1 - t0 <= 0.05 * (1 + 1e-12) for t0, t1, _ in bounded)
    assert len(bounded) >= 40


def test_min_step_accepts_inaccurate_steps():
    t = torch.tensor([0.0, 10.0], dtype=DT)
    y0 = torch.tensor([2.0, 0.0], dtype=DT)
    # (The last step here lands on t = 10 a few ulp longer than min_step: it once looped
    # forever, rejected and retried at the same size.)
    result, steps = accepted_steps(van_der_pol, y0, t, rtol=1e-10, atol=1e-12, min_step=0.1)
    assert all(t1 - t0 >= 0.1 * (1 - 1e-12) for t0, t1, _ in steps[:-1])  # the last may land short
    assert len(steps) <= 101 and result.stats["rejected"] == 0
    # ... which is what makes it fast and inaccurate here.
    free = ta.solve(van_der_pol, y0, t, rtol=1e-10, atol=1e-12)
    assert free.stats["forward"]["nfe"] > 2 * result.stats["nfe"]
    assert float((result.ys[-1] - free.ys[-1]).abs().max()) > 1e-8


def test_ifactor_bounds_growth():
    t = torch.tensor([0.0, 5.0], dtype=DT)
    _, steps = accepted_steps(linear, Y0, t, first_step=1e-5, ifactor=1.5)
    sizes = [t1 - t0 for t0, t1, _ in steps[:-1]]
    ratios = [b / a for a, b in zip(sizes, sizes[1:])]
    assert max(ratios) <= 1.5 * (1 + 1e-9) and max(ratios) > 1.49
    _, fast = accepted_steps(linear, Y0, t, first_step=1e-5, ifactor=10.0)
    assert len(fast) < len(steps)


def test_ifactor_one_keeps_the_first_step():
    t = torch.tensor([0.0, 1.0], dtype=DT)
    result, steps = accepted_steps(linear, Y0, t, first_step=0.125, rtol=1e10, atol=1e10, ifactor=1.0)
    assert [round(t1, 12) for _, t1, _ in steps] == [0.125 * k for k in range(1, 9)]


def test_dfactor_bounds_shrink_after_rejection():
    # A first step far too big is rejected; the retry is at least dfactor times it.
    t = torch.tensor([0.0, 1.0], dtype=DT)
    for dfactor in (0.2, 0.5):
        f = Counted(van_der_pol)
        sol = ta.solve(f, torch.tensor([2.0, 0.0], dtype=DT), t, first_step=1.0, rtol=1e-10, atol=1e-12, dfactor=dfactor)
        assert sol.stats["forward"]["rejected"] >= 1
        # Evaluation 0 is f0; 1..6 the first attempt's new stages (c_2 = 1/5 of its size);
        # 7.. the retry's, whose size the error (huge) leaves at the dfactor bound.
        assert f.times[1] == pytest.approx(0.2)
        assert f.times[7] == pytest.approx(0.2 * dfactor)


def test_safety_trades_steps_for_rejections():
    t = torch.tensor([0.0, 10.0], dtype=DT)
    y0 = torch.tensor([2.0, 0.0], dtype=DT)
    careful = ta.solve(van_der_pol, y0, t, rtol=1e-6, atol=1e-8, safety=0.5).stats["forward"]
    bold = ta.solve(van_der_pol, y0, t, rtol=1e-6, atol=1e-8, safety=1.0).stats["forward"]
    assert careful["accepted"] > 1.3 * bold["accepted"]
    assert careful["rejected"] < bold["rejected"]


def test_pi_coefficients_change_the_step_sequence():
    t = torch.tensor([0.0, 10.0], dtype=DT)
    y0 = torch.tensor([2.0, 0.0], dtype=DT)
    _, integral = accepted_steps(van_der_pol, y0, t, rtol=1e-6, atol=1e-8)
    result, pi = accepted_steps(van_der_pol, y0, t, rtol=1e-6, atol=1e-8, pcoeff=0.2, icoeff=0.4)
    assert len(pi) != len(integral)
    assert [s[1] for s in pi[:10]] != [s[1] for s in integral[:10]]
    ref = ta.solve(van_der_pol, y0, t, rtol=1e-11, atol=1e-13).ys[-1]
    assert float((result.ys[-1] - ref).abs().max()) < 1e-3


# --- the controller's protocol, with exact numbers ----------------------------------

def test_pi_controller_formula():
    c = PIController(1e-6, 1e-8, safety=0.9, ifactor=10.0, dfactor=0.2)
    accept, h, state = c.adapt(0.1, 0.5, 1.0, order=5)
    assert accept and h == pytest.approx(0.1 * 0.9 * 0.5 ** (-1 / 5)) and state == 0.5
    accept, h, state = c.adapt(0.1, 2.0, 0.5, order=5)
    assert not accept and h == pytest.approx(0.1 * 0.9 * 2.0 ** (-1 / 5)) and state == 0.5  # state kept on reject
    assert c.adapt(0.1, 1e-12, 1.0, order=5)[1] == pytest.approx(1.0)  # growth capped by ifactor
    assert c.adapt(0.1, 0.0, 1.0, order=5)[1] == pytest.approx(1.0)  # zero error: ifactor
    assert c.adapt(0.1, 1e12, 1.0, order=5)[1] == pytest.approx(0.02)  # shrink capped by dfactor
    accept, h, _ = c.adapt(0.1, math.nan, 1.0, order=5)
    assert not accept and h == pytest.approx(0.02)
    assert c.adapt(-0.1, 0.5, 1.0, order=5)[1] < 0  # the sign (direction) is kept
    pi = PIController(1e-6, 1e-8, pcoeff=0.2, icoeff=0.5)
    _, h, _ = pi.adapt(0.1, 0.5, 0.25, order=4)
    assert h == pytest.approx(0.1 * 0.9 * 0.5 ** (-0.7 / 4) * 0.25 ** (0.2 / 4))
    bounded = PIController(1e-6, 1e-8, min_step=0.05, max_step=0.08)
    accept, h, _ = bounded.adapt(0.05, 100.0, 1.0, order=5)
    assert accept and h == 0.05  # at min_step: accepted whatever the error
    assert bounded.adapt(0.06, 1e-9, 1.0, order=5)[1] == 0.08


def test_error_ratio_and_seminorm():
    c = PIController(1e-3, 1e-6)
    y0 = torch.tensor([1.0, -2.0, 0.0], dtype=DT)
    y1 = torch.tensor([1.5, -1.0, 0.0], dtype=DT)
    err = torch.tensor([1e-3, 1e-3, 1e-6], dtype=DT)
    scale = 1e-6 + 1e-3 * torch.tensor([1.5, 2.0, 0.0], dtype=DT)
    assert c.error_ratio(err, y0, y1) == pytest.approx(float(torch.sqrt(((err / scale) ** 2).mean())))
    assert float(seminorm(2)(err / scale)) == pytest.approx(float(torch.sqrt(((err[:2] / scale[:2]) ** 2).mean())))
    # The controller's own path for the built-in norms agrees with calling them.
    semi = PIController(1e-3, 1e-6, seminorm(2))
    assert semi.error_ratio(err, y0, y1) == pytest.approx(float(torch.sqrt(((err[:2] / scale[:2]) ** 2).mean())))
    user = PIController(1e-3, 1e-6, lambda x: x.abs().max())
    assert user.error_ratio(err, y0, y1) == pytest.approx(float((err / scale).abs().max()))


# --- landings: step_t and jump_t ----------------------------------------------------

@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_step_t_is_landed_on(direction):
    t = torch.tensor([0.0, 3.0 * direction], dtype=DT)
    marks = [0.37 * direction, 1.91 * direction]
    _, free = accepted_steps(linear, Y0, t, rtol=1e-5, atol=1e-7)
    _, steps = accepted_steps(linear, Y0, t, rtol=1e-5, atol=1e-7, step_t=marks)
    ends = [t1 for _, t1, _ in steps]
    assert all(m in ends for m in marks)
    assert not any(m in [t1 for _, t1, _ in free] for m in marks)
    # Landing there does not restart the controller: the step after continues at its size.
    i = ends.index(marks[0])
    assert abs(steps[i + 1][1] - steps[i + 1][0]) > 0.5 * abs(steps[i - 1][1] - steps[i - 1][0])


def test_step_t_with_a_fixed_step_method():
    t = torch.tensor([0.0, 1.0], dtype=DT)
    _, steps = accepted_steps(linear, Y0, t, method="rk4", step_size=0.25, step_t=[0.3])
    assert [round(t1, 12) for _, t1, _ in steps] == [0.25, 0.3, 0.5, 0.75, 1.0]


def switching(t, y):
    # f jumps at t = 1.3 (taken from the right there).
    return -y + (1.0 if float(t) < 1.3 else -1.0)


def switching_exact(t):
    y13 = 1 - math.exp(-1.3)
    return torch.tensor([[1 - math.exp(-s) if s < 1.3 else -1 + (y13 + 1) * math.exp(-(s - 1.3))] for s in t.tolist()], dtype=DT)


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "dopri8", "bosh3"])
def test_jump_t_adaptive(method):
    t = torch.linspace(0.0, 3.0, 7, dtype=DT)
    y0 = torch.zeros(1, dtype=DT)
    plain = ta.solve(switching, y0, t, method=method, rtol=1e-6, atol=1e-8)
    jump = ta.solve(switching, y0, t, method=method, rtol=1e-6, atol=1e-8, jump_t=[1.3])
    truth = switching_exact(t)
    err_plain = float((plain.ys - truth).abs().max())
    err_jump = float((jump.ys - truth).abs().max())
    assert err_jump < 3e-6
    assert jump.stats["forward"]["nfe"] < plain.stats["forward"]["nfe"]
    assert jump.stats["forward"]["rejected"] <= 4
    if method in ("dopri5", "tsit5"):
        assert err_jump < err_plain / 10


def test_jump_t_fixed_step_and_backwards():
    t = torch.linspace(0.0, 3.0, 7, dtype=DT)
    truth = switching_exact(t)
    plain = ta.solve(switching, torch.zeros(1, dtype=DT), t, method="rk4", step_size=0.25)
    jump = ta.solve(switching, torch.zeros(1, dtype=DT), t, method="rk4", step_size=0.25, jump_t=[1.3])
    assert float((plain.ys - truth).abs().max()) > 1e-2  # a step straddles the jump: first order there
    assert float((jump.ys - truth).abs().max()) < 1e-4  # the jump is a step boundary: rk4 error only
    back = torch.flip(t, [0])
    rev = ta.solve(switching, truth[-1], back, rtol=1e-8, atol=1e-10, jump_t=[1.3])
    assert float((rev.ys - torch.flip(truth, [0])).abs().max()) < 1e-7


@pytest.mark.parametrize("gradient", ["direct", "backsolve", "checkpointed", "quadrature"])
@pytest.mark.parametrize("method, options", [("rk4", dict(step_size=0.1)), ("bosh3", dict(rtol=1e-5, atol=1e-6))])
def test_float32_jump_t_evaluates_f_past_the_jump(method, options, gradient):
    """f sees times in the state's dtype: the stage just past a float32 jump_t must be a
    float32 number past it (a float64 neighbour rounded back onto the jump, so f = θ·[t > s]
    was evaluated on the wrong side and a whole step lost its θ: 0.6 for 0.7, dL/dθ alike)."""
    F = torch.float32
    s = float(torch.tensor(0.3, dtype=F))
    theta = torch.tensor(1.0, dtype=F, requires_grad=True)

    def f(t, y):
        return theta * torch.ones_like(y) if t > s else torch.zeros_like(y)

    gradient = dict(direct=ta.Direct(), backsolve=ta.Backsolve(), checkpointed=ta.Checkpointed(),
                    quadrature=ta.Quadrature())[gradient]
    sol = ta.solve(f, torch.zeros(1, dtype=F), torch.tensor([0.0, 1.0], dtype=F), method=method, gradient=gradient,
                   params=[theta], jump_t=torch.tensor([s], dtype=F), **options)
    sol.ys[-1].sum().backward()
    assert abs(float(sol.ys[-1]) - (1 - s)) < 1e-6, float(sol.ys[-1])
    assert abs(float(theta.grad) - (1 - s)) < 1e-6, float(theta.grad)  # y(1) = θ (1 - s)


# --- direction, dtype, interpolation, outputs ---------------------------------------

def test_decreasing_time():
    t = torch.linspace(2.0, -1.0, 7, dtype=DT)
    sol = ta.solve(linear, Y0, t, rtol=1e-9, atol=1e-11)
    expected = torch.stack([Y0 @ torch.linalg.matrix_exp(A * float(s - 2.0)).T for s in t])
    assert float((sol.ys - expected).abs().max()) < 1e-8
    # Time-dependent field backwards: undoes the forward solve.
    f = lambda s, y: torch.stack([torch.cos(3 * s) * y[1], -torch.sin(s) * y[0]])  # noqa: E731
    forward = ta.solve(f, torch.tensor([1.0, 0.0], dtype=DT), torch.tensor([0.0, 4.0], dtype=DT), rtol=1e-10, atol=1e-12)
    backward = ta.solve(f, forward.ys[-1], torch.tensor([4.0, 0.0], dtype=DT), rtol=1e-10, atol=1e-12)
    assert torch.allclose(backward.ys[-1], torch.tensor([1.0, 0.0], dtype=DT), atol=1e-8)


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "dopri8", "bosh3", "rk4"])
def test_float32_and_float64(method):
    t64 = torch.linspace(0.0, 2.0, 5, dtype=DT)
    step = dict(step_size=0.01) if method == "rk4" else {}
    s32 = ta.solve(lambda s, y: y @ A.float().T, Y0.float(), t64.float(), method=method, rtol=1e-5, atol=1e-6, **step)
    s64 = ta.solve(linear, Y0, t64, method=method, rtol=1e-10, atol=1e-12, **step)
    truth = exact(t64)
    assert s32.ys.dtype == torch.float32 and s64.ys.dtype == torch.float64
    assert float((s32.ys.double() - truth).abs().max()) < 1e-4
    assert float((s64.ys - truth).abs().max()) < 1e-8
    # float64 state with float32 times works too (times are host floats inside).
    mixed = ta.solve(linear, Y0, t64.float(), method=method, rtol=1e-10, atol=1e-12, **step)
    assert mixed.ys.dtype == torch.float64


def test_linear_interpolation_option():
    t = torch.linspace(0.0, 2.0, 41, dtype=DT)
    dense = ta.solve(linear, Y0, t, rtol=1e-4, atol=1e-6)
    lin = ta.solve(linear, Y0, t, rtol=1e-4, atol=1e-6, interpolation="linear")
    truth = exact(t)
    assert dense.stats["forward"]["accepted"] == lin.stats["forward"]["accepted"]  # same steps
    assert torch.equal(lin.ys[-1], dense.ys[-1])  # step ends agree
    assert float((lin.ys - truth).abs().max()) > 10 * float((dense.ys - truth).abs().max())


def test_outputs_at_start_and_single_time():
    sol = ta.solve(linear, Y0, torch.tensor([0.5], dtype=DT))
    assert torch.equal(sol.ys, Y0[None]) and sol.stats["forward"]["nfe"] == 0
    t = torch.linspace(0.0, 1.0, 3, dtype=DT)
    sol = ta.solve(linear, Y0, t)
    assert torch.equal(sol.ys[0], Y0)


def test_many_output_times_do_not_change_the_steps():
    few = ta.solve(linear, Y0, torch.tensor([0.0, 5.0], dtype=DT), rtol=1e-6, atol=1e-8)
    many = ta.solve(linear, Y0, torch.linspace(0.0, 5.0, 1000, dtype=DT), rtol=1e-6, atol=1e-8)
    assert many.stats["forward"]["accepted"] == few.stats["forward"]["accepted"]
    assert float((many.ys - exact(torch.linspace(0.0, 5.0, 1000, dtype=DT))).abs().max()) < 1e-5


def test_grid_constructor_for_fixed_step():
    t = torch.tensor([0.0, 1.0], dtype=DT)
    grid = lambda y0, ts: torch.tensor([0.0, 0.1, 0.5, 1.0], dtype=DT)  # noqa: E731
    _, steps = accepted_steps(linear, Y0, t, method="rk4", grid_constructor=grid)
    assert [t1 for _, t1, _ in steps] == [0.1, 0.5, 1.0]


def test_stats():
    f = Counted(van_der_pol)
    sol = ta.solve(f, torch.tensor([2.0, 0.0], dtype=DT), torch.linspace(0.0, 10.0, 11, dtype=DT), rtol=1e-6, atol=1e-8)
    stats = sol.stats["forward"]
    assert set(stats) >= {"nfe", "steps", "accepted", "rejected"}
    assert stats["nfe"] == len(f.times)
    assert stats["steps"] == stats["accepted"] + stats["rejected"] and stats["rejected"] > 0
    # dopri5: f0 + the initial-step probe + 6 per attempted step (FSAL).
    assert stats["nfe"] == 2 + 6 * stats["steps"]
    assert sol.stats["backward"] is None
    assert "forward=" in repr(sol)
    fixed = ta.solve(f, torch.tensor([2.0, 0.0], dtype=DT), torch.tensor([0.0, 1.0], dtype=DT), method="rk4", step_size=0.1)
    # rk4 (4 stages, not FSAL), 10 steps: 4 evaluations per step, the first at the step's
    # start (f0 for the first step); none after the last step, which ends on the last output.
    assert fixed.stats["forward"] == dict(nfe=4 * 10, steps=10, accepted=10, rejected=0)
    # An output on a jump_t: the step after it starts from f just past the jump, and nothing
    # evaluates f at the output on the near side (y1 is the output): still 4 per step.
    jumped = ta.solve(f, torch.tensor([2.0, 0.0], dtype=DT), torch.tensor([0.0, 0.5, 1.0], dtype=DT), method="rk4",
                      step_size=0.1, jump_t=torch.tensor([0.5], dtype=DT))
    assert jumped.stats["forward"] == dict(nfe=4 * 10, steps=10, accepted=10, rejected=0)

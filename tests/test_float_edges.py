"""The solver at the edges of floating point: large time offsets, float16/bfloat16,
tolerances below a dtype's precision, solves that would run unbounded, intervals whose
length overflows, and torch.func transforms. Each case returns a result within its
tolerance or raises the documented error (docs/robustness.md); none grinds.

Oracles: closed forms (exp, rotation) and torch.linalg.matrix_exp in float64.
"""
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchadjoint as ta
from torchadjoint.integrate import TimeFrame
from torchadjoint.options import DEFAULT_MAX_NUM_STEPS, SolverOptions

F64 = torch.float64


def decay(t, y):
    return -y


def rotation(w):
    """dy/dt = [[0, w], [-w, 0]] y: y(s) = (cos ws, -sin ws) from (1, 0)."""
    a = torch.tensor([[0.0, w], [-w, 0.0]], dtype=F64)

    def f(t, y):
        return y @ a.T.to(y.dtype)

    return f


def times(t0, length):
    return torch.tensor([t0, t0 + length], dtype=F64)


# --- 1. large time offsets -------------------------------------------------------


def test_short_interval_far_from_zero_is_stepped_and_error_checked():
    # Once a single step over the whole interval, accepted unchecked: 1.6e9 for e^-100.
    t = times(1e16, 100.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ta.TimeResolutionWarning)
        sol = ta.solve(decay, torch.ones(1, dtype=F64), t, rtol=1e-8, atol=1e-12)
    exact = math.exp(-(t[1] - t[0]).item())
    assert abs(sol.ys[-1].item() - exact) <= 1e-6 * exact + 1e-11
    assert sol.stats["forward"]["accepted"] > 10


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("t0", [1e6, 1e12])
def test_fast_dynamics_over_a_short_interval_at_a_large_offset(t0, dtype):
    # Frequency 1e4 over 0.005: at t0 = 1e12 once -2.6e7 for about 0.98; at t0 = 1e6 in
    # float32 once a false "step size underflow".
    t = times(t0, 0.005)
    length = (t[1] - t[0]).item()  # the interval the float64 times really describe
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ta.TimeResolutionWarning)
        sol = ta.solve(rotation(1e4), torch.tensor([1.0, 0.0], dtype=dtype), t)
    exact = torch.tensor([math.cos(1e4 * length), -math.sin(1e4 * length)], dtype=F64)
    tol = 1e-5 if dtype == torch.float32 else 1e-6
    assert (sol.ys[-1].double() - exact).abs().max() <= tol


def test_unix_time_offsets_solve_like_offset_zero():
    # t0 = 1.7e9 (Unix time), frequency 100, float32: once a false underflow.
    t0, length = 1.7e9, 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ta.TimeResolutionWarning)
        far = ta.solve(rotation(100.0), torch.tensor([1.0, 0.0]), times(t0, length))
    near = ta.solve(rotation(100.0), torch.tensor([1.0, 0.0]), times(0.0, length))
    exact = torch.tensor([math.cos(100.0), -math.sin(100.0)], dtype=F64)
    assert (far.ys[-1].double() - exact).abs().max() <= 2e-4
    assert (near.ys[-1].double() - exact).abs().max() <= 2e-4


@pytest.mark.parametrize("offset", [1e3, 1e7, 1e9, 1e12])
def test_shifting_time_changes_nothing(offset):
    # A step of h labelled t + h (rounded) once drifted by half a spacing of t per step:
    # at t0 = 1e7, rtol 1e-10, an error of 7e-9 where t0 = 0 gives 2e-11.
    a = torch.tensor([[-0.5, 2.0], [-2.0, -0.5]], dtype=F64)
    f = lambda t, y: y @ a.T  # noqa: E731
    y0 = torch.tensor([1.0, -0.5], dtype=F64)
    t = torch.tensor([offset, offset + 0.4, offset + 1.0], dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ta.TimeResolutionWarning)
        shifted = ta.solve(f, y0, t, rtol=1e-10, atol=1e-13)
    exact = torch.stack([torch.linalg.matrix_exp(a * s) @ y0 for s in (t - t[0]).tolist()])
    assert (shifted.ys - exact).abs().max() <= 5e-11


def test_time_dependent_f_at_an_offset_the_dtype_cannot_express_is_warned():
    # f sees t in the state's dtype: float32 spaces times 128 apart near 1.7e9.
    def forcing(t, y):
        return torch.cos(100 * t).expand_as(y)

    with pytest.warns(ta.TimeResolutionWarning, match=r"float32.*128.*shift the time origin|float32.*128.*Shift"):
        ta.solve(forcing, torch.zeros(1), times(1.7e9, 1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ta.TimeResolutionWarning)
        ta.solve(forcing, torch.zeros(1), times(0.0, 1.0))  # near 0: no warning


def test_the_offset_clock_is_used_only_where_public_times_cannot_resolve_the_interval():
    assert TimeFrame(0.0, 10.0).origin == 0.0
    assert TimeFrame(-5.0, 5.0).origin == 0.0
    assert TimeFrame(1e12, 1e12 + 0.005).origin == 1e12
    assert TimeFrame(1e12 + 0.005, 1e12).origin == 1e12  # backward: the end nearer 0


@pytest.mark.parametrize("gradient", [ta.Backsolve(), ta.Quadrature(), ta.Direct()], ids=type)
def test_backward_passes_at_a_large_offset(gradient):
    # dL/dy0 of y(t1) = y0 e^-(t1 - t0) at t0 = 1e12: the backward solves run through the
    # same loop, over the same short interval far from zero.
    t = times(1e12, 2.0)
    length = (t[1] - t[0]).item()
    y0 = torch.ones(1, dtype=F64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ta.TimeResolutionWarning)
        sol = ta.solve(decay, y0, t, gradient=gradient, rtol=1e-9, atol=1e-12)
        sol.ys[-1].sum().backward()
    assert abs(y0.grad.item() - math.exp(-length)) <= 1e-7


class _LinearModule(torch.nn.Module):
    """dy/dt = A y with A a parameter (2, 2)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor([[-0.3, 1.0], [-1.0, -0.2]], dtype=F64))

    def forward(self, t, y):
        return y @ self.a.T


@pytest.mark.parametrize("gradient", [ta.Backsolve(), ta.Quadrature(), ta.Direct()], ids=type)
def test_parameter_gradients_at_a_large_offset_use_the_exact_step(gradient):
    # dL/dA at t0 = 1e12, where public times are 1.2e-4 apart: the parameter adjoint must be
    # accumulated with each step's exact length, not with the difference of its rounded ends
    # (Backsolve's and Quadrature's were off by 5e-6..8e-6 relative that way).
    t = 1e12 + torch.linspace(0.0, 2.0, 5, dtype=F64)
    weights = torch.linspace(-1.0, 1.0, 5 * 2, dtype=F64).reshape(5, 2)
    func = _LinearModule()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ta.TimeResolutionWarning)
        sol = ta.solve(func, torch.tensor([1.0, 0.5], dtype=F64), t, gradient=gradient, rtol=1e-10, atol=1e-12)
    (sol.ys * weights).sum().backward()
    a = func.a.detach().clone().requires_grad_(True)
    exact = torch.stack([torch.linalg.matrix_exp(a * (s - t[0])) @ torch.tensor([1.0, 0.5], dtype=F64) for s in t])
    (exact * weights).sum().backward()
    torch.testing.assert_close(func.a.grad, a.grad, rtol=1e-8, atol=1e-10)


def test_checkpointed_at_an_offset_the_dtype_cannot_express_is_warned_even_for_an_autonomous_f():
    # Its backward reads y(t) off the stored steps at rounded public times: the warning says so.
    with pytest.warns(ta.TimeResolutionWarning, match="Checkpointed's gradient is off even for an f that ignores t"):
        ta.solve(_LinearModule(), torch.ones(2, dtype=F64), 1e12 + torch.linspace(0.0, 2.0, 5, dtype=F64),
                 gradient=ta.Checkpointed())
    with pytest.warns(ta.TimeResolutionWarning) as caught:
        ta.solve(_LinearModule(), torch.ones(2, dtype=F64), 1e12 + torch.linspace(0.0, 2.0, 5, dtype=F64))
    assert "Checkpointed" not in str(caught[0].message)


# --- 2. float16 and bfloat16 ------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_states_are_integrated_in_float32(dtype):
    # Once stalled at y0: [1.0, 2.0]-like results after thousands of steps.
    t = torch.tensor([0.0, 0.5, 1.0], dtype=dtype)
    with pytest.warns(ta.ToleranceWarning, match=str(dtype).replace("torch.", "")):
        sol = ta.solve(decay, torch.ones(2, dtype=dtype), t, method="tsit5")
    assert sol.ys.dtype == dtype
    exact = torch.exp(-t.double())[:, None].expand(3, 2)
    eps = torch.finfo(dtype).eps
    assert (sol.ys.double() - exact).abs().max() <= 4 * eps
    assert sol.stats["forward"]["nfe"] < 100


@pytest.mark.parametrize("gradient", [ta.Backsolve(), ta.Checkpointed(), ta.Direct()], ids=type)
def test_half_precision_module_gradients(gradient):
    # f runs in float16 as it is; gradients reach y0 and the parameters in their dtype.
    torch.manual_seed(0)
    module = torch.nn.Linear(2, 2).half()
    y0 = torch.tensor([1.0, 0.5], dtype=torch.float16, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ta.ToleranceWarning)
        sol = ta.solve(lambda t, y: module(y), y0, t, gradient=gradient, params=list(module.parameters()))
    sol.ys[-1].sum().backward()
    # The same program in float64, autograd through its steps.
    ref = torch.nn.Linear(2, 2).double()
    ref.load_state_dict({k: v.double() for k, v in module.state_dict().items()})
    y64 = y0.detach().double().requires_grad_()
    ta.solve(lambda t, y: ref(y), y64, t.double(), gradient=ta.Direct()).ys[-1].sum().backward()
    assert y0.grad.dtype == module.weight.grad.dtype == torch.float16
    assert (y0.grad.double() - y64.grad).abs().max() <= 2e-3
    assert (module.weight.grad.double() - ref.weight.grad).abs().max() <= 2e-3


def test_half_precision_fixed_step_does_not_stall():
    # Steps of 1e-3 add less than half a float16 spacing of 1: in float16 y would not move.
    t = torch.tensor([0.0, 1.0], dtype=torch.float16)
    sol = ta.solve(decay, torch.ones(1, dtype=torch.float16), t, method="rk4", step_size=1e-3)
    assert abs(sol.ys[-1].item() - math.exp(-1)) <= 1e-3


# --- 3. tolerances below the dtype's precision -------------------------------------


@pytest.mark.parametrize("method, evaluations", [("dopri8", 20_000), ("dopri5", 20_000)])
def test_rtol_below_float32_precision_is_raised_to_it_with_a_warning(method, evaluations):
    # float32, rtol 1e-12: once 17.3 million evaluations (dopri8) for an error of 3.7e-3.
    a = torch.tensor([[-0.1, 1.0], [-1.0, -0.1]], dtype=F64)
    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    with pytest.warns(ta.ToleranceWarning, match=r"rtol=1e-12.*float32.*Using rtol=5.96e-08"):
        sol = ta.solve(lambda t, y: y @ a.T.float(), y0.float(), torch.tensor([0.0, 10.0]), method=method, rtol=1e-12, atol=1e-14)
    exact = torch.linalg.matrix_exp(10 * a) @ y0
    assert (sol.ys[-1].double() - exact).abs().max() <= 2e-6
    assert sol.stats["forward"]["nfe"] <= evaluations


def test_rtol_clamping_leaves_zero_and_meaningful_tolerances_alone():
    with warnings.catch_warnings():
        warnings.simplefilter("error", ta.ToleranceWarning)
        ta.solve(decay, torch.ones(2), torch.tensor([0.0, 1.0]))  # the default 1e-7 is meaningful in float32
        ta.solve(decay, torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0]), rtol=0.0, atol=1e-8)
    with pytest.warns(ta.ToleranceWarning, match="float64"):
        ta.solve(decay, torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0]), rtol=torch.tensor([1e-20, 1e-6]))


# --- 4. solves that would run unbounded --------------------------------------------


def test_the_default_step_budget_is_bounded():
    assert SolverOptions.build().max_num_steps == DEFAULT_MAX_NUM_STEPS <= 1_000_000


def test_an_astronomically_long_interval_stops_saying_stiff_with_the_time_reached():
    # dy/dt = -y over [0, 1e300]: steps pinned by dopri5's stability limit, forever.
    t = torch.tensor([0.0, 1e300], dtype=F64)
    with pytest.raises(ta.SolveError, match=r"max_num_steps=2000.*looks stiff.*implicit") as info:
        ta.solve(decay, torch.ones(1, dtype=F64), t, max_num_steps=2000)
    assert 100 < info.value.t < 1e5
    assert "more steps" in str(info.value)


def test_a_hopeless_stiff_solve_stops_early_under_the_default_budget():
    # Under the default 100 000 steps this once ran for hours; waiting for the budget would
    # still take a minute. Pinned by stability at a pace needing 1e299 steps, it stops at
    # the first pace check (1024 accepted steps).
    with pytest.raises(ta.SolveError, match=r"stopped after .* max_num_steps=100000 \(the default\).*looks stiff") as info:
        ta.solve(decay, torch.ones(1, dtype=F64), torch.tensor([0.0, 1e300], dtype=F64))
    assert 1000 < info.value.t < 1e4


def test_a_stiff_solve_that_fits_its_budget_is_not_stopped_early():
    # |λ| = 1e4 over [0, 1]: pinned by stability at h ≈ 3.3e-4, about 3000 steps: it finishes.
    sol = ta.solve(lambda t, y: -1e4 * (y - torch.cos(t)), torch.zeros(1, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64))
    assert sol.stats["forward"]["accepted"] > 2048
    assert abs(sol.ys[-1].item() - math.cos(1.0)) <= 1e-3


def test_a_stiff_system_under_an_explicit_method_is_named_stiff():
    a = torch.tensor([[-1e5, 0.0], [1.0, -1.0]], dtype=F64)
    with pytest.raises(ta.SolveError, match="looks stiff") as info:
        ta.solve(lambda t, y: y @ a.T, torch.ones(2, dtype=F64), torch.tensor([0.0, 100.0], dtype=F64), max_num_steps=500)
    assert 0 < info.value.t < 100


def test_a_long_accurate_solve_is_not_called_stiff():
    with pytest.raises(ta.SolveError, match="raise max_num_steps, loosen rtol/atol") as info:
        ta.solve(rotation(1.0), torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([0.0, 1e4], dtype=F64), max_num_steps=300)
    assert "stiff" not in str(info.value)


def test_landings_of_the_backward_pass_do_not_count_against_max_num_steps():
    # 400 output times each get a landing in the backward pass; max_num_steps bounds the rest.
    t = torch.linspace(0, 1, 400, dtype=F64)
    y0 = torch.ones(1, dtype=F64, requires_grad=True)
    sol = ta.solve(decay, y0, t, max_num_steps=50)
    sol.ys.sum().backward()
    assert sol.stats["backward"]["steps"] >= 399
    assert abs(y0.grad.item() - torch.exp(-t).sum().item()) <= 1e-5


# --- 5. intervals whose length overflows ---------------------------------------------


def test_an_interval_whose_length_overflows_is_named_as_such():
    with pytest.raises(ValueError, match=r"t: .*overflows"):
        ta.solve(decay, torch.ones(1, dtype=F64), torch.tensor([-1e308, 1e308], dtype=F64))


def test_the_widest_finite_interval_is_measured_and_stops_for_its_real_cause():
    # [0, 1e308] has a finite length: it runs, and stops (bounded) because it is stiff.
    with pytest.raises(ta.SolveError, match="looks stiff"):
        ta.solve(decay, torch.ones(1, dtype=F64), torch.tensor([0.0, 1e308], dtype=F64), max_num_steps=1000)


# --- 6. torch.func ------------------------------------------------------------------


def _final_sum(y0, gradient):
    return ta.solve(decay, y0, torch.tensor([0.0, 1.0], dtype=F64), gradient=gradient).ys[-1].sum()


def test_torch_func_grad_and_jvp_over_direct():
    y0 = torch.ones(2, dtype=F64)
    g = torch.func.grad(lambda y: _final_sum(y, ta.Direct()))(y0)
    assert torch.allclose(g, torch.full_like(g, math.exp(-1)), atol=1e-6)
    _, tangent = torch.func.jvp(lambda y: _final_sum(y, ta.Direct()), (y0,), (torch.ones_like(y0),))
    assert abs(tangent.item() - 2 * math.exp(-1)) <= 1e-6


@pytest.mark.parametrize("gradient", [ta.Backsolve(), ta.Checkpointed(), ta.Quadrature(), None], ids=repr)
def test_torch_func_grad_over_an_adjoint_names_what_works(gradient):
    with pytest.raises(NotImplementedError, match=r"Direct\(\).*backward\(\)"):
        torch.func.grad(lambda y: _final_sum(y, gradient))(torch.ones(2, dtype=F64))


@pytest.mark.parametrize("gradient", [ta.Backsolve(), ta.Direct()], ids=type)
def test_vmap_names_the_batched_state_instead(gradient):
    with pytest.raises(NotImplementedError, match=r"vmap.*batch dimension"):
        torch.func.vmap(lambda y: _final_sum(y, gradient))(torch.ones(3, 2, dtype=F64))


# --- the property: every solve meets its tolerance or raises a documented error -----

A = torch.tensor([[-0.5, 2.0], [-2.0, -0.5]], dtype=F64)
Y0 = torch.tensor([1.0, -0.5], dtype=F64)
STEPS = 2000  # the step budget each drawn solve runs under


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, F64], ids=str)
@settings(max_examples=max(10, settings().max_examples // 20))
@given(
    offset=st.one_of(st.just(0.0), st.floats(0.0, 12.0).map(lambda e: 10.0**e)),  # log-uniform up to 1e12
    sign=st.sampled_from([1.0, -1.0]),
    length=st.floats(-3.0, 1.0).map(lambda e: 10.0**e),
    rtol=st.floats(-13.0, -3.0).map(lambda e: 10.0**e),
    method=st.sampled_from(["dopri5", "tsit5", "bosh3"]),
)
def test_every_solve_meets_its_tolerance_or_says_why(offset, sign, length, dtype, rtol, method):
    t = torch.tensor([offset, offset + 0.4 * sign * length, offset + sign * length], dtype=F64)
    if len(set(t.tolist())) < 3:
        return  # the length is below the spacing of float64 at this offset: not an interval
    atol = 1e-3 * rtol
    f = lambda t, y: y @ A.T.to(y.dtype)  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            sol = ta.solve(f, Y0.to(dtype), t, method=method, rtol=rtol, atol=atol, max_num_steps=STEPS)
        except ta.SolveError as error:
            # The one documented way out here: more steps than the budget (tight tolerances
            # in float64 with a low-order method), said with the time reached.
            assert f"max_num_steps={STEPS}" in str(error) and error.t != t[0].item()
            return
    clamped = [w for w in caught if issubclass(w.category, ta.ToleranceWarning)]
    # The tolerance actually used: raised to the precision of the state's dtype.
    rtol_used = max(rtol, torch.finfo(dtype).eps / 2)
    assert bool(clamped) == (rtol_used > rtol)
    spans = (t - t[0]).tolist()  # the intervals the float64 times describe
    exact = torch.stack([torch.linalg.matrix_exp(A * s) @ Y0 for s in spans])
    # Local tolerance, grown at most linearly over the interval, plus rounding to dtype;
    # relative to the solution's size (backwards in time it grows by up to e^5).
    size = exact.abs().max().item()
    bound = (30 * rtol_used * (1 + length) + 2 * torch.finfo(dtype).eps) * size + 30 * atol * (1 + length)
    error = (sol.ys.double() - exact).abs().max().item()
    assert error <= bound, f"error {error:.3g} > bound {bound:.3g}"
    assert sol.stats["forward"]["steps"] <= STEPS + 1
    assert sol.stats["forward"]["nfe"] <= 7 * (sol.stats["forward"]["steps"] + 1)


def test_checkpoint_replay_far_from_zero_names_the_offset_not_determinism():
    """Direct(checkpoints=K) replays segments from stored times; far from t = 0 that cannot
    be bitwise. The error says so and how to shift time, not that f is non-deterministic."""
    w = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1e12, 1e12 + 0.5], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ta.TimeResolutionWarning)
        sol = ta.solve(lambda t, y: -w * y, y0, t, gradient=ta.Direct(checkpoints=2), params=[w],
                       rtol=1e-8, atol=1e-10)
    with pytest.raises(RuntimeError, match="so far from t = 0") as err:
        sol.ys[-1].sum().backward()
    assert "t - t[0]" in str(err.value) and "not deterministic" not in str(err.value)

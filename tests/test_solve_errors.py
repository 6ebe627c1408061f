"""Bad input raises ValueError/TypeError naming the argument; a solve that cannot go on
raises SolveError carrying the time reached and the reason."""
import math

import pytest
import torch

import torchadjoint as ta

DT = torch.float64
Y0 = torch.ones(2, dtype=DT)
T = torch.linspace(0.0, 1.0, 5, dtype=DT)


def decay(t, y):
    return -y


def call(**overrides):
    args = dict(func=decay, y0=Y0, t=T)
    args.update(overrides)
    func, y0, t = args.pop("func"), args.pop("y0"), args.pop("t")
    return ta.solve(func, y0, t, **args)


BAD_INPUT = [
    # output times
    (dict(t=torch.tensor([0.0, 1.0, 0.5], dtype=DT)), ValueError, r"^t must be strictly increasing or strictly decreasing; it changes direction"),
    (dict(t=torch.tensor([0.0, 1.0, 1.0], dtype=DT)), ValueError, r"^t must be strictly .* repeats at index 2"),
    (dict(t=torch.zeros(2, 3, dtype=DT)), ValueError, r"^t must be 1-D, got shape \(2, 3\)"),
    (dict(t=torch.tensor(1.0, dtype=DT)), ValueError, r"^t must be 1-D, got shape \(\)"),
    (dict(t=torch.arange(3)), TypeError, r"^t must have a floating-point dtype, got torch.int64"),
    (dict(t=[0.0, 1.0]), TypeError, r"^t must be a 1-D torch.Tensor"),
    (dict(t=torch.tensor([0.0, math.nan], dtype=DT)), ValueError, r"^t must contain finite times"),
    (dict(t=torch.tensor([], dtype=DT)), ValueError, r"^t is empty"),
    # state
    (dict(y0=torch.ones(2, dtype=torch.int64)), TypeError, r"^y0 must be a floating-point tensor, got dtype torch.int64"),
    (dict(y0=torch.ones(2, dtype=torch.complex64)), TypeError, r"^y0 must be a floating-point tensor"),
    (dict(y0=[1.0, 2.0]), TypeError, r"^y0\[0\] must be a torch.Tensor"),
    (dict(y0=(torch.ones(2), torch.ones(2, dtype=DT))), TypeError, r"^all tensors of y0 must share one dtype"),
    (dict(y0=torch.tensor([math.nan], dtype=DT)), ValueError, r"^y0 contains NaN or inf"),
    (dict(y0=torch.ones(0, dtype=DT)), ValueError, r"^y0 has a tensor with no elements"),
    (dict(y0=()), TypeError, r"^y0 is an empty tuple"),
    # tolerances
    (dict(rtol=-1e-3), ValueError, r"^rtol must be a finite non-negative number, got -0.001"),
    (dict(atol=-1.0), ValueError, r"^atol must be a finite non-negative number"),
    (dict(atol=torch.tensor([1e-6, -1e-6], dtype=DT)), ValueError, r"^atol must be non-negative"),
    (dict(rtol=math.nan), ValueError, r"^rtol must be a finite non-negative number, got nan"),
    (dict(rtol="1e-3"), TypeError, r"^rtol must be a float"),
    (dict(rtol=True), TypeError, r"^rtol must be a float"),
    (dict(atol=torch.tensor([1, 2])), TypeError, r"^atol must be a float or a floating-point tensor"),
    (dict(rtol=0.0, atol=0.0), ValueError, r"^rtol and atol cannot both be zero"),
    (dict(atol=torch.ones(3, dtype=DT)), ValueError, r"^atol of shape \(3,\) does not broadcast to the state's shape"),
    (dict(y0=(Y0, Y0), rtol=(1e-3,)), ValueError, r"^rtol has 1 components but the state has 2 tensors"),
    (dict(y0={"a": Y0}, atol={"b": 1e-3}), ValueError, r"^atol is a dict but its keys do not match"),
    # method and options
    (dict(method="rk45"), ValueError, r"^method='rk45' is not a known method; choose from \[.*'dopri5'"),
    (dict(method=5), TypeError, r"^method must be a method name"),
    (dict(rtoll=1e-3), TypeError, r"unknown option\(s\) \['rtoll'\]; valid options are"),
    (dict(options={"step_size": 0.1}), TypeError, r"unknown option\(s\) \['options'\]"),
    (dict(step_size=0.1), ValueError, r"^step_size/grid_constructor apply to fixed-step methods, but method='dopri5'"),
    (dict(method="rk4"), ValueError, r"^method='rk4' has a fixed step: pass step_size"),
    (dict(method="rk4", step_size=-0.1), ValueError, r"^step_size must be positive"),
    (dict(method="rk4", step_size=math.inf), ValueError, r"^step_size must be positive and finite"),
    (dict(method="rk4", grid_constructor=lambda y, t: torch.tensor([0.0, 0.5])), ValueError, r"^grid_constructor must return"),
    (dict(method="rk4", grid_constructor=3), TypeError, r"^grid_constructor must be callable"),
    (dict(first_step=-0.1), ValueError, r"^first_step must be positive"),
    (dict(first_step=0.0), ValueError, r"^first_step must be positive"),
    (dict(first_step="big"), TypeError, r"^first_step must be a number"),
    (dict(min_step=-1.0), ValueError, r"^min_step must be non-negative"),
    (dict(max_step=0.0), ValueError, r"^max_step must be positive"),
    (dict(min_step=0.5, max_step=0.1), ValueError, r"^min_step=0.5 is larger than max_step=0.1"),
    (dict(max_num_steps=0), ValueError, r"^max_num_steps must be a positive integer, got 0"),
    (dict(max_num_steps=10.5), ValueError, r"^max_num_steps must be a positive integer, got 10.5"),
    (dict(safety=1.5), ValueError, r"^safety must be in \(0, 1\]"),
    (dict(safety=0.0), ValueError, r"^safety must be positive"),
    (dict(ifactor=0.5), ValueError, r"^ifactor .* must be >= 1"),
    (dict(dfactor=1.5), ValueError, r"^dfactor .* must be in \(0, 1\)"),
    (dict(pcoeff=math.nan), ValueError, r"^pcoeff must be a finite number"),
    (dict(icoeff="a"), TypeError, r"^icoeff must be a number"),
    (dict(interpolation="cubic"), ValueError, r"^interpolation must be 'dense', 'linear' or 'land', got 'cubic'"),
    (dict(step_t=[2.0]), ValueError, r"^step_t has times \[2.0\] outside the solve's interval \[0, 1\]"),
    (dict(jump_t=torch.ones(2, 2)), ValueError, r"^jump_t must be 1-D"),
    (dict(jump_t="abc"), TypeError, r"^jump_t must be a 1-D tensor or sequence of times"),
    (dict(jump_t=[math.inf]), ValueError, r"^jump_t must contain finite times"),
    (dict(norm=3), TypeError, r"^norm must be a callable"),
    (dict(func=3), TypeError, r"^func must be callable"),
    (dict(gradient="backsolve"), TypeError, r"^gradient must be a gradient method"),
    (dict(params=[1.0]), TypeError, r"^params\[0\] must be a torch.Tensor"),
    # what f returns
    (dict(func=lambda t, y: torch.ones(3, dtype=DT)), TypeError, r"^f\(t, y\) at t=0 returned a tensor of shape \(3,\).*shapes \(2,\), dtype torch.float64"),
    (dict(func=lambda t, y: y.float()), TypeError, r"^f\(t, y\) at t=0 returned a tensor of shape \(2,\) and dtype torch.float32"),
    (dict(func=lambda t, y: None), TypeError, r"^f\(t, y\) at t=0 returned NoneType"),
    (dict(func=lambda t, y: (y[0], y[0]), y0=(Y0, torch.ones(3, dtype=DT))), TypeError, r"^f\(t, y\) at t=0 returned a tuple of 2 entries.*\(2,\), \(3,\)"),
    (dict(func=lambda t, y: {"b": y["a"]}, y0={"a": Y0}), TypeError, r"^f\(t, y\) at t=0 returned a dict"),
]


@pytest.mark.parametrize("overrides, error, message", BAD_INPUT, ids=[f"{i}-{list(c[0])[0]}" for i, c in enumerate(BAD_INPUT)])
def test_bad_input(overrides, error, message):
    with pytest.raises(error, match=message):
        call(**overrides)


def test_bad_output_detected_later_in_the_solve():
    # f misbehaves only after t = 0.5: the check runs on every call, not just the first.
    def func(t, y):
        return -y if t < 0.5 else torch.ones(3, dtype=DT)

    with pytest.raises(TypeError, match=r"^f\(t, y\) at t=0.5"):
        call(func=func)


# --- a solve that cannot go on -------------------------------------------------------

def test_blow_up_is_step_size_underflow():
    # y' = y², y(0) = 1 blows up at t = 1.
    with pytest.raises(ta.SolveError) as info:
        ta.solve(lambda t, y: y**2, torch.ones(1, dtype=DT), torch.tensor([0.0, 2.0], dtype=DT))
    err = info.value
    assert err.t == pytest.approx(1.0, abs=1e-6) and err.t < 1.0 + 1e-6
    assert "step size underflow" in err.reason and err.direction == "forward"
    assert f"t={err.t:.10g}" in str(err)


def test_blow_up_backwards_in_time():
    with pytest.raises(ta.SolveError) as info:
        ta.solve(lambda t, y: -(y**2), torch.ones(1, dtype=DT), torch.tensor([0.0, -2.0], dtype=DT))
    assert info.value.t == pytest.approx(-1.0, abs=1e-6)


def test_blow_up_float32():
    with pytest.raises(ta.SolveError) as info:
        ta.solve(lambda t, y: y**2, torch.ones(1), torch.tensor([0.0, 2.0]), rtol=1e-5, atol=1e-6)
    assert info.value.t == pytest.approx(1.0, abs=1e-3)


def test_max_num_steps_exceeded():
    calls = []

    def func(t, y):
        calls.append(float(t))
        return -y

    with pytest.raises(ta.SolveError) as info:
        ta.solve(func, Y0, torch.tensor([0.0, 2.0], dtype=DT), max_num_steps=3)
    err = info.value
    assert "max_num_steps=3 exceeded" in err.reason
    assert 0.0 < err.t < 2.0 and err.t in calls  # the end of an accepted step

    with pytest.raises(ta.SolveError, match="max_num_steps=10") as info:
        ta.solve(decay, Y0, torch.tensor([0.0, 2.0], dtype=DT), method="euler", step_size=0.01, max_num_steps=10)
    assert info.value.t == pytest.approx(0.1)
    # Enough steps: no error, and the limit is on steps, so one more would be too many.
    sol = ta.solve(decay, Y0, torch.tensor([0.0, 2.0], dtype=DT), method="euler", step_size=0.01, max_num_steps=200)
    assert sol.stats["forward"]["steps"] == 200


def nan_after_half(t, y):
    return torch.where(t > 0.5, torch.full_like(y, math.nan), -y)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_state_adaptive(bad):
    def func(t, y):
        return -y if t <= 0.5 else y * bad

    with pytest.raises(ta.SolveError) as info:
        ta.solve(func, Y0, torch.tensor([0.0, 2.0], dtype=DT))
    err = info.value
    assert err.t == pytest.approx(0.5, abs=1e-9) and err.t <= 0.5
    assert "non-finite" in err.reason


def test_non_finite_at_min_step():
    with pytest.raises(ta.SolveError, match="even at min_step") as info:
        ta.solve(nan_after_half, Y0, torch.tensor([0.0, 2.0], dtype=DT), min_step=1e-3)
    assert 0.49 <= info.value.t <= 0.5


def test_non_finite_initial_derivative():
    with pytest.raises(ta.SolveError, match="at the initial state") as info:
        ta.solve(lambda t, y: y * math.nan, Y0, T)
    assert info.value.t == 0.0


def test_non_finite_state_fixed_step():
    # Fixed-step solves are not checked per step; the error brackets the time by outputs.
    t = torch.linspace(0.0, 2.0, 5, dtype=DT)
    with pytest.raises(ta.SolveError) as info:
        ta.solve(nan_after_half, Y0, t, method="rk4", step_size=0.1)
    err = info.value
    assert err.t == 0.5 and "between t=0.5 and t=1" in err.reason
    with pytest.raises(ta.SolveError) as info:
        ta.solve(lambda t, y: y**2, torch.ones(1, dtype=DT), torch.tensor([0.0, 2.0], dtype=DT), method="euler", step_size=0.01)
    assert info.value.t == 0.0 and "between t=0 and t=2" in info.value.reason


def test_solve_error_is_a_runtime_error_with_fields():
    err = ta.SolveError(0.25, "because", "backward")
    assert isinstance(err, RuntimeError)
    assert (err.t, err.reason, err.direction) == (0.25, "because", "backward")
    assert str(err) == "backward solve stopped at t=0.25: because"


@pytest.mark.parametrize("where", ["solve", "Backsolve", "Checkpointed", "Quadrature"])
@pytest.mark.parametrize("bad, got", [(lambda x: None, "None"), (lambda x: torch.ones(3), r"a tensor of shape \(3,\)"),
                                      (lambda x: "small", "a value of type str")])
def test_user_norm_must_return_one_number(where, bad, got):
    """Each place a norm is given names itself when its norm returns something else than one number."""
    rate = torch.tensor(0.5, dtype=DT, requires_grad=True)
    func = lambda t, y: -rate * y  # noqa: E731
    if where == "solve":
        kwargs, name = dict(norm=bad), "norm"
    else:
        kwargs, name = dict(gradient=getattr(ta, where)(norm=bad)), rf"{where}\(norm=...\)"
    with pytest.raises(TypeError, match=rf"^{name} returned {got}; an error norm must return one number"):
        sol = ta.solve(func, Y0, T, params=[rate], **kwargs)
        sol.ys.sum().backward()

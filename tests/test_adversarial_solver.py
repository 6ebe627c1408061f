"""Adversarial checks of the solver against independent references (closed forms, scipy
at rtol 1e-12, torchdiffeq): programs written as a user would, where a wrong number could
come back without a word."""
import math
import warnings

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

import torchadjoint as ta
from torchadjoint import odeint_event


def _pulse(t, y):
    """dy/dt = -0.1 y + a narrow pulse at t = 5 (width 0.1): smooth, then sudden."""
    return -0.1 * y + 20 * torch.exp(-((t - 5) / 0.1) ** 2)


def test_event_search_rejects_steps_whose_error_is_too_large():
    # The search's nominal end is t0 + 1e30; the step controller's rounding slack was
    # measured there (~1e16), so every rejected step counted as "stuck" and was accepted:
    # the long step over the pulse was kept and the event came out at 4.916 instead of 5.033.
    def pulse_np(t, y):
        return -0.1 * y + 20 * np.exp(-((t - 5) / 0.1) ** 2)

    def crossing(t, y):
        return y[0] - 3.0

    crossing.terminal = True
    ref = solve_ivp(pulse_np, (0.0, 20.0), [1.0], rtol=1e-12, atol=1e-12, events=crossing, max_step=0.01)
    t_ref = float(ref.t_events[0][0])
    t_event, _ = odeint_event(_pulse, torch.tensor([1.0], dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64),
                              event_fn=lambda t, y: y[0] - 3.0)
    assert abs(float(t_event) - t_ref) < 1e-6, (float(t_event), t_ref)


def test_event_search_with_a_too_large_first_step_rejects_it():
    # first_step=10 on y'' = -y: the first step must be rejected (torchdiffeq does); it was
    # accepted, and the event came out at 7.39 with the state [0, -1029].
    def f(t, y):
        return torch.stack([y[1], -y[0]])

    result = ta.solve_to_event(f, torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64),
                               lambda t, y: y[0], first_step=10.0, rtol=1e-7, atol=1e-9)
    assert result.stats["forward"]["rejected"] >= 1
    assert abs(float(result.t) - math.pi / 2) < 1e-6
    assert torch.allclose(result.y, torch.tensor([0.0, -1.0], dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_event_search_on_a_half_precision_state(dtype):
    # float16 searches were integrated in float16 and stopped at t0 with 'step size
    # underflow'; like solve(), they are now integrated in float32.
    def f(t, y):
        return torch.stack([y[1], -y[0]])

    y0 = torch.tensor([1.0, 0.0], dtype=dtype, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the ToleranceWarning raising rtol to the dtype's
        t_event, sol = odeint_event(f, y0, torch.tensor(0.0, dtype=torch.float64), event_fn=lambda t, y: y[0] - 0.5)
    assert sol.dtype == dtype
    assert abs(float(t_event) - math.pi / 3) < 1e-2
    (grad,) = torch.autograd.grad(t_event, y0)
    # y = (cos τ, -sin τ) scaled by y0[0]: τ = acos(0.5 / y0[0]), dτ/dy0[0] = 0.5 / (y0[0]² sin τ) = 1/√3.
    assert grad.dtype == dtype
    assert abs(float(grad[0]) - 1 / math.sqrt(3)) < 3e-2


def test_too_many_steps_with_an_implicit_method_is_a_solve_error():
    # The max_num_steps diagnosis computed the stability limit from the tableau's rows as
    # if they were explicit; an ESDIRK row includes its diagonal, and numpy raised
    # "could not broadcast input array from shape (2,) into shape (1,)" instead.
    A = torch.tensor([[-1000.0, 1.0], [0.0, -1.0]], dtype=torch.float64)
    with pytest.raises(ta.SolveError, match="max_num_steps=5"):
        ta.solve(lambda t, y: y @ A.T, torch.tensor([1.0, 2.0], dtype=torch.float64),
                 torch.tensor([0.0, 3.0], dtype=torch.float64), method="kvaerno3", max_num_steps=5)


@pytest.mark.parametrize("transform", ["grad", "vmap"])
def test_event_solve_under_torch_func_is_refused_clearly(transform):
    # These ended in torch's own RuntimeErrors (requires_grad_ inside a transform;
    # data-dependent control flow under vmap) that named nothing of the solve.
    def event_time(k):
        return odeint_event(lambda t, y: -k * y, torch.tensor([2.0], dtype=torch.float64),
                            torch.tensor(0.0, dtype=torch.float64), event_fn=lambda t, y: y[0] - 0.5)[0]

    k = torch.tensor([0.5, 1.0], dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="torch.func"):
        if transform == "grad":
            torch.func.grad(event_time)(k[0])
        else:
            torch.func.vmap(event_time)(k)

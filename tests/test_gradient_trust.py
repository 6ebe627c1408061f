"""Regression tests for gradients that were once silently wrong (issue 14; each found by
independent probing, and by the differential harness, tests/test_differential.py)."""
import math
import warnings

import pytest
import torch

import torchadjoint as ta
from torchadjoint import Backsolve, Checkpointed, Direct, Quadrature, SolveError, solve

D = torch.float64


@pytest.mark.parametrize("gradient", [Quadrature(), Quadrature(batching="loop"), Backsolve(), Checkpointed(), Direct()])
def test_dict_state_with_keys_returned_in_another_order(gradient):
    """Item 1: f returns the dict's keys in another order than y0 has them."""
    k = torch.tensor(0.7, dtype=D, requires_grad=True)
    f = lambda t, y: {"v": -k * y["x"], "x": y["v"]}
    y0 = {"x": torch.tensor([1.0], dtype=D), "v": torch.tensor([0.0], dtype=D)}
    solve(f, y0, torch.tensor([0.0, 2.0], dtype=D), gradient=gradient, params=[k], rtol=1e-10, atol=1e-10).ys["x"][-1].sum().backward()
    # x(T) = cos(√k T): d/dk = -sin(√k T) T / (2√k)
    want = -math.sin(math.sqrt(0.7) * 2) * 2 / (2 * math.sqrt(0.7))
    assert abs(float(k.grad) - want) < 1e-6


@pytest.mark.parametrize("gradient", [Checkpointed(), Backsolve(), Quadrature()])
def test_loss_scale_changes_neither_steps_nor_relative_error(gradient):
    """Item 2: W = [[0.5, 1], [-1, 0.5]], T = 40, loss log|y(T)|² (its gradient is small)."""
    W0 = torch.tensor([[0.5, 1.0], [-1.0, 0.5]], dtype=D)
    y0 = torch.tensor([1.0, 0.0], dtype=D)
    W = W0.clone().requires_grad_()
    exact = torch.autograd.grad(torch.log((torch.linalg.matrix_exp(W * 40.0) @ y0).pow(2).sum()), W)[0]
    results = []
    for c in (2.0**-27, 1.0, 2.0**27):
        W = W0.clone().requires_grad_()
        sol = solve(lambda t, y: W @ y, y0, torch.tensor([0.0, 40.0], dtype=D), gradient=gradient, params=[W], rtol=1e-6, atol=1e-8)
        with warnings.catch_warnings():  # the y-reversing methods see a drift of a few hundred x tol here
            warnings.simplefilter("ignore", ta.ReconstructionWarning)
            g = torch.autograd.grad(c * torch.log(sol.ys[-1].pow(2).sum()), W)[0] / c
        results.append((float((g - exact).norm() / exact.norm()), sol.stats["backward"]["steps"]))
    assert results[0][1] == results[1][1] == results[2][1], results
    assert max(e for e, _ in results) < 1e-3, results  # was 1.4 for Checkpointed


@pytest.mark.parametrize("gradient", [Backsolve(), Quadrature(), Checkpointed(), Direct(checkpoints=3)])
def test_tensor_used_only_after_the_start_is_refused(gradient):
    """Item 3: the forward check at t_0 cannot see w; the backward pass's graphs do."""
    w = torch.tensor(0.7, requires_grad=True)
    f = lambda t, y: -y if t < 0.5 else -w * y
    y0 = torch.tensor([1.0], requires_grad=True)
    sol = solve(f, y0, torch.tensor([0.0, 1.0]), gradient=gradient)
    with pytest.raises(ValueError, match=r"not among its params.*params=\["):
        sol.ys[-1].sum().backward()


def test_tensor_used_only_after_the_start_right_with_direct_or_declared():
    w = torch.tensor(0.7, requires_grad=True)
    f = lambda t, y: -y if t < 0.5 else -w * y
    for gradient, params in ((Direct(), None), (Backsolve(), [w])):
        w.grad = None
        solve(f, torch.tensor([1.0]), torch.tensor([0.0, 1.0]), gradient=gradient, params=params,
              rtol=1e-8, atol=1e-8, jump_t=torch.tensor([0.5])).ys[-1].sum().backward()  # f jumps at 0.5
        assert abs(float(w.grad) + 0.5 * math.exp(-0.5 - 0.35)) < 1e-3  # -(1 - 0.5) e^{-0.5 - 0.7·0.5}


@pytest.mark.parametrize("gradient", [Backsolve, Quadrature])
def test_fixed_step_reconstruction_is_checked(gradient):
    """Item 4: W = [[-50, 0], [1, -1]], T = 5, rk4 step 0.01: a 12 % error used to pass silently."""
    W = torch.tensor([[-50.0, 0.0], [1.0, -1.0]], dtype=D, requires_grad=True)
    y0 = torch.tensor([1.0, 1.0], dtype=D)
    sol = solve(lambda t, y: W @ y, y0, torch.tensor([0.0, 5.0], dtype=D), gradient=gradient(), params=[W],
                method="rk4", step_size=0.01)
    with pytest.warns(ta.ReconstructionWarning, match=r"fixed-step.*Checkpointed\(\)"):
        sol.ys[-1].sum().backward()
    assert sol.stats["backward"]["reconstruction_error_max"] > 100


def contracting(T):
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=D))
    W = (q @ torch.diag(torch.linspace(-1.0, -50.0, 5, dtype=D)) @ q.T).requires_grad_()
    return W, torch.ones(5, dtype=D), torch.tensor([0.0, T], dtype=D)


@pytest.mark.parametrize("gradient", [Backsolve, Quadrature])
def test_garbage_gradient_is_an_error_with_an_opt_out(gradient):
    """Item 5: eigenvalues -1 … -50 (T = 10 in the report, where the gradient was about 1e198
    with a warning; T = 2 here: the same garbage, e^100 drift, in fewer steps)."""
    W, y0, t = contracting(2.0)
    sol = solve(lambda s, y: W @ y, y0, t, gradient=gradient(), params=[W], rtol=1e-6, atol=1e-8)
    with pytest.raises(SolveError) as info:
        sol.ys[-1].sum().backward()
    # (Ended where the re-solved y outgrows the stored states 1000-fold, or at the first output
    # time's reconstruction check, whichever comes first: either names the fixes and the opt-out.)
    assert all(word in str(info.value) for word in ("Checkpointed()", "Direct()", "reconstruction_error=None"))
    assert info.value.direction == "backward"
    sol = solve(lambda s, y: W @ y, y0, t, gradient=gradient(reconstruction_error=None), params=[W], rtol=1e-6, atol=1e-8)
    with pytest.warns(ta.ReconstructionWarning):
        sol.ys[-1].sum().backward()  # opted out: the number comes back, with a warning
    # Moderate drift only warns (and Checkpointed is right here).
    W.grad = None
    solve(lambda s, y: W @ y, y0, t, gradient=Checkpointed(), params=[W], rtol=1e-6, atol=1e-8).ys[-1].sum().backward()
    assert bool(torch.isfinite(W.grad).all()) and float(W.grad.abs().max()) < 10


def test_moderate_drift_warns_only():
    f = lambda t, y: torch.stack([-y[0], -30.0 * y[1] + y[0] ** 2])
    y0 = torch.tensor([1.0, 1.0], dtype=D, requires_grad=True)
    sol = solve(f, y0, torch.tensor([0.0, 0.6], dtype=D), rtol=1e-6, atol=1e-9)
    with pytest.warns(ta.ReconstructionWarning):
        sol.ys.sum().backward()
    assert bool(torch.isfinite(y0.grad).all())


def test_backward_overflow_on_contracting_dynamics_names_checkpointed():
    """Issue 15: dy/dt = W y, eigenvalues -1 … -50 (over [0, 1e4] in the report; [0, 16] here,
    where e^(50·16) overflows float64 as surely, in 1/600 of the steps)."""
    W, y0, t = contracting(16.0)
    sol = solve(lambda s, y: W @ y, y0, t, params=[W], rtol=1e-6, atol=1e-8)
    with pytest.raises(SolveError, match=r"Checkpointed\(\)") as info:
        sol.ys[-1].sum().backward()
    assert info.value.direction == "backward"


class NaNBackward(torch.autograd.Function):
    """Identity whose backward is NaN: f is finite, its vector-Jacobian product is not."""

    @staticmethod
    def forward(ctx, x):
        return x * 1.0

    @staticmethod
    def backward(ctx, g):
        return g * math.nan


@pytest.mark.parametrize("gradient", [Backsolve(), Quadrature(), Checkpointed()])
def test_nan_only_in_the_vjp_is_reported_as_such(gradient):
    """Item 6: not 'f returned non-finite values': the VJP's part for y, and the time."""
    y0 = torch.ones(2, requires_grad=True)
    sol = solve(lambda t, y: -NaNBackward.apply(y), y0, torch.tensor([0.0, 1.0]), gradient=gradient)
    with pytest.raises(SolveError, match=r"vector-Jacobian product.*t=1.*part for y.*f itself") as info:
        sol.ys[-1].sum().backward()
    assert info.value.t == 1.0


def test_nan_only_in_the_parameter_vjp_is_an_error():
    w = torch.tensor(0.5, requires_grad=True)
    f = lambda t, y: -NaNBackward.apply(w) * y.detach() - y
    sol = solve(f, torch.ones(2), torch.tensor([0.0, 1.0]), params=[w])
    with pytest.raises(SolveError, match=r"non-finite"):
        sol.ys[-1].sum().backward()

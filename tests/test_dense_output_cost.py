"""The integration loop's dense output: right against the exact solution, the same on every
path it can take (one step at a time, batches of steps, with and without a graph), and cheap
in torch ops per step (each eager op costs microseconds whatever its size: the interpolation
once cost as much as a compiled step)."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import torchadjoint as ta
from torchadjoint import integrate as loop
from torchadjoint.interpolation import dense_weights, host_weight_polynomials, weight_polynomials

# A damped rotation beside a slow decay: the outputs trace curves, not lines.
A = torch.tensor([[-0.1, 2.0, 0.0], [-2.0, -0.1, 0.0], [0.0, 0.0, -0.5]], dtype=torch.float64)
Y0 = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)

# (method, solve options, tolerance): the error of the outputs against matrix_exp, relative
# to the largest state, in float64 and float32 (measured: 3-10x below; linear interpolation
# between the same steps is 1e-3..1e-2 off, going forward).
CASES = {
    "dopri5": (dict(rtol=1e-6, atol=1e-8), 3e-6),  # its own quartic extension (FSAL)
    "tsit5": (dict(rtol=1e-6, atol=1e-8), 5e-6),  # its own extension (FSAL)
    "dopri8": (dict(rtol=1e-7, atol=1e-9), 3e-6),  # an extension that needs f(t1, y1)
    "bosh3": (dict(rtol=1e-5, atol=1e-7), 1e-4),  # cubic Hermite, f1 the last stage
    "rk4": (dict(step_size=0.2), 2e-3),  # cubic Hermite, f1 by a call of f
}


def exact(t):
    return exact_of(Y0, t.to(torch.float64))


def outputs(direction=1.0, offset=0.0, count=1500):
    """Output times in [offset, offset + 6] (reversed for direction -1): tens of them per step."""
    t = torch.linspace(0.0, 6.0, count, dtype=torch.float64)
    return offset + direction * t


def linear_field(t, y):
    return y @ A.to(y.dtype).T


@pytest.mark.parametrize("direction", [1.0, -1.0], ids=["forward", "reversed"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("method", sorted(CASES))
def test_outputs_between_the_steps_match_the_exact_solution(method, dtype, direction):
    options, tol = CASES[method]
    t = outputs(direction)
    sol = ta.solve(linear_field, Y0.to(dtype), t.to(dtype), method=method, **options)
    assert sol.stats["forward"]["accepted"] < len(t) / 5  # most outputs lie strictly inside a step
    want = exact(t.to(dtype))
    error = float((sol.ys.double() - want).abs().max() / want.abs().max())
    assert error < tol, error


def test_linear_interpolation_is_really_worse_here():
    """The cases above would notice an interpolant degraded to straight lines."""
    t = outputs()
    sol = ta.solve(linear_field, Y0, t, method="dopri5", interpolation="linear", **CASES["dopri5"][0])
    want = exact(t)
    assert float((sol.ys - want).abs().max() / want.abs().max()) > 100 * CASES["dopri5"][1]


@pytest.mark.parametrize("method", sorted(CASES))
def test_batches_and_single_steps_agree_and_direct_is_bitwise_the_plain_solve(method, monkeypatch):
    options, tol = CASES[method]
    t = outputs(offset=3.0)
    batched = ta.solve(linear_field, Y0, t, method=method, **options).ys
    y0 = Y0.clone().requires_grad_()
    recorded = ta.solve(linear_field, y0, t, method=method, gradient=ta.Direct(), **options).ys
    assert torch.equal(recorded.detach(), batched)  # the same products, with a graph or without
    (g,) = torch.autograd.grad((recorded * torch.cos(t)[:, None]).sum(), y0)
    want = torch.autograd.grad((exact_of(y0, t) * torch.cos(t)[:, None]).sum(), y0)[0]
    assert float((g - want).abs().max() / want.abs().max()) < 10 * tol
    monkeypatch.setattr(loop._Outputs, "BATCH_STEPS", 1)  # every step's outputs at once
    single = ta.solve(linear_field, Y0, t, method=method, **options).ys
    assert torch.allclose(single, batched, rtol=1e-13, atol=1e-14)
    monkeypatch.setattr(loop._Outputs, "BATCH_STEPS", 3)  # batches of a few steps, not the whole solve
    assert torch.allclose(ta.solve(linear_field, Y0, t, method=method, **options).ys, batched, rtol=1e-13,
                          atol=1e-14)


def exact_of(y0, t):
    """y(t_i) = expm(A (t_i - t_0)) y0 (N, n), differentiable in y0."""
    return torch.linalg.matrix_exp(A * (t - t[0])[:, None, None]) @ y0


def test_outputs_on_the_step_ends_are_the_steps_own_states():
    """A fixed grid through every output time: no interpolant, each row the step's y1 (and the
    batches before an end row are written before it, in order, also with a graph)."""
    t = torch.tensor([0.0, 0.125, 0.2, 0.25, 0.375, 0.4, 0.5], dtype=torch.float64)
    y0 = Y0.clone().requires_grad_()
    for gradient in (None, ta.Direct()):
        sol = ta.solve(linear_field, y0 if gradient else Y0, t, method="rk4", step_size=0.125, gradient=gradient)
        grid = ta.solve(linear_field, Y0, torch.tensor([0.0, 0.125, 0.25, 0.375, 0.5], dtype=torch.float64),
                        method="rk4", step_size=0.125).ys
        assert torch.equal(sol.ys.detach()[[0, 1, 3, 4, 6]], grid)
        assert torch.allclose(sol.ys.detach(), exact(t), rtol=1e-4)


def test_host_weights_are_the_tableaux_weights():
    """The numpy weights the loop uses and the torch ones the other callers use are one
    polynomial for every method."""
    theta = torch.linspace(0.0, 1.0, 11, dtype=torch.float64)
    for name, tableau in ta.METHODS.items():
        coeffs = tableau.as_tensors(torch.float64, torch.device("cpu"))
        host = torch.from_numpy(host_weight_polynomials(tableau))
        assert torch.allclose(host, weight_polynomials(coeffs), rtol=0, atol=1e-15), name
        dense = loop.DenseOutput(tableau, torch.float64, torch.device("cpu"))
        got = torch.from_numpy(dense.weights(theta.numpy()))
        assert torch.allclose(got, dense_weights(coeffs, theta), rtol=0, atol=1e-14), name


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _ops_of_the_outputs(method, count, grad, **options):
    """Aten ops issued by the dense output of a solve with ``count`` outputs (those of the
    same solve with only its two ends subtracted: the steps are the same) and its steps."""
    issued = []
    for times in (outputs(count=2), outputs(count=2), outputs(count=count)):  # the first casts the tableau
        y0 = Y0.clone().requires_grad_(grad)
        with _CountOps() as ops:
            sol = ta.solve(linear_field, y0, times, method=method, gradient=ta.Direct() if grad else None,
                           **options)
        issued.append(ops.count)
    return issued[2] - issued[1], sol.stats["forward"]["accepted"]


@pytest.mark.parametrize("grad", [False, True], ids=["plain", "direct"])
def test_the_dense_output_issues_a_few_ops_per_batch_not_per_output(grad, monkeypatch):
    monkeypatch.setattr(loop._Outputs, "BATCH_STEPS", 16)  # several batches in this solve
    ops, steps = _ops_of_the_outputs("dopri5", 1500, grad, **CASES["dopri5"][0])
    assert steps > 48
    # At most 10 ops per batch of 16 steps (the torch path of old issued ~10 per step).
    assert ops <= 10 * math.ceil(steps / 16), (ops, steps)
    monkeypatch.setattr(loop._Outputs, "BATCH_STEPS", 1)  # the path of a GPU: each step at once
    ops, steps = _ops_of_the_outputs("dopri5", 1500, grad, **CASES["dopri5"][0])
    # A slice of ys and a product per step (and torch.from_numpy's lift_fresh, seen only by a
    # dispatch mode); the end's concatenation with a graph.
    assert ops <= 3 * steps + 10, (ops, steps)


def test_an_f_that_reuses_its_output_tensor_gets_the_same_outputs():
    """Euler's stage is f's own output, held until the batch is computed: an f writing every
    result into one tensor must not change the outputs (the held stage is a copy)."""
    buffer = torch.empty(3, dtype=torch.float64)

    def reusing(t, y):
        return torch.matmul(A, y, out=buffer)

    times = outputs(count=200)
    reused = ta.solve(reusing, Y0, times, method="euler", step_size=0.1).ys
    fresh = ta.solve(lambda t, y: A @ y, Y0, times, method="euler", step_size=0.1).ys
    assert torch.equal(reused, fresh)


def test_a_held_tensor_changed_in_place_is_refused_loudly():
    """A pending step holds its y0 and stages until its batch is computed. The loop never
    changes them; if anything else does (here by hand), the version counters catch it and
    reading the outputs raises rather than interpolate from changed values."""
    from torchadjoint.interpolation import DenseOutput
    from torchadjoint.step import rk_step

    tableau = ta.METHODS["dopri5"]
    coeffs = tableau.as_tensors(torch.float64, torch.device("cpu"))
    y0 = Y0.clone()
    # More outputs inside the step than the states it holds: it is held (memory stays bounded).
    outs = loop._Outputs([0.01 * k for k in range(21)] + [0.5], y0, 0.0, 1.0,
                         DenseOutput(tableau, torch.float64, torch.device("cpu")))
    first_half = rk_step(linear_field, 0.0, y0, linear_field(0.0, y0), 0.25, 0.25, tableau, coeffs)
    outs.fill(first_half, 0.0, 0.25, y0, linear_field, 0.25)
    assert outs._pending, "the step's outputs are held for a batch"
    y0.mul_(1.0)  # same values, but a write
    with pytest.raises(RuntimeError, match="changed in place"):
        outs.ys

"""Adversarial checks of Backsolve's parameter adjoint accumulated beside the backward solve
(the default seminorm): the compiled step graph that integrates ``a_θ`` itself
(``compiled._build_step``'s ``side0``, ``StageAccumulator.first_stage/took_step``) against the
eager accumulator and against ``torch.linalg.matrix_exp``.

Found by trying the feature as a user, without reading the other tests; each defect found is
a regression test here (the empty parameter parts and the rounded step length are fixed; a
lower-precision parameter's a_θ summed in its own dtype is not yet), the cases that were right
are pinned. Compiled tests really compile (seconds each): marked ``compiled``.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import torchadjoint as ta
from torchadjoint.compiled import CompileWarning

D = torch.float64
A0 = torch.tensor([[-0.3, 1.0, 0.2], [-1.0, -0.2, 0.4], [0.1, -0.5, -0.4]], dtype=D)
Y0 = torch.tensor([[1.0, 0.5, -0.3], [0.2, -0.7, 0.9]], dtype=D)  # a batch of 2 states
W = torch.linspace(-1.0, 1.0, 9 * 6, dtype=D).reshape(9, 2, 3)
LOOKED_AT = torch.tensor([0, 1, 0, 0, 1, 1, 0, 0, 1], dtype=D)[:, None, None]  # jumps at outputs 1, 4, 5


def _loss(ys):
    return (ys * W * LOOKED_AT).sum()


class _Linear(torch.nn.Module):
    """dy/dt = A y on a batch (b, 3)."""

    def __init__(self, trainable: bool = True):
        super().__init__()
        self.a = torch.nn.Parameter(A0.clone(), requires_grad=trainable)

    def forward(self, t, y):
        return y @ self.a.T


def _exact(t: torch.Tensor):
    """dL/dy0 and dL/dA by autograd through y(t_i) = y0 expm(A (t_i - t_0))^T."""
    a, y = A0.clone().requires_grad_(True), Y0.clone().requires_grad_(True)
    ys = torch.stack([y @ torch.linalg.matrix_exp(a * (s - t[0])).T for s in t])
    _loss(ys).backward()
    return y.grad, a.grad


class _LinearAlone(_Linear):
    """The same field, a class of its own: compiled programs (and a compile failure, which is
    remembered per class of f) are not shared with the other tests'."""


def _backsolve(t, trainable=True, compile_backward=False, rtol=1e-9, field=_Linear, **options):
    """dL/dy0, dL/dA and the backward stats; ``compile_backward``: the backward pass alone
    compiled (the forward's compile time saved)."""
    func = field(trainable)
    y = Y0.clone().requires_grad_(True)
    gradient = ta.Backsolve(options={"compile": True} if compile_backward else None)
    solution = ta.solve(func, y, t, gradient=gradient, rtol=rtol, atol=rtol * 1e-2, **options)
    _loss(solution.ys).backward()
    return y.grad, func.a.grad, solution.stats["backward"]


# Quadrature, Direct (tests/test_float_edges.py) and Checkpointed (known: it reads y(t) at the
# rounded public times, and says so in its TimeResolutionWarning) are covered there.
@pytest.mark.parametrize("gradient", [
    ta.Backsolve(),  # a_θ accumulated beside the solve (StageAccumulator.on_accept)
    ta.Backsolve(reset_threshold=0, norm="full"),  # a_θ in the state, y reset at each jump: pinned
], ids=["seminorm", "full-norm-resets"])
def test_eager_parameter_adjoint_at_a_large_time_offset_uses_the_exact_step(gradient):
    """At t ≈ 1e12 the loop's clock is offset (public times are 1.2e-4 apart); the steps of
    y and a_y use the exact step length, so must a_θ's accumulation. Taking it as the
    difference of the rounded public times put dL/dA off by 8e-6 under the seminorm, against
    2e-10 at t ≈ 0 (rtol 1e-9, a batch of 2, jumps at three outputs; dL/dy0 stayed right),
    while the compiled step graph, which uses the exact step, was right (pinned below)."""
    t = 1e12 + torch.linspace(0.0, 2.0, 9, dtype=D)
    func = _Linear()
    y = Y0.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TimeResolutionWarning: f ignores t here
        solution = ta.solve(func, y, t, gradient=gradient, rtol=1e-9, atol=1e-11)
        _loss(solution.ys).backward()
    exact_y0, exact_a = _exact(t)
    torch.testing.assert_close(y.grad, exact_y0, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(func.a.grad, exact_a, rtol=1e-8, atol=1e-10)


@pytest.mark.compiled
def test_compiled_backward_of_a_frozen_module_compiles_and_leaves_later_solves_compiled():
    """Gradients for y0 alone (every parameter of f frozen): the step graph was handed the
    first stage's parameter parts anyway, an empty tuple, and summed their norms with
    ``torch.stack([])``: the backward step failed to compile, a CompileWarning, the backward
    eager, and every later compiled solve of the same f class eager too (its failure is
    remembered per f)."""
    t = torch.linspace(0.0, 2.0, 9, dtype=D)
    options = dict(method="bosh3", rtol=1e-6)
    eager_y0, _, eager_stats = _backsolve(t, trainable=False, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileWarning)
        grad_y0, grad_a, stats = _backsolve(t, trainable=False, compile_backward=True, **options)
        assert grad_a is None
        assert stats["compiled"], stats
        torch.testing.assert_close(grad_y0, eager_y0, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad_y0, _exact(t)[0], rtol=1e-4, atol=1e-6)
        for key in ("steps", "accepted", "rejected", "nvjp"):
            assert stats[key] == eager_stats[key], key
        # The same f class with its parameter trainable, afterwards: still compiled.
        _, _, later = _backsolve(t, compile_backward=True, **options)
        assert later["compiled"], later


@pytest.mark.compiled
def test_compiled_backward_of_a_plain_function_without_params_compiles():
    """The same empty tuple of parameter parts for the plainest use, ``f`` a function and only
    ``y0`` requiring grad: no CompileWarning, and eager's gradient."""
    a = A0.clone()
    t = torch.linspace(0.0, 2.0, 9, dtype=D)

    def grad_y0(**options):
        y = Y0.clone().requires_grad_(True)
        solution = ta.solve(lambda t, y: y @ a.T, y, t, method="bosh3", rtol=1e-6, atol=1e-8, **options)
        _loss(solution.ys).backward()
        return y.grad, solution.stats["backward"]

    eager, _ = grad_y0()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileWarning)
        compiled, stats = grad_y0(gradient=ta.Backsolve(options={"compile": True}))
    assert stats["compiled"], stats
    torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-14)


@pytest.mark.compiled
def test_compiled_parameter_adjoint_at_a_large_time_offset_matches_matrix_exp():
    """Pinned (passes): the step graph integrates a_θ with the step's exact length, so at
    t ≈ 1e12, with jumps at three output times and a reset at each (reset_threshold=0),
    dL/dA is as accurate as at t ≈ 0, with eager's steps."""
    t = 1e12 + torch.linspace(0.0, 2.0, 9, dtype=D)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TimeResolutionWarning: f ignores t here
        warnings.simplefilter("error", CompileWarning)
        _, _, eager_stats = _backsolve(t)
        grad_y0, grad_a, stats = _backsolve(t, compile_backward=True, field=_LinearAlone)
    assert stats["compiled"], stats
    exact_y0, exact_a = _exact(t)
    torch.testing.assert_close(grad_y0, exact_y0, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(grad_a, exact_a, rtol=1e-8, atol=1e-10)
    for key in ("steps", "accepted", "rejected", "nvjp"):
        assert stats[key] == eager_stats[key], key


class _LinearFloat32(torch.nn.Module):
    """dy/dt = A y with a float32 parameter A, cast up to the state's float64 inside f."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor([[-0.05, 3.0], [-3.0, -0.05]], dtype=torch.float32))

    def forward(self, t, y):
        return y @ self.a.T.to(y.dtype)


@pytest.mark.parametrize("compile_backward", [False, pytest.param(True, marks=pytest.mark.compiled)],
                         ids=["eager", "compiled"])
def test_seminorm_accumulates_a_float32_parameters_adjoint_at_the_states_precision(compile_backward):
    """A float64 state with a float32 parameter, rtol 1e-11, ~4700 backward steps: carried in
    the state (norm="full") a_θ is summed in float64 and rounded once, 3.3e-8 from the truth
    (float32's spacing is 6e-8). Accumulated beside the solve it was summed in the parameter's
    float32, step after step: 2.7e-6 (eager) and 1.2e-6 (compiled graph sums), 40x the dtype's
    own rounding, though the seminorm is meant to be the same computation as the state's."""
    y0 = torch.tensor([1.0, 0.5], dtype=D)
    t = torch.linspace(0.0, 30.0, 4, dtype=D)
    w = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, -1.0]], dtype=D)
    func = _LinearFloat32()
    a = func.a.detach().double().requires_grad_(True)
    exact = torch.autograd.grad((torch.stack([torch.linalg.matrix_exp(a * s) @ y0 for s in t]) * w).sum(), a)[0]
    gradient = ta.Backsolve(options={"compile": True} if compile_backward else None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileWarning)
        solution = ta.solve(func, y0, t, gradient=gradient, rtol=1e-11, atol=1e-13)
        (solution.ys * w).sum().backward()
    assert func.a.grad.dtype == torch.float32
    # a few float32 spacings: what the full norm achieves (3.3e-8)
    torch.testing.assert_close(func.a.grad.double(), exact, rtol=2e-7, atol=0.0)

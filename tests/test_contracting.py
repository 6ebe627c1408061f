"""Contracting dynamics: backsolve's backward re-solve of y explodes; the checkpointed
adjoint and discretise-then-optimise, which never run y backwards, stay accurate.

Backsolve runs here with a looser backward tolerance than the forward's (1e-5): at the
forward's own 1e-8 it takes thousands of backward steps to produce the same garbage
(benchmarks/bench_contracting.py measures that). An error far above 100% is no matter
of tolerance.
"""
import math
import warnings

import pytest
import torch
from torch import nn

from torchadjoint import Backsolve, Checkpointed, Direct, ReconstructionWarning, solve

D = torch.float64
TOL = dict(rtol=1e-8, atol=1e-10)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


@pytest.fixture(scope="module")
def linear():
    """A symmetric, eigenvalues log-spread over [-50, -1]; t in [0, 10]; L = w · y(10)."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=D))
    rates = torch.logspace(0, math.log10(50.0), 6, dtype=D)
    A = (q @ torch.diag(-rates) @ q.T).requires_grad_()
    y0 = torch.randn(6, generator=g, dtype=D, requires_grad=True)
    w = torch.randn(6, generator=g, dtype=D)
    t = torch.tensor([0.0, 10.0], dtype=D)
    exact = torch.autograd.grad((torch.linalg.matrix_exp(A * 10.0) @ y0 * w).sum(), (y0, A))

    def grads(gradient, func=lambda s, y: A @ y, **options):
        sol = solve(func, y0, t, gradient=gradient, params=[A], **{**TOL, **options})
        return torch.autograd.grad((sol.ys[-1] * w).sum(), (y0, A)), sol

    return grads, exact, A


class ContractingField(nn.Module):
    """f(y) = -diag(r) y + ½ MLP(y), rates r log-spread over [1, 50]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.register_buffer("rates", torch.logspace(0, math.log10(50.0), 4, dtype=D))
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 4)).to(D)

    def forward(self, t, y):
        return -self.rates * y + 0.5 * self.net(y)


@pytest.fixture(scope="module")
def neural():
    field = ContractingField()
    params = list(field.parameters())
    y0 = torch.tensor([[1.0, -0.5, 0.8, 0.3], [-1.2, 0.4, 0.1, 0.9]], dtype=D, requires_grad=True)
    t = torch.linspace(0.0, 5.0, 5, dtype=D)  # contracting by up to e^-250

    def grads(gradient, **options):
        sol = solve(field, y0, t, gradient=gradient, **(options or TOL))
        loss = (sol.ys[1:] ** 2).sum() + sol.ys[-1].sum()
        return flat(torch.autograd.grad(loss, [y0, *params])), sol

    # Discretise-then-optimise at a far tighter tolerance converges to the true gradient.
    reference, _ = grads(Direct(), method="dopri8", rtol=1e-12, atol=1e-14)
    return grads, reference


def test_linear_backsolve_fails(linear):
    grads, exact, _ = linear
    with pytest.warns(ReconstructionWarning):
        # reconstruction_error=None: the number, to measure how wrong it is (by default: SolveError)
        got, sol = grads(Backsolve(rtol=1e-5, atol=1e-7, reconstruction_error=None))
    error = rel(got[1], exact[1])
    print(f"\ncontracting linear, backsolve: dL/dA relative error {error:.3g}, "
          f"reconstruction error {sol.stats['backward']['reconstruction_error']:.3g}x tolerance")
    assert not error < 1.0  # inf or NaN count as failing too


def test_linear_checkpointed_is_accurate(linear):
    grads, exact, _ = linear
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, sol = grads(Checkpointed())
    errors = [rel(g, e) for g, e in zip(got, exact)]
    print(f"\ncontracting linear, checkpointed: relative errors dL/dy0 {errors[0]:.3g}, dL/dA {errors[1]:.3g}")
    assert max(errors) <= 1e-5
    assert sol.stats["backward"]["replay_error"] == 0.0


def test_linear_direct_checkpoints_match_direct(linear):
    """dL/dA sums about 1400 per-evaluation terms up to ~3e7 times larger than the sum (the
    fast modes sit at the stability limit and alternate in sign): any other order of
    summation moves it by ~1e-9 relative. So dL/dA is held to rounding relative to the
    size of the terms summed; dL/dy0 (no such sum) to 1e-10."""
    grads, exact, A = linear
    terms = []

    def hooked(s, y):
        A_used = A * 1.0  # the same value; the hook sees this evaluation's share of dL/dA
        A_used.register_hook(terms.append)
        return A_used @ y

    want, _ = grads(Direct(), func=hooked)
    got, sol = grads(Direct(checkpoints=8))
    assert sol.stats["forward"]["accepted"] > 8**2  # more than one level of checkpoints
    assert sol.stats["backward"]["levels"] >= 2
    assert rel(got[0], want[0]) <= 1e-10
    magnitude = torch.stack(terms).abs().sum(0).norm()
    error = float((got[1] - want[1]).norm())
    print(f"\ncontracting linear, Direct(checkpoints=8) vs Direct(): dL/dy0 {rel(got[0], want[0]):.3g}, "
          f"dL/dA {error / float(want[1].norm()):.3g} relative, {error / float(magnitude):.3g} of the summed terms' size "
          f"(their size / the sum: {float(magnitude / want[1].norm()):.3g})")
    assert error <= 1e-14 * float(magnitude)  # ~ sqrt(#terms) · machine epsilon
    assert max(rel(g, e) for g, e in zip(got, exact)) <= 1e-5


def test_neural_backsolve_fails(neural):
    grads, reference = neural
    with pytest.warns(ReconstructionWarning):
        got, _ = grads(Backsolve(rtol=1e-5, atol=1e-7, reconstruction_error=None))  # the number (default: SolveError)
    error = rel(got, reference)
    print(f"\ncontracting neural ODE, backsolve: relative error {error:.3g}")
    assert not error < 1.0


def test_neural_checkpointed_and_direct(neural):
    grads, reference = neural
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, _ = grads(Checkpointed(checkpoints=8))
    error = rel(got, reference)
    print(f"\ncontracting neural ODE, checkpointed: relative error {error:.3g}")
    assert error <= 1e-5
    want, _ = grads(Direct())
    got, _ = grads(Direct(checkpoints=8))
    assert rel(got, want) <= 1e-10
    assert rel(got, reference) <= 1e-5

"""Property-based gradient tests: random linear systems, random output grids, every
adaptive method and every gradient method, against the exact gradient (matrix_exp).

For ``dy/dt = A y`` the solution is ``y(t_i) = exp(A (t_i - t_0)) y0``; autograd through
``torch.linalg.matrix_exp`` gives exact gradients of ``L = Σ_i w_i · y(t_i)`` with respect to
``y0``, ``A`` and every time. The solver's gradients must agree within a bound scaled by the
tolerance.
"""
import warnings

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchadjoint as ta

from linear_reference import analytic_grads

# Tolerance per method: low-order methods would need very many steps at tight tolerances.
METHOD_RTOL = {"adaptive_heun": 1e-5, "fehlberg2": 1e-5, "bosh3": 1e-8, "dopri5": 1e-9, "tsit5": 1e-9, "dopri8": 1e-10}
EXAMPLES = 4  # per (method, gradient method) pair; see test ids for the count that runs in CI


@st.composite
def linear_problem(draw):
    n = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    stable = draw(st.booleans())
    increasing = draw(st.booleans())
    n_out = draw(st.integers(2, 5))
    loss_on_start = draw(st.booleans())
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    # Stable: eigenvalues shifted into the left half-plane; unstable: growth up to e^2 over the interval.
    shift = (A.norm() + 0.5) if stable else -0.5
    A = A - shift * torch.eye(n, dtype=torch.float64)
    span = float(draw(st.floats(0.2, 1.0)))
    start = float(draw(st.floats(-1.0, 1.0)))
    inner = sorted(torch.rand(n_out - 1, generator=g, dtype=torch.float64).tolist())
    times = [start] + [start + span * (0.05 + 0.95 * x) for x in inner]
    if len(set(times)) != len(times):
        times = [start + span * k / (n_out - 1) for k in range(n_out)]
    if not increasing:
        times = [2 * start - x for x in times]
    t = torch.tensor(times, dtype=torch.float64)
    y0 = torch.randn(n, generator=g, dtype=torch.float64)
    w = torch.randn(n_out, n, generator=g, dtype=torch.float64)
    if not loss_on_start:
        w[0] = 0
    return A, y0, t, w


def exact_gradients(A, y0, t, w):
    A, y0, t = (x.detach().clone().requires_grad_(True) for x in (A, y0, t))
    return analytic_grads(A, y0, t, w)


def solver_gradients(A, y0, t, w, method, gradient):
    A, y0, t = (x.detach().clone().requires_grad_(True) for x in (A, y0, t))
    rtol = METHOD_RTOL[method]
    with warnings.catch_warnings():
        # Backsolve warns on contracting draws; the bound below accounts for the conditioning.
        warnings.simplefilter("ignore", ta.ReconstructionWarning)
        sol = ta.solve(lambda s, y: A @ y, y0, t, method=method, params=[A], rtol=rtol, atol=rtol * 1e-2, gradient=gradient)
        loss = (w * sol.ys).sum()
        return torch.autograd.grad(loss, (y0, A, t)), rtol


def check(problem, method, gradient_name):
    A, y0, t, w = problem
    gradient = ta.gradient_method(gradient_name)
    got, rtol = solver_gradients(A, y0, t, w, method, gradient)
    want = exact_gradients(A, y0, t, w)
    # Conditioning of the flow over the interval: backward re-solves amplify local errors by
    # up to ||exp(-A T)||, forward ones by ||exp(A T)||.
    span = float((t[-1] - t[0]).abs())
    kappa = float(torch.linalg.matrix_norm(torch.linalg.matrix_exp(A * span), 2) * torch.linalg.matrix_norm(torch.linalg.matrix_exp(-A * span), 2))
    for name, g, e in zip(("y0", "A", "t"), got, want):
        scale = 1.0 + float(e.abs().max())
        err = float((g - e).abs().max())
        # Global error of an adaptive solve is a modest multiple of rtol times the conditioning.
        bound = 1e3 * rtol * kappa * scale
        assert err <= bound, f"{method}/{gradient_name}: d/d{name} error {err:.2e} > {bound:.2e} (kappa {kappa:.3g})"


def make_test(method):
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
    @given(problem=linear_problem(), gradient_name=st.sampled_from(sorted(ta.GRADIENT_METHODS)))
    def test(problem, gradient_name):
        check(problem, method, gradient_name)

    return test


for _method in METHOD_RTOL:
    globals()[f"test_gradients_match_exact_{_method}"] = make_test(_method)


def test_every_gradient_method_is_exercised():
    # Hypothesis samples gradient methods; make sure each one meets each method at least once
    # on a fixed stable problem, so none is left out by chance.
    problem = (
        torch.tensor([[-1.0, 0.5], [-0.5, -2.0]], dtype=torch.float64),
        torch.tensor([1.0, -1.0], dtype=torch.float64),
        torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64),
        torch.tensor([[0.2, 0.1], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64),
    )
    for method in METHOD_RTOL:
        for name in sorted(ta.GRADIENT_METHODS):
            check(problem, method, name)

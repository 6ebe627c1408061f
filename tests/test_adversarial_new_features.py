"""Adversarial checks of the compiled path, the seminorm's a_θ error check and Newton's
linear solvers, each against independent truth (analytic solutions, the dense path)."""
import cmath
import math

import pytest
import torch

import torchadjoint as ta
from torchadjoint.implicit import BatchedDense

DT = torch.float64


class StiffRowsWeaklyCoupled(torch.nn.Module):
    """Rows ``[u_b, w_b]``: ``u_b' = -1e7 (u_b - cos t)`` (stiff), ``w_b' = -w_b + c w_{b-1}``.

    The slow components couple across rows through ``c``: the Jacobian is not block-diagonal,
    but the coupling (0.03) is tiny beside the stiff rows' 1e7."""

    def __init__(self, c):
        super().__init__()
        self.c = torch.nn.Parameter(torch.tensor(c, dtype=DT))

    def forward(self, t, y):
        u, w = y[:, 0], y[:, 1]
        return torch.stack([-1e7 * (u - torch.cos(t)), -w + self.c * w.roll(1, 0)], 1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batched_dense_refuses_rows_coupled_beside_a_stiff_row(dtype):
    # The interaction check compared the mismatch with the largest entry of the whole
    # product (1e7 here), so a 0.03 coupling of the slow rows passed unnoticed and Direct()'s
    # implicit-function gradients used the block Jacobian: d w_0(1)/d w_2(0) came out 0.0015
    # instead of the analytic 0.0110 (-86 %), with no warning.
    f = StiffRowsWeaklyCoupled(0.03).to(dtype)
    y0 = torch.tensor([[1.0, 1.0], [1.0, 2.0], [1.0, 3.0]], dtype=dtype)
    t = torch.tensor([0.0, 1.0], dtype=dtype)
    method = ta.METHODS["kvaerno5"].with_linear_solver(BatchedDense(batch_size=3))
    with pytest.raises(ValueError, match=r"BatchedDense\(batch_size=3\).*interact"):
        ta.solve(f, y0.requires_grad_(), t, method=method, gradient=ta.Direct(), rtol=1e-6, atol=1e-8)

    # The dense default gets the analytic answer: w' = (-I + c P) w.
    y0 = y0.detach().to(DT).requires_grad_()
    f = f.to(DT)
    sol = ta.solve(f, y0, t.to(DT), method="kvaerno5", gradient=ta.Direct(), rtol=1e-6, atol=1e-8)
    (grad,) = torch.autograd.grad(sol.ys[-1][0, 1], [y0])
    exact = torch.linalg.matrix_exp(-torch.eye(3, dtype=DT) + 0.03 * torch.roll(torch.eye(3, dtype=DT), 1, 0))[0]
    torch.testing.assert_close(grad[:, 1], exact, rtol=1e-4, atol=1e-7)


def test_batched_dense_still_accepts_independent_stiff_rows_float32():
    # The entrywise check must not refuse an honest batch whose rows span 1e7..1 in float32.
    f = StiffRowsWeaklyCoupled(0.0).to(torch.float32)
    y0 = torch.tensor([[1.0, 1.0], [1.0, 2.0], [1.0, 3.0]], requires_grad=True)
    t = torch.tensor([0.0, 1.0])
    method = ta.METHODS["kvaerno5"].with_linear_solver(BatchedDense(batch_size=3))
    sol = ta.solve(f, y0, t, method=method, gradient=ta.Direct(), rtol=1e-5, atol=1e-7)
    (grad,) = torch.autograd.grad(sol.ys[-1][:, 1].sum(), [y0])
    torch.testing.assert_close(grad[:, 1], torch.full((3,), torch.exp(torch.tensor(-1.0)).item()), rtol=1e-4, atol=1e-6)


class AliasedForcing(torch.nn.Module):
    """``y' = -y + θ sin(ω t)`` at θ = 0: the forcing is off, so neither the forward nor
    ``a_y`` sees it, and only ``a_θ = ∫ a_y sin(ω t) dt`` oscillates."""

    def __init__(self, omega):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor(0.0, dtype=DT))
        self.omega = omega

    def forward(self, t, y):
        return -y + self.theta * torch.sin(self.omega * t)


def test_seminorm_redo_when_aliased_step_errors_cancel_in_sign():
    # ω = 300 over [0, 10]: the seminorm's 39 steps have hω ≈ 80, both rules of dopri5's pair
    # are aliased, and their per-step error estimates alternate in sign. Summed signed, they
    # read 47 (< 100: no redo) while the gradient came out -0.116 against the analytic
    # 0.00325 (37x off), with no warning. Summed in norm they read ~3000: the redo runs.
    omega, T = 300.0, 10.0
    f = AliasedForcing(omega)
    y0 = torch.tensor([1.0], dtype=DT, requires_grad=True)
    sol = ta.solve(f, y0, torch.tensor([0.0, T], dtype=DT), rtol=1e-6, atol=1e-8)
    (grad,) = torch.autograd.grad(sol.ys[-1].sum(), [f.theta])
    exact = (math.sin(omega * T) - omega * math.cos(omega * T) + omega * math.exp(-T)) / (1 + omega**2)
    assert sol.stats["backward"]["seminorm_fallback"] is True
    assert sol.stats["backward"]["parameter_error"] > 100
    assert abs(float(grad) - exact) < 1e-3 * abs(exact)


def test_quadrature_aliased_forcing_is_redone_or_right():
    # Quadrature's a_θ estimate was summed signed over each batch of steps (one VJP), where
    # the aliased steps' errors cancelled: it read 67 (< 100), no redo, and the gradient was
    # 0.709 against 0.000284 (2500x), with no warning. It now reads 4.8e5 and is redone
    # (test_quadrature_estimate_flags_every_aliased_forcing checks that T = 40 reading without the redo, which
    # resolves sin(3000 t) in 61444 steps, 100 s). Here the whole pass, redo included, on a
    # tenth of the interval: the answer the user gets is right.
    omega, T, a = 3000.0, 4.0, 0.1

    class Slow(AliasedForcing):
        def forward(self, t, y):
            return -a * y + self.theta * torch.sin(self.omega * t)

    f = Slow(omega)
    y0 = torch.tensor([1.0], dtype=DT, requires_grad=True)
    sol = ta.solve(f, y0, torch.tensor([0.0, T], dtype=DT), rtol=1e-6, atol=1e-8, gradient=ta.Quadrature())
    (grad,) = torch.autograd.grad(sol.ys[-1].sum(), [f.theta])
    exact = (a * math.sin(omega * T) - omega * math.cos(omega * T) + omega * math.exp(-a * T)) / (a * a + omega**2)
    assert abs(float(grad) - exact) < 1e-2 * abs(exact)


# Quadrature's a_θ error estimate, judged on its first (seminorm) pass alone: the redo it
# triggers above 100 is tested above and in test_adversarial_gradients.py; resolving these
# forcings by Backsolve(norm="full") takes 10^4..10^5 steps, too slow to repeat per case.

def first_pass_readings(monkeypatch):
    """Replace Quadrature's redo by its first pass; returns the list its readings go into."""
    from torchadjoint.adjoint import quadrature

    readings = []

    def first_pass_only(stats, first_pass, full_pass):
        grads, parameter_error = first_pass()
        readings.append(parameter_error)
        stats["backward"]["seminorm_fallback"] = False
        return grads

    monkeypatch.setattr(quadrature, "with_seminorm_fallback", first_pass_only)
    return readings


def sine_forcing_exact(omega, a, T):
    """dy(T)/dθ for y' = -a y + θ sin(ω t) at θ = 0, y from 0 to T."""
    return (a * math.sin(omega * T) - omega * math.cos(omega * T) + omega * math.exp(-a * T)) / (a * a + omega**2)


class Forcing(torch.nn.Module):
    """``y' = -a y + θ g(t)`` at θ = 0 (the forcing off: only ``a_θ`` sees ``g``)."""

    def __init__(self, g, a, dtype=DT):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor(0.0, dtype=dtype))
        self.g, self.a = g, a

    def forward(self, t, y):
        return -self.a * y + self.theta * self.g(t)


def quadrature_first_pass(monkeypatch, g, a=0.1, T=40.0, dtype=DT, rtol=1e-6, atol=1e-8, **options):
    readings = first_pass_readings(monkeypatch)
    f = Forcing(g, a, dtype)
    y0 = torch.tensor([1.0], dtype=dtype, requires_grad=True)
    sol = ta.solve(f, y0, torch.tensor([0.0, T], dtype=dtype), rtol=rtol, atol=atol, gradient=ta.Quadrature(**options))
    (grad,) = torch.autograd.grad(sol.ys[-1].sum(), [f.theta])
    return float(grad), readings[0]


@pytest.mark.parametrize("omega, dtype, options", [
    (300.0, DT, {}), (1000.0, DT, {}), (3000.0, DT, {}), (10000.0, DT, {}),
    (300.0, torch.float32, {}), (3000.0, torch.float32, {}),
    (3000.0, DT, dict(nodes=1)), (3000.0, DT, dict(nodes=4)), (3000.0, DT, dict(method="bosh3")),
])
def test_quadrature_estimate_flags_every_aliased_forcing(monkeypatch, omega, dtype, options):
    # The seminorm's ~19 steps are ~2.4 long: sin(ω t) turns hundreds to thousands of times in
    # each. Before, the estimate read 67, 49, 8.4 (float32, ω = 300), 0 (nodes=1: none at all)
    # and 14 (nodes=4) on the silently wrong cases (300..2.2e4x off); every one is now > 1e4.
    tolerances = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else {}
    grad, reading = quadrature_first_pass(monkeypatch, lambda t: torch.sin(omega * t), dtype=dtype, **tolerances,
                                          **options)
    exact = sine_forcing_exact(omega, 0.1, 40.0)
    assert abs(grad - exact) > 10 * abs(exact)  # the first pass is aliased ...
    assert reading > 1e4  # ... and says so: the pass is redone


def test_quadrature_estimate_flags_a_time_embedding_layer(monkeypatch):
    # θ enters through a (zero-initialised) linear layer on fast time features sin(ω_i t).
    readings = first_pass_readings(monkeypatch)
    omegas = torch.tensor([300.0, 1000.0, 3000.0], dtype=DT)
    embed = torch.nn.Linear(3, 1, bias=False).double()
    torch.nn.init.zeros_(embed.weight)
    y0 = torch.tensor([1.0], dtype=DT)
    sol = ta.solve(lambda t, y: -0.1 * y + embed(torch.sin(omegas * t)), y0, torch.tensor([0.0, 40.0], dtype=DT),
                   rtol=1e-6, atol=1e-8, gradient=ta.Quadrature(), params=list(embed.parameters()))
    (grad,) = torch.autograd.grad(sol.ys[-1].sum(), [embed.weight])
    exact = torch.tensor([[sine_forcing_exact(float(w), 0.1, 40.0) for w in omegas]], dtype=DT)
    assert float((grad - exact).norm()) > 10 * float(exact.norm())
    assert readings[0] > 1e4


def test_quadrature_estimate_sees_a_forcing_aliased_on_the_gauss_nodes(monkeypatch):
    # A forcing equal to 1 at the three Gauss nodes of every backward step, and oscillating
    # between them: cos(2π (t - m_s) / d_s) on step s, m_s its middle node, d_s the nodes'
    # spacing. Every rule on the Gauss nodes alone sees a constant, so the old estimate (a
    # lower rule on the same nodes) read 6e-4 while the gradient was far off; the
    # estimate's own node (golden section of the step) sees cos(-1.92) = -0.34 there.
    from torchadjoint.adjoint import quadrature

    a, T = 0.1, 40.0
    steps = []
    original = quadrature.ParameterQuadrature.on_accept
    monkeypatch.setattr(quadrature.ParameterQuadrature, "on_accept",
                        lambda self, step: (steps.append((step.t0, step.t1)), original(self, step))[1])
    quadrature_first_pass(monkeypatch, lambda t: torch.sin(t))  # the forcing does not change the steps (θ = 0)
    spacing = math.sqrt(15) / 10  # of the 3-point rule's nodes, as a fraction of the step
    edges = torch.tensor(sorted(min(s) for s in steps) + [T], dtype=DT)
    middle = torch.tensor([0.5 * (t0 + t1) for t0, t1 in sorted(steps, key=min)], dtype=DT)
    period = torch.tensor([spacing * abs(t1 - t0) for t0, t1 in sorted(steps, key=min)], dtype=DT)

    def g(t):
        s = (torch.searchsorted(edges, t.detach().reshape(1), right=True) - 1).clamp(0, len(middle) - 1)[0]
        return torch.cos(2 * math.pi * (t - middle[s]) / period[s])

    grad, reading = quadrature_first_pass(monkeypatch, g)
    # ∫ e^{-a (T - t)} g(t) dt, step by step in closed form: Re ∫ e^{-aT - iκm} e^{(a + iκ) t} dt.
    exact = 0.0
    for s in range(len(middle)):
        lo, hi, m, kappa = float(edges[s]), float(edges[s + 1]), float(middle[s]), 2 * math.pi / float(period[s])
        rate = complex(a, kappa)
        exact += (cmath.exp(-a * T - 1j * kappa * m) * (cmath.exp(rate * hi) - cmath.exp(rate * lo)) / rate).real
    assert abs(grad - exact) > abs(exact)
    assert reading > 1e4

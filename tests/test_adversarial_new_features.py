"""Adversarial checks of the compiled path, the seminorm's a_θ error check and Newton's
linear solvers, each against independent truth (analytic solutions, the dense path)."""
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


@pytest.mark.xfail(strict=True, reason=(
    "Quadrature's a_θ estimate (a lower rule on the same Gauss nodes) is aliased with the Gauss rule when "
    "∂f/∂θ = sin(3000 t) oscillates thousands of times per step: parameter_error reads 67 (< 100), no redo, "
    "and the gradient is 0.709 against the analytic 0.000284 (2500x), with no warning. Backsolve and "
    "Checkpointed redo and get it within 0.3 %. Needs a different estimate (e.g. nodes not shared with "
    "the Gauss rule), not a threshold change."))
def test_quadrature_aliased_forcing_is_redone_or_right():
    omega, T, a = 3000.0, 40.0, 0.1

    class Slow(AliasedForcing):
        def forward(self, t, y):
            return -a * y + self.theta * torch.sin(self.omega * t)

    f = Slow(omega)
    y0 = torch.tensor([1.0], dtype=DT, requires_grad=True)
    sol = ta.solve(f, y0, torch.tensor([0.0, T], dtype=DT), rtol=1e-6, atol=1e-8, gradient=ta.Quadrature())
    (grad,) = torch.autograd.grad(sol.ys[-1].sum(), [f.theta])
    exact = (a * math.sin(omega * T) - omega * math.cos(omega * T) + omega * math.exp(-a * T)) / (a * a + omega**2)
    assert abs(float(grad) - exact) < 1e-2 * abs(exact)

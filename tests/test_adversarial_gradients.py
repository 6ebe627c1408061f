"""Adversarial gradient checks: programs a user writes, against references we did not write.

Zero-initialised output layer (a common neural-ODE initialisation): with ``W_out = 0`` the
state does not move, so the forward solve and the backward ``(y, a_y)`` solve take a few
large steps, while ``dL/dW_out = ∫ a_y(t) h(t)ᵀ dt`` integrates features ``h(t)`` that vary
quickly in ``t``. Under the seminorm (the default) nothing controls the error of that
integral, so the gradient comes back ~90 % wrong without a warning. The reference is exact:
``∂f/∂y = 0`` makes ``a_y ≡ ∂L/∂y(T) = 1``, so ``dL/dW_out[i, k] = ∫_0^T sin(k t) dt``.
"""
import math

import pytest
import torch

from torchadjoint import solve
from torchadjoint.adjoint import Backsolve, Checkpointed, Direct, Quadrature

K = torch.arange(1, 21, dtype=torch.float64)
T_END = 2.0


class ZeroInitFourierField(torch.nn.Module):
    """f(t, y) = W_out sin(K t) + b, W_out and b zero-initialised; y: (3,)."""

    def __init__(self):
        super().__init__()
        self.out = torch.nn.Linear(len(K), 3).double()
        torch.nn.init.zeros_(self.out.weight)
        torch.nn.init.zeros_(self.out.bias)

    def forward(self, t, y):
        return self.out(torch.sin(K * t)).expand_as(y)


def _relative_weight_gradient_error(gradient) -> float:
    field = ZeroInitFourierField()
    y0 = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, T_END], dtype=torch.float64)
    ys = solve(field, y0, t, gradient=gradient, rtol=1e-6, atol=1e-8).ys
    ys[-1].sum().backward()  # a_y ≡ 1
    exact = (1 - torch.cos(K * T_END)) / K  # ∫_0^T sin(k t) dt
    got = field.out.weight.grad
    return float((got - exact).abs().max() / exact.abs().max())


@pytest.mark.parametrize("gradient", [Backsolve(norm="full"), Checkpointed(norm="full")], ids=repr)
def test_zero_init_output_layer_full_norm_is_right(gradient):
    assert _relative_weight_gradient_error(gradient) < 1e-5


@pytest.mark.xfail(
    strict=True,
    reason="known defect (notes adv14): under the default seminorm the a_θ integral is not "
    "error-controlled; with a zero-initialised output layer the weight gradient is ~90% wrong "
    "with no warning. Workaround: Backsolve(norm='full') / Checkpointed(norm='full').",
)
@pytest.mark.parametrize("gradient", [Backsolve(), Checkpointed(), Quadrature()], ids=repr)
def test_zero_init_output_layer_default_norm_is_right(gradient):
    assert _relative_weight_gradient_error(gradient) < 1e-3


def test_checkpointed_forced_system_parameter_gradient():
    """y' = -a y + θ sin(ω t): a_y = e^{-a(T-t)} is smooth, the θ-integrand a_y sin(ω t) is
    not. Checkpointed's seminorm steps sized for a_y alone gave dL/dθ 15 % off, silently."""
    a, w, t_end = 0.5, 20.0, 2.0
    # dL/dθ for L = y(T): ∫_0^T e^{-a(T-t)} sin(ω t) dt, in closed form
    exact = (a * math.sin(w * t_end) - w * math.cos(w * t_end) + w * math.exp(-a * t_end)) / (a * a + w * w)
    for gradient in (Checkpointed(), Checkpointed(checkpoints=4), Backsolve(), Quadrature()):
        theta = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        ys = solve(lambda t, y: -a * y + theta * torch.sin(w * t), torch.tensor([1.0], dtype=torch.float64),
                   torch.tensor([0.0, t_end], dtype=torch.float64), gradient=gradient, params=[theta],
                   rtol=1e-6, atol=1e-8).ys
        (g,) = torch.autograd.grad(ys[-1].sum(), [theta])
        assert abs(g.item() - exact) < 1e-5 * abs(exact), (gradient, g.item(), exact)

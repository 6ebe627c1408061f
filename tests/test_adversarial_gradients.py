"""Adversarial gradient checks: programs a user writes, against references we did not write.

Zero-initialised output layer (a common neural-ODE initialisation): with ``W_out = 0`` the
state does not move, so the forward solve and the backward ``(y, a_y)`` solve take a few
large steps, while ``dL/dW_out = ∫ a_y(t) h(t)ᵀ dt`` integrates features ``h(t)`` that vary
quickly in ``t``. Under the seminorm (the default) nothing controls the error of that
integral, so the gradient comes back ~90 % wrong without a warning. The reference is exact:
``∂f/∂y = 0`` makes ``a_y ≡ ∂L/∂y(T) = 1``, so ``dL/dW_out[i, k] = ∫_0^T sin(k t) dt``.
"""
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

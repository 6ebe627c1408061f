"""Adversarial gradient checks: programs a user writes, against references we did not write.

Zero-initialised output layer (a common neural-ODE initialisation): with ``W_out = 0`` the
state does not move, so the forward solve and the backward ``(y, a_y)`` solve take a few
large steps, while ``dL/dW_out = ∫ a_y(t) h(t)ᵀ dt`` integrates features ``h(t)`` that vary
quickly in ``t``. Under the seminorm (the default) nothing controls the error of that
integral step by step; the gradient came back ~90 % wrong without a warning, until the
backward pass learnt to accumulate that integral's error estimate and redo itself with
the full norm when it is too large (``stats["seminorm_fallback"]``). The reference is exact:
``∂f/∂y = 0`` makes ``a_y ≡ ∂L/∂y(T) = 1``, so ``dL/dW_out[i, k] = ∫_0^T sin(k t) dt``.
"""
import functools
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


def _forced_decay_gradient(a: float, w: float, t_end: float) -> float:
    """dL/dθ for y' = -a y + θ sin(ω t), L = y(T): ∫_0^T e^{-a(T-t)} sin(ω t) dt (closed form)."""
    return (a * math.sin(w * t_end) - w * math.cos(w * t_end) + w * math.exp(-a * t_end)) / (a * a + w * w)


@pytest.mark.parametrize("a", [0.5, 1e-3])
@pytest.mark.parametrize("gradient", [Backsolve(), Checkpointed(), Quadrature()], ids=repr)
def test_switched_off_forcing_gets_its_gradient(gradient, a):
    """θ = 0 switches the forcing off: y only decays (slowly, a → 0), so neither the forward
    nor the (y, a_y) backward solve sees sin(ω t), and the seminorm's steps are long; the
    θ-integrand a_y sin(ω t) oscillates 12 times within them. The seminorm's check must
    notice and redo the pass (against the closed form, and reported in stats)."""
    w, t_end = 40.0, 2.0
    theta = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    sol = solve(lambda t, y: -a * y + theta * torch.sin(w * t), torch.tensor([1.0], dtype=torch.float64),
                torch.tensor([0.0, t_end], dtype=torch.float64), gradient=gradient, params=[theta], rtol=1e-6, atol=1e-8)
    (g,) = torch.autograd.grad(sol.ys[-1].sum(), [theta])
    exact = _forced_decay_gradient(a, w, t_end)
    assert abs(g.item() - exact) < 1e-4 * abs(exact), (g.item(), exact)
    assert sol.stats["backward"]["seminorm_fallback"]
    assert sol.stats["backward"]["nfe"] > sol.stats["backward"]["seminorm_nfe"]


class TimeEmbeddedField(torch.nn.Module):
    """f(t, y) = tanh-MLP(y) + B [sin(k t)]_k, B initialised tiny: a learned fast time
    embedding that barely moves y yet has a large, oscillating weight gradient. y: (2, 3)."""

    def __init__(self, scale: float):
        super().__init__()
        torch.manual_seed(3)
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
        self.embed = torch.nn.Linear(len(K), 3, bias=False).double()
        with torch.no_grad():
            self.embed.weight.mul_(scale)

    def forward(self, t, y):
        return 0.1 * self.net(y) + self.embed(torch.sin(K * t))


def _time_embedded_gradients(gradient, scale: float):
    field = TimeEmbeddedField(scale)
    y0 = torch.tensor([[0.3, -0.2, 0.5], [1.0, 0.4, -0.7]], dtype=torch.float64)
    t = torch.tensor([0.0, 0.8, 2.0], dtype=torch.float64)
    # The reference: autograd through a tight solve whose steps are also capped, since with
    # B tiny the forward's own steps do not resolve sin(k t) either (Direct differentiates
    # the discrete solve: it would share the under-resolution).
    tight = dict(rtol=1e-10, atol=1e-12, max_step=0.01) if isinstance(gradient, Direct) else dict(rtol=1e-6, atol=1e-8)
    sol = solve(field, y0, t, gradient=gradient, **tight)
    grads = torch.autograd.grad(sol.ys.pow(2).sum(), list(field.parameters()))
    return torch.cat([g.reshape(-1) for g in grads]), sol.stats


@functools.lru_cache(maxsize=None)
def _time_embedded_reference(scale: float) -> torch.Tensor:
    return _time_embedded_gradients(Direct(), scale)[0]


@pytest.mark.parametrize("gradient", [Backsolve(), Checkpointed(), Quadrature()], ids=repr)
def test_tiny_time_embedding_weight_gradient_matches_direct(gradient):
    """A batched state, several outputs, a nonlinear field: the embedding's weights (1e-7 at
    initialisation) have a gradient that the seminorm's long steps under-resolve; checked
    against autograd through the solver at rtol 1e-10 and steps of at most 0.01. With ordinary weights (scale 1) the
    steps resolve sin(k t) for y's sake and the check must stay quiet."""
    want = _time_embedded_reference(1e-7)
    got, stats = _time_embedded_gradients(gradient, 1e-7)
    assert float((got - want).norm() / want.norm()) < 1e-4
    assert stats["backward"]["seminorm_fallback"]
    want = _time_embedded_reference(1.0)
    got, stats = _time_embedded_gradients(gradient, 1.0)
    assert float((got - want).norm() / want.norm()) < 1e-4
    assert not stats["backward"]["seminorm_fallback"]

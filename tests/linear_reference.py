"""The linear test problem ``dy/dt = A y`` and its exact gradients, shared by the
gradient-method tests: ``y(t_i) = expm(A (t_i - t_0)) y0``, and autograd through
``torch.linalg.matrix_exp`` differentiates that exact solution."""
import torch

D = torch.float64


def linear_problem(seed=0, n=3, times=(0.0, 0.4, 1.1, 2.0), scale=0.5):
    """``(A (n, n), y0 (n,), t (N,), w (N, n))``, all float64; A, y0 and t require grad.
    A's entries are ``scale`` times standard normal draws."""
    g = torch.Generator().manual_seed(seed)
    A = (scale * torch.randn(n, n, generator=g, dtype=D)).requires_grad_()
    y0 = torch.randn(n, generator=g, dtype=D, requires_grad=True)
    t = torch.tensor(times, dtype=D, requires_grad=True)
    w = torch.randn(len(times), n, generator=g, dtype=D)
    return A, y0, t, w


def exact_ys(A, y0, t):
    """y(t_i) = expm(A (t_i - t_0)) y0 (N, n), differentiable in A, y0 and t."""
    return torch.stack([torch.linalg.matrix_exp(A * (ti - t[0])) @ y0 for ti in t])


class LinearField(torch.nn.Module):
    """dy/dt = A y as a module with a trainable copy of ``a`` (n, n), for a batch of states
    (b, n): ``y(t) = y0 expm(A (t - t0))^T``."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.a = torch.nn.Parameter(a.clone())

    def forward(self, t, y):
        return y @ self.a.T


def analytic_grads(A, y0, t, w):
    """dL/d(y0, A, t) for L = Σ_i w_i · expm(A (t_i - t_0)) y0, by autograd through matrix_exp."""
    return torch.autograd.grad((exact_ys(A, y0, t) * w).sum(), (y0, A, t))

"""Gradients through the implicit (ESDIRK) solvers, against independent truth.

- a stiff linear system (eigenvalues -1 … -1e4, coupled): ``matrix_exp`` gives the exact
  loss, and autograd through ``matrix_exp`` the exact gradients for ``y0`` and the matrix;
- a nonlinear, mildly stiff Van der Pol oscillator: central finite differences of the
  loss in float64 at tight tolerance, and an explicit method's Direct gradient;
- Backsolve and Quadrature re-solve ``y`` backwards in time, which a stiff (contracting)
  forward makes unstable whatever the method: they are checked on a non-stiff system.
"""
import functools
import warnings

import pytest
import torch

import torchadjoint as ta

DT = torch.float64


def stiff_matrix():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=DT))
    a = (q * torch.tensor([-1.0, -30.0, -1e3, -1e4], dtype=DT)) @ q.T
    a[0, 1] += 0.3
    a[1, 0] -= 0.3
    return a


Y0 = torch.tensor([1.0, 0.5, -0.3, 0.2], dtype=DT)
W = torch.tensor([0.7, -1.2, 0.4, 2.0], dtype=DT)
TIMES = torch.tensor([0.0, 0.3, 1.0], dtype=DT)


def linear_gradients(a, gradient=None, method="kvaerno5", rtol=1e-7, atol=1e-10):
    """dL/dy0, dL/dA for L = Σ_i W·y(t_i); ``gradient=None``: the exact ones (matrix_exp)."""
    m = a.clone().requires_grad_(True)
    y0 = Y0.clone().requires_grad_(True)
    if gradient is None:
        ys = torch.stack([torch.linalg.matrix_exp(m * t) @ y0 for t in TIMES[1:]])
        stats = None
    else:
        sol = ta.solve(lambda t, y: m @ y, y0, TIMES, method=method, gradient=gradient, params=[m], rtol=rtol, atol=atol)
        ys, stats = sol.ys[1:], sol.stats
    (ys * W).sum().backward()
    return y0.grad, m.grad, stats


def relative(x, ref):
    return float((x - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("gradient", [ta.Direct(), ta.Checkpointed(checkpoints=8)], ids=repr)
def test_stiff_linear_against_matrix_exp(gradient):
    a = stiff_matrix()
    gy, ga, _ = linear_gradients(a)
    y, m, stats = linear_gradients(a, gradient)
    assert relative(y, gy) < 1e-5 and relative(m, ga) < 1e-5, (relative(y, gy), relative(m, ga))
    # An explicit method would need ~3000 steps here (stability bound 3.3/1e4 on [0, 1]).
    assert stats["forward"]["accepted"] < 150
    if isinstance(gradient, ta.Checkpointed):
        assert stats["backward"]["accepted"] < 300 and stats["backward"]["replay_error"] == 0.0
        # A good gradient: the discrete adjoint of the same steps agrees with it (the check
        # warns past 0.02; measured 7.6e-8 here).
        assert 0 < stats["backward"]["adjoint_mismatch"] < 1e-5, stats["backward"]["adjoint_mismatch"]


def van_der_pol_loss(mu, y0, gradient=None, method="kvaerno5", rtol=1e-8, atol=1e-10):
    def f(t, y):
        return torch.stack([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])

    t = torch.tensor([0.0, 0.5, 1.5], dtype=DT)
    kwargs = {} if gradient is None else dict(gradient=gradient)
    sol = ta.solve(f, y0, t, method=method, params=[mu], rtol=rtol, atol=atol, **kwargs)
    return (sol.ys[1:] ** 2).sum() + sol.ys[-1, 0]


MU0, VDP_Y0 = torch.tensor(5.0, dtype=DT), torch.tensor([2.0, 0.0], dtype=DT)


@functools.lru_cache(maxsize=None)
def van_der_pol_differences():
    """Central differences of the loss (dopri5 at rtol 1e-12: an independent solver)."""
    eps = 1e-5

    def loss(mu, y0):
        with torch.no_grad():
            return van_der_pol_loss(mu, y0, method="dopri5", rtol=1e-12, atol=1e-14)

    fd_mu = (loss(MU0 + eps, VDP_Y0) - loss(MU0 - eps, VDP_Y0)) / (2 * eps)
    fd_y = torch.stack([(loss(MU0, VDP_Y0 + eps * e) - loss(MU0, VDP_Y0 - eps * e)) / (2 * eps)
                        for e in torch.eye(2, dtype=DT)])
    return fd_mu, fd_y


@pytest.mark.parametrize("gradient", [ta.Direct(), ta.Checkpointed(checkpoints=8)], ids=repr)
def test_van_der_pol_against_finite_differences(gradient):
    mu, y0 = MU0.clone().requires_grad_(True), VDP_Y0.clone().requires_grad_(True)
    van_der_pol_loss(mu, y0, gradient).backward()
    fd_mu, fd_y = van_der_pol_differences()
    assert abs(float(mu.grad - fd_mu)) < 1e-5 * max(1.0, abs(float(fd_mu))), (mu.grad, fd_mu)
    assert torch.allclose(y0.grad, fd_y, rtol=1e-5, atol=1e-6), (y0.grad, fd_y)


@pytest.mark.parametrize("gradient", [ta.Backsolve(), ta.Quadrature(), ta.Direct(checkpoints=4)], ids=repr)
def test_every_gradient_method_on_a_non_stiff_system(gradient):
    a = torch.tensor([[-0.5, 1.0, 0.0, 0.0], [-1.0, -0.5, 0.0, 0.2], [0.0, 0.3, -1.0, 0.0], [0.1, 0.0, 0.0, -2.0]],
                     dtype=DT)
    gy, ga, _ = linear_gradients(a)
    y, m, stats = linear_gradients(a, gradient)
    # rtol 1e-7: global errors of some 1e-6 are the solver's, not the gradient method's.
    assert relative(y, gy) < 2e-5 and relative(m, ga) < 2e-5, (relative(y, gy), relative(m, ga))
    assert stats["backward"]["nfe"] > 0


def test_double_backward_is_refused_with_a_reason():
    mu = torch.tensor(2.0, dtype=DT, requires_grad=True)
    y0 = torch.tensor([1.0, 0.0], dtype=DT, requires_grad=True)
    loss = van_der_pol_loss(mu, y0, ta.Direct(), rtol=1e-6, atol=1e-8)
    with pytest.raises(RuntimeError, match="double backward through an implicit"):
        torch.autograd.grad(loss, mu, create_graph=True)


def test_loss_scale_scales_direct_gradients_exactly():
    # Direct differentiates the discrete solve: scaling the loss scales the gradient, and
    # changes no step (the forward does not see the loss).
    a = stiff_matrix()
    out = []
    for scale in (1e-8, 1e8):
        m = a.clone().requires_grad_(True)
        sol = ta.solve(lambda t, y: m @ y, Y0, TIMES, method="kvaerno5", gradient=ta.Direct(), params=[m],
                       rtol=1e-4, atol=1e-7)
        (scale * (sol.ys * W).sum()).backward()
        out.append((m.grad / scale, sol.stats["forward"]["accepted"]))
    assert out[0][1] == out[1][1]
    assert torch.allclose(out[0][0], out[1][0], rtol=1e-12, atol=0)


def relaxation_gradients(gradient, rtol, mu=30.0, y0=(2.0, 0.0), t_end=40.0):
    """(d Σ y(t_end) / d(μ, y0), stats) on Van der Pol (μ=30 from (2, 0): one relaxation
    jump, near t=22)."""
    mu = torch.tensor(mu, dtype=DT, requires_grad=True)
    y0 = torch.tensor(y0, dtype=DT, requires_grad=True)
    sol = ta.solve(lambda t, y: torch.stack([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]]), y0,
                   torch.tensor([0.0, t_end], dtype=DT), method="kvaerno5", params=[mu], rtol=rtol, atol=rtol,
                   gradient=gradient)
    sol.ys[1:].sum().backward()
    return torch.cat([mu.grad.view(1), y0.grad]), sol.stats


def test_checkpointed_follows_implicit_steps_through_a_relaxation_jump():
    # The forward's implicit steps are long across the jump; the cubic Hermite dense output
    # there is up to ~100× the tolerance off the steps' own solution, which put this
    # gradient 2.1 % off. y inside a step is now recovered by an implicit sub-step: 0.18 %.
    reference, _ = relaxation_gradients(ta.Direct(), rtol=1e-8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ta.AdjointMismatchWarning)  # a good gradient: no false alarm
        got, stats = relaxation_gradients(ta.Checkpointed(), rtol=1e-6)
    assert float((got - reference).norm() / reference.norm()) < 5e-3, (got, reference)
    # Measured 3.6e-3 (the discrete adjoint of these steps is the less accurate of the two).
    assert 0 < stats["backward"]["adjoint_mismatch"] < 0.01, stats["backward"]["adjoint_mismatch"]


# Van der Pol μ=1000 on its slow branch 17 time units before a relaxation jump (the state at
# t=790 of the solve from (2, 0), kvaerno5 at rtol 1e-10): a short instance of the one-jump
# horizon (t=1000 from (2, 0)) where Checkpointed at rtol 1e-6 was 3.9x off, silently.
STIFF_VDP = dict(mu=1000.0, y0=(1.1325208348746434, -0.004007050883861441), t_end=25.0)


def test_checkpointed_is_not_silently_wrong_past_a_stiff_relaxation_jump():
    # Checkpointed's continuous adjoint, linearised along a forward path only rtol-accurate
    # across the jump, is 3.2x off here (both its backward solve and its y(t) converged:
    # it is the forward tolerance). No error estimate sees it; the discrete adjoint of the
    # same steps, computed beside it, differs from it by 1.8 (relative): it must warn, or be
    # right. Reference: Direct at rtol 1e-9 (0.55 % from Direct at 1e-10).
    reference, _ = relaxation_gradients(ta.Direct(), rtol=1e-9, **STIFF_VDP)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, stats = relaxation_gradients(ta.Checkpointed(), rtol=1e-6, **STIFF_VDP)
    error = float((got - reference).norm() / reference.norm())
    warned = [str(w.message) for w in caught if issubclass(w.category, ta.AdjointMismatchWarning)]
    assert warned or error < 0.05, (error, got, reference)
    assert len(warned) == 1 and stats["backward"]["adjoint_mismatch"] > 0.5, (warned, stats["backward"])
    message = warned[0]
    assert "threshold 0.02" in message and "rtol" in message and "Direct()" in message, message
    # It names the segment across the jump (y[0] falls from about 1 to -2 near t=17).
    span = [float(x) for x in message.split("across t in [")[1].split("]")[0].split(",")]
    assert 10 < span[0] <= span[1] < 20, message


def test_checkpointed_mismatch_check_is_configurable():
    with pytest.raises(ValueError, match=r"mismatch_warning=\.\.\.\) must be a positive number or None, got 0"):
        ta.Checkpointed(mismatch_warning=0)
    a = torch.tensor([[-1.0, 0.5], [0.0, -50.0]], dtype=DT, requires_grad=True)
    y0 = torch.tensor([1.0, -0.5], dtype=DT, requires_grad=True)

    def run(gradient, method="kvaerno5"):
        sol = ta.solve(lambda t, y: a @ y, y0, torch.tensor([0.0, 0.5, 1.0], dtype=DT), method=method, params=[a],
                       rtol=1e-4, atol=1e-6, gradient=gradient)
        sol.ys.sum().backward()
        return sol.stats["backward"]

    # A threshold below what any solve reaches: the warning, with the value and where.
    match = r"differs from the discrete adjoint .* \(threshold 1e-15\); they parted most across t in \["
    with pytest.warns(ta.AdjointMismatchWarning, match=match):
        stats = run(ta.Checkpointed(mismatch_warning=1e-15))
    assert 0 < stats["adjoint_mismatch"] < 1e-3 and stats["mismatch_backprops"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", ta.AdjointMismatchWarning)
        assert "adjoint_mismatch" not in run(ta.Checkpointed(mismatch_warning=None))
        assert "adjoint_mismatch" not in run(ta.Checkpointed(), method="dopri5")  # explicit: not checked


def test_checkpointed_mismatch_does_not_judge_a_gradient_below_the_tolerance():
    # y' = k y + forcing, k = -200, to t = 2: y(2) forgets y0 (dL/dy0 = e^-400, a tiny number
    # by one adjoint and another by the other: a relative gap of 1, a false alarm before the
    # gap was measured against max(|g|, |g_d|, atol·scale)).
    k = torch.tensor(-200.0, dtype=DT, requires_grad=True)
    y0 = torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ta.AdjointMismatchWarning)
        sol = ta.solve(lambda t, y: k * y + torch.stack([torch.sin(t), 0 * t]), y0, torch.tensor([0.0, 2.0], dtype=DT),
                       method="kvaerno5", params=[k], rtol=1e-4, atol=1e-6, gradient=ta.Checkpointed())
        sol.ys[-1].sum().backward()
    assert float(y0.grad.abs().max()) < 1e-20 and abs(float(k.grad)) > 1e-6, (y0.grad, k.grad)
    assert sol.stats["backward"]["adjoint_mismatch"] < 1e-4, sol.stats["backward"]["adjoint_mismatch"]

"""Newton's linear solvers for the implicit methods: BatchedDense (block-diagonal Jacobian
over independent rows, batched LU) and Krylov (matrix-free GMRES with JVPs) give the answers
of the dense path, forward and gradients; a wrong batch assumption is an error, not a
silently wrong Jacobian; a GMRES that cannot converge shrinks the step or raises."""
import math

import pytest
import torch

import torchadjoint as ta
from torchadjoint.implicit import BatchedDense, Dense, Krylov
from torchadjoint.implicit.batched_jacobian import BatchedJacobianEvaluator
from torchadjoint.implicit.krylov import gmres
from torchadjoint.tableaux import METHODS

DT = torch.float64


def with_solver(spec, name="kvaerno5"):
    return METHODS[name].with_linear_solver(spec)


def batch_of_stiff_systems(b, m, seed=0):
    """Rows ``y_b' = A_b y_b - y_b³ + w cos t``: each A_b with eigenvalues spread over
    [-1e3, -1] (stiff), rotated; the rows never interact."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(b, m, m, generator=g, dtype=DT))
    eig = -torch.logspace(0, 3, m, dtype=DT).expand(b, m) * (1 + 0.1 * torch.rand(b, m, generator=g, dtype=DT))
    a = (q * eig[:, None, :]) @ q.transpose(1, 2)
    w = torch.tensor(2.0, dtype=DT)
    y0 = torch.randn(b, m, generator=g, dtype=DT)
    return a, w, y0


def batched_field(a, w):
    return lambda t, y: (a @ y[..., None])[..., 0] - y**3 + w * torch.cos(t)


# --- BatchedDense ----------------------------------------------------------------------

@pytest.mark.parametrize("gradient, spec", [(ta.Direct(), BatchedDense(4)), (ta.Checkpointed(), BatchedDense(4)),
                                            (ta.Checkpointed(), Krylov())],
                         ids=["direct-batched", "checkpointed-batched", "checkpointed-krylov"])
def test_batched_and_krylov_match_dense_forward_and_gradients(gradient, spec):
    """Direct (IFT through the solver's own factorisation) and Checkpointed (the backward
    solve uses the same linear solver on the adjoint dynamics) against the dense path."""
    a, w, y0 = batch_of_stiff_systems(4, 3)
    a, w, y0 = a.requires_grad_(), w.requires_grad_(), y0.requires_grad_()
    t = torch.tensor([0.0, 0.1, 0.3], dtype=DT)
    out = []
    for each in (Dense(), spec):
        sol = ta.solve(batched_field(a, w), y0, t, method=with_solver(each), rtol=1e-6, atol=1e-8,
                       gradient=gradient, params=[a, w])
        loss = (sol.ys * torch.linspace(-1, 1, 3, dtype=DT)).sum() + (sol.ys[-1] ** 2).sum()
        out.append((sol.ys.detach(), torch.autograd.grad(loss, (y0, a, w)), sol.stats["forward"]))
    (ys_d, g_d, st_d), (ys_b, g_b, st_b) = out
    assert st_b["steps"] == st_d["steps"] and st_b["njev"] == st_d["njev"]  # the same Newton, other algebra
    # Newton stops within its tolerance (1e-3 of the step's error tolerance) from either
    # exact algebra; Krylov's inexact linear solves (GMRES to 1e-3) take other iterates and
    # stop elsewhere within the solve's tolerance (measured: 2e-8 absolute at atol 1e-8).
    close = dict(rtol=1e-8, atol=1e-10) if isinstance(spec, BatchedDense) else dict(rtol=1e-6, atol=1e-7)
    assert torch.allclose(ys_b, ys_d, **close)
    for gb, gd in zip(g_b, g_d):
        assert torch.linalg.vector_norm(gb - gd) <= 1e-6 * torch.linalg.vector_norm(gd)


def test_batched_blocks_against_the_dense_jacobian_by_differences_too():
    a, w, y0 = batch_of_stiff_systems(4, 3, seed=1)
    f = batched_field(a, w)
    flat = lambda t, y: f(torch.tensor(t, dtype=DT), y.view(4, 3)).reshape(-1)  # noqa: E731
    y = y0.reshape(-1)
    dense = torch.func.jacrev(lambda x: flat(0.5, x))(y)
    auto = BatchedJacobianEvaluator(4)(flat, 0.5, y)
    diff_ev = BatchedJacobianEvaluator(4)
    diff_ev.mode = "differences"
    diffs = diff_ev(flat, 0.5, y)
    for b in range(4):
        block = dense[3 * b:3 * b + 3, 3 * b:3 * b + 3]
        assert torch.allclose(auto[b], block, rtol=1e-12, atol=1e-12)
        assert torch.allclose(diffs[b], block, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(dense) == sum(torch.count_nonzero(blk) for blk in auto)  # truly block-diagonal


def test_batched_large_state_uses_per_row_work():
    """(128, 16): the dense path forms a 2048² Jacobian per step (at (256, 32), 8192²:
    minutes per step on this machine, see benchmarks/bench_stiff.py); the block path does m
    probes. Counted, not timed: each Jacobian is one vectorised call of f plus one for the
    check, and the answer matches solving a few rows alone with the dense path."""
    a, w, y0 = batch_of_stiff_systems(128, 16, seed=2)
    f = batched_field(a, w)
    t = torch.tensor([0.0, 0.1], dtype=DT)
    calls = {"n": 0}

    def counted(t, y):
        calls["n"] += 1
        return f(t, y)

    sol = ta.solve(counted, y0, t, method=with_solver(BatchedDense(128)), rtol=1e-6, atol=1e-8)
    st = sol.stats["forward"]
    # Jacobians cost two calls each (coloured jacfwd and the check): nfe is steps + Newton + 2·njev.
    assert st["nfe"] <= st["steps"] + st["nsolve"] + 2 * st["njev"] + 2
    assert calls["n"] == st["nfe"]
    rows = [0, 97, 127]
    alone = ta.solve(batched_field(a[rows], w), y0[rows], t, method="kvaerno5", rtol=1e-10, atol=1e-12)
    assert torch.allclose(sol.ys[-1, rows], alone.ys[-1], rtol=1e-4, atol=1e-6)


def test_interacting_rows_are_refused_by_name():
    y0 = torch.randn(4, 3, dtype=DT)
    t = torch.tensor([0.0, 1.0], dtype=DT)
    coupled = lambda t, y: -50 * y + y.mean(0, keepdim=True)  # noqa: E731 - a batch mean couples the rows
    with pytest.raises(ValueError, match=r"BatchedDense\(batch_size=4\).*rows of the state interact"):
        ta.solve(coupled, y0, t, method=with_solver(BatchedDense(4)))
    with pytest.raises(ValueError, match=r"not a multiple of 5"):
        ta.solve(lambda t, y: -y, y0, t, method=with_solver(BatchedDense(5)))

    # Untraceable f (Python control flow on values): the blocks and the check by differences.
    def branchy(t, y):
        return -50 * y + (y.mean(0, keepdim=True) if float(y.sum()) < 1e9 else 0)

    with pytest.raises(ValueError, match="rows of the state interact"):
        ta.solve(branchy, y0, t, method=with_solver(BatchedDense(4)))

    # A dict state whose leaves are (4, 1) and (4, 2): flattened leaf after leaf, not row by
    # row, so the blocks would pair the wrong entries; the check catches it.
    state = {"p": torch.randn(4, 1, dtype=DT), "q": torch.randn(4, 2, dtype=DT)}
    f = lambda t, s: {"p": -30 * s["p"] + s["q"][:, :1], "q": -s["q"] + s["p"]}  # noqa: E731
    with pytest.raises(ValueError, match="rows of the state interact"):
        ta.solve(f, state, t, method=with_solver(BatchedDense(4)))


def test_batched_differences_when_f_cannot_be_traced():
    a, w, y0 = batch_of_stiff_systems(5, 4, seed=3)
    f = batched_field(a, w)

    def branchy(t, y):  # data-dependent Python: torch.func cannot trace it
        return f(t, y) if float(y.abs().max()) < 1e9 else f(t, y) * 2

    t = torch.tensor([0.0, 1.0], dtype=DT)
    ref = ta.solve(f, y0, t, method="kvaerno5", rtol=1e-8, atol=1e-10)
    sol = ta.solve(branchy, y0, t, method=with_solver(BatchedDense(5)), rtol=1e-8, atol=1e-10)
    assert torch.allclose(sol.ys, ref.ys, rtol=1e-6, atol=1e-9)


def test_specs_validate_their_arguments():
    with pytest.raises(ValueError, match=r"BatchedDense\(batch_size=...\)"):
        BatchedDense(0)
    with pytest.raises(ValueError, match=r"Krylov\(rtol=...\)"):
        Krylov(rtol=2.0)
    with pytest.raises(ValueError, match=r"Krylov\(restart=...\)"):
        Krylov(restart=0)
    with pytest.raises(TypeError, match="linear_solver must be"):
        METHODS["kvaerno3"].with_linear_solver("dense")
    assert METHODS["kvaerno3"].with_linear_solver(None).linear_solver == Dense()


# --- Krylov ----------------------------------------------------------------------------

def diffusion_problem(n=200):
    """``u_t = u_xx - u³`` on (0, 1), u = 0 at both ends, n interior points: second
    differences make it stiff (eigenvalues down to about -4n²)."""
    dx = 1.0 / (n + 1)
    x = torch.linspace(dx, 1 - dx, n, dtype=DT)
    d = torch.tensor(1.0, dtype=DT)

    def f(t, u):
        padded = torch.nn.functional.pad(u, (1, 1))
        return d * (padded[2:] - 2 * u + padded[:-2]) / dx**2 - u**3

    return f, torch.sin(math.pi * x) + 0.5 * torch.sin(5 * math.pi * x), d


def test_krylov_matches_dense_on_a_discretised_diffusion():
    f, u0, _ = diffusion_problem(200)
    t = torch.tensor([0.0, 0.002, 0.01], dtype=DT)
    dense = ta.solve(f, u0, t, method="kvaerno3", rtol=1e-6, atol=1e-8)
    krylov = ta.solve(f, u0, t, method=with_solver(Krylov(), "kvaerno3"), rtol=1e-6, atol=1e-8)
    scale = dense.ys.abs().max()
    assert (krylov.ys - dense.ys).abs().max() <= 1e-6 * scale
    st = krylov.stats["forward"]
    assert st["njvp"] > 0 and st["krylov_failures"] == 0
    assert st["steps"] <= 2 * dense.stats["forward"]["steps"]  # inexact Newton costs few extra steps


def test_krylov_preconditioner_cuts_products_and_keeps_the_answer():
    """The exact inverse of the diffusion part, I - γh L (L the second differences), as a
    right preconditioner: GMRES then only sees the cubic term's small perturbation."""
    n = 200
    f, u0, _ = diffusion_problem(n)
    dx = 1.0 / (n + 1)
    lap = (torch.diag(torch.full((n,), -2.0, dtype=DT)) + torch.diag(torch.ones(n - 1, dtype=DT), 1)
           + torch.diag(torch.ones(n - 1, dtype=DT), -1)) / dx**2
    built = []

    def diffusion_inverse(t, y, gamma_h):
        built.append(gamma_h)
        lu = torch.linalg.lu_factor(torch.eye(n, dtype=DT) - gamma_h * lap)
        return lambda r: torch.linalg.lu_solve(*lu, r[:, None])[:, 0]

    t = torch.tensor([0.0, 0.002, 0.01], dtype=DT)
    plain = ta.solve(f, u0, t, method=with_solver(Krylov(), "kvaerno3"), rtol=1e-6, atol=1e-8)
    pre = ta.solve(f, u0, t, method=with_solver(Krylov(preconditioner=diffusion_inverse), "kvaerno3"),
                   rtol=1e-6, atol=1e-8)
    assert len(built) == pre.stats["forward"]["nlu"]  # once per (step start, step size)
    assert (pre.ys - plain.ys).abs().max() <= 1e-6 * plain.ys.abs().max()
    # Measured 754 against 1890: about 3 per solve (one after each GMRES pass checks the true residual).
    assert pre.stats["forward"]["njvp"] * 2 < plain.stats["forward"]["njvp"]
    with pytest.raises(TypeError, match=r"Krylov\(preconditioner=...\)"):
        Krylov(preconditioner="jacobi")


def test_krylov_direct_gradients_match_dense():
    f0, u0, _ = diffusion_problem(30)
    u0 = u0.clone().requires_grad_()
    d = torch.tensor(1.0, dtype=DT, requires_grad=True)

    def f(t, u):
        return d * f0(t, u) + (1 - d) * (-u**3)  # d scales the diffusion (d = 1: the same field)

    t = torch.tensor([0.0, 0.01], dtype=DT)
    grads = []
    for spec in (Dense(), Krylov()):
        sol = ta.solve(f, u0, t, method=with_solver(spec), rtol=1e-7, atol=1e-9, gradient=ta.Direct())
        loss = (sol.ys[-1] * torch.linspace(0, 1, 30, dtype=DT)).sum()
        grads.append(torch.autograd.grad(loss, (u0, d)))
    for gk, gd in zip(*grads):
        assert torch.linalg.vector_norm(gk - gd) <= 1e-6 * torch.linalg.vector_norm(gd)


def test_krylov_that_cannot_converge_shrinks_the_step_or_raises():
    f, u0, _ = diffusion_problem(40)
    t = torch.tensor([0.0, 0.02], dtype=DT)
    ref = ta.solve(f, u0, t, method="kvaerno3", rtol=1e-6, atol=1e-8)
    # Two products per linear solve: GMRES fails on big steps; the steps shrink until it
    # does not. The answer stays right (or the solve raises; never a silent step).
    try:
        sol = ta.solve(f, u0, t, method=with_solver(Krylov(max_iterations=3), "kvaerno3"), rtol=1e-6, atol=1e-8)
    except ta.SolveError as err:
        assert "Newton" in str(err)
    else:
        st = sol.stats["forward"]
        assert st["krylov_failures"] > 0 and st["newton_failures"] > 0
        assert (sol.ys - ref.ys).abs().max() <= 1e-4 * ref.ys.abs().max()


def test_gmres_solves_and_reports_failure():
    g = torch.Generator().manual_seed(0)
    a = torch.eye(50, dtype=DT) * 3 + torch.randn(50, 50, generator=g, dtype=DT) / 10
    b = torch.randn(50, generator=g, dtype=DT)
    x, products, ok = gmres(lambda v: a @ v, b, 1e-10, restart=20, max_iterations=200)
    assert ok and torch.linalg.vector_norm(a @ x - b) <= 1e-10 * torch.linalg.vector_norm(b)
    _, products, ok = gmres(lambda v: a @ v, b, 1e-12, restart=2, max_iterations=4)
    assert not ok and products <= 6
    x, products, ok = gmres(lambda v: a @ v, torch.zeros(50, dtype=DT), 1e-10, 20, 200)
    assert ok and products == 0 and not x.any()


@pytest.mark.parametrize("spec", [BatchedDense(3), Krylov()], ids=["batched", "krylov"])
def test_float32_reversed_times_and_devices(spec):
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        a = torch.tensor([[1.0, 0.5], [0.0, 100.0]], device=device)  # decays backwards in time: stiff reversed
        y0 = torch.tensor([[1.0, 2.0], [0.5, -1.0], [3.0, 0.0]], device=device)
        t = torch.tensor([1.0, 0.4, 0.0], device=device)
        sol = ta.solve(lambda t, y: y @ a.T, y0, t, method=with_solver(spec), rtol=1e-4, atol=1e-6)
        exact = torch.stack([y0 @ torch.linalg.matrix_exp(a * (s - 1.0)).T for s in t.tolist()])
        assert sol.ys.dtype == torch.float32 and sol.ys.device.type == device
        assert torch.allclose(sol.ys, exact, rtol=1e-3, atol=1e-3)

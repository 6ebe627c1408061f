"""Backsolve (continuous adjoint, y re-solved backwards): gradients against independent truth
(matrix_exp solutions of linear ODEs, finite differences, autograd through the solver), the
one-solve backward pass with jumps, its statistics, memory, and its errors."""
import math
import warnings

import pytest
import torch
from torch import nn

import torchadjoint as ta
from torchadjoint import Backsolve, Direct, ReconstructionWarning, solve

from linear_reference import exact_ys, linear_problem

D = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


def rel(a, b):
    return float((a - b).norm() / b.norm())


class MLP(nn.Module):
    def __init__(self, n=3, hidden=8, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.l1 = nn.Linear(n, hidden).double()
        self.l2 = nn.Linear(hidden, n).double()

    def forward(self, t, y):
        return self.l2(torch.tanh(self.l1(y))) * torch.cos(t)


def compare(f, y0, t, loss, params=None, tol=1e-7, gradient=None, leaves=None, **options):
    """Gradients of loss(solve(...).ys) by Backsolve against Direct (autograd through the solver)."""
    opts = {**TOL, **options}
    leaves = leaves if leaves is not None else [y0, t] + list(params or f.parameters())
    out = []
    for g in (gradient or Backsolve(), Direct()):
        sol = solve(f, y0, t, gradient=g, params=params, **opts)
        out.append((torch.autograd.grad(loss(sol.ys), leaves, allow_unused=True), sol))
    (got, sol), (want, _) = out
    for a, b in zip(got, want):
        if b is None:  # unused by f: autograd says None, the adjoint a zero gradient
            assert a is not None and not a.any()
        else:
            assert rel(a, b) <= tol if b.norm() > 0 else float(a.norm()) == 0.0, rel(a, b)
    return sol


# --- truth: analytic gradients of linear ODEs ------------------------------------------------


@pytest.mark.parametrize("many", [False, True], ids=["final-output", "many-outputs"])
def test_linear_ode_gradients_match_matrix_exp(many):
    A, y0, t, w = linear_problem(scale=0.6, times=(0.0, 0.3, 0.7, 1.2, 2.0))
    f = lambda t, y: A @ y

    def loss(ys):
        return (w * ys).sum() + (ys**2).sum() if many else (w[-1] * ys[-1]).sum() + (ys[-1] ** 2).sum()

    sol = solve(f, y0, t, params=[A], **TOL)
    got = torch.autograd.grad(loss(sol.ys), (y0, A, t))
    want = torch.autograd.grad(loss(exact_ys(A, y0, t)), (y0, A, t))
    for a, b in zip(got, want):
        assert rel(a, b) < 1e-8, rel(a, b)
    assert sol.stats["backward"]["steps"] > 0


def test_linear_ode_decreasing_time_matches_matrix_exp():
    A, y0, t, w = linear_problem(seed=1, scale=0.6, times=(2.0, 1.5, 0.4, -0.5))
    f = lambda t, y: A @ y
    sol = solve(f, y0, t, params=[A], **TOL)
    loss = lambda ys: (w * ys).sum() + (ys[1:] ** 2).sum()
    got = torch.autograd.grad(loss(sol.ys), (y0, A, t))
    want = torch.autograd.grad(loss(exact_ys(A, y0, t)), (y0, A, t))
    for a, b in zip(got, want):
        assert rel(a, b) < 1e-8, rel(a, b)


def test_gradcheck_finite_differences():
    g = torch.Generator().manual_seed(3)
    W = (0.5 * torch.randn(2, 2, generator=g, dtype=D)).requires_grad_()
    y0 = torch.randn(2, generator=g, dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=D, requires_grad=True)

    def fn(y0, W, t):
        f = lambda s, y: torch.tanh(W @ y) + 0.1 * s * y
        return solve(f, y0, t, params=[W], rtol=1e-12, atol=1e-12).ys

    assert torch.autograd.gradcheck(fn, (y0, W, t), eps=1e-6, atol=1e-6, rtol=1e-5)


# --- agreement with autograd through the solver ----------------------------------------------


def test_nonlinear_time_dependent_many_outputs_matches_direct():
    f = MLP()
    y0 = torch.randn(4, 3, dtype=D, requires_grad=True)
    t = torch.linspace(0.0, 2.0, 9, dtype=D, requires_grad=True)
    w = torch.randn(9, 4, 3, dtype=D)
    compare(f, y0, t, lambda ys: (w * torch.sin(ys)).sum())


def test_decreasing_time_and_loss_on_start_matches_direct():
    f = MLP(seed=1)
    y0 = torch.randn(3, dtype=D, requires_grad=True)
    t = torch.tensor([1.5, 1.0, 0.2, -0.4], dtype=D, requires_grad=True)
    # The loss looks at y(t_0) itself too: that part goes to y0 directly, not into dL/dt_0.
    compare(f, y0, t, lambda ys: (ys[0] ** 3).sum() + (ys[2:] ** 2).sum())


def test_zero_gradient_outputs_are_skipped_and_last_output_unused():
    f = MLP(seed=2)
    y0 = torch.randn(2, 3, dtype=D, requires_grad=True)
    t = torch.linspace(0.0, 3.0, 7, dtype=D, requires_grad=True)
    # Only outputs 2 and 4 matter: the backward solve starts at t_4 and lands on t_2 only.
    sol = compare(f, y0, t, lambda ys: (ys[2] ** 2).sum() + ys[4].sum())
    all_sol = solve(f, y0, t, **TOL)
    all_sol.ys.pow(2).sum().backward()
    assert sol.stats["backward"]["steps"] < all_sol.stats["backward"]["steps"]


def test_only_y0_looked_at_gives_its_gradient_without_a_solve():
    f = MLP(seed=3)
    y0 = torch.randn(3, dtype=D, requires_grad=True)
    t = torch.linspace(0.0, 1.0, 3, dtype=D)
    sol = solve(f, y0, t, **TOL)
    (g,) = torch.autograd.grad(sol.ys[0].sum(), (y0,))
    assert torch.equal(g, torch.ones(3, dtype=D))
    assert sol.stats["backward"]["nfe"] == 0


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_pytree_state_matches_direct(kind):
    g = torch.Generator().manual_seed(4)
    W = (0.5 * torch.randn(3, 2, generator=g, dtype=D)).requires_grad_()
    q0 = torch.randn(2, generator=g, dtype=D, requires_grad=True)
    p0 = torch.randn(3, generator=g, dtype=D, requires_grad=True)

    def f(t, state):
        q, p = (state if kind == "tuple" else (state["q"], state["p"]))
        dq, dp = W.T @ torch.tanh(p), -W @ q * (1 + t)
        return (dq, dp) if kind == "tuple" else {"q": dq, "p": dp}

    y0 = (q0, p0) if kind == "tuple" else {"q": q0, "p": p0}
    t = torch.tensor([0.0, 0.6, 1.3], dtype=D, requires_grad=True)

    def loss(ys):
        q, p = ys if kind == "tuple" else (ys["q"], ys["p"])
        return (q**2).sum() + p[1:].sum()

    compare(f, y0, t, loss, params=[W], leaves=[q0, p0, W, t])


def test_unused_and_shared_parameters():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(5)
            self.lin = nn.Linear(3, 3).double()
            self.unused = nn.Parameter(torch.ones(4, dtype=D))
            self.frozen = nn.Parameter(torch.ones(3, dtype=D), requires_grad=False)

        def forward(self, t, y):
            return -self.lin(torch.tanh(self.lin(y))) + self.frozen * 0.1

    f = Shared()
    y0 = torch.randn(3, dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=D)
    trainable = [p for p in f.parameters() if p.requires_grad]
    compare(f, y0, t, lambda ys: (ys**2).sum(), leaves=[y0] + trainable)
    f.zero_grad()
    solve(f, y0, t, **TOL).ys.sum().backward()
    assert torch.equal(f.unused.grad, torch.zeros(4, dtype=D))  # unused: zero, not None
    assert f.frozen.grad is None


def test_gradient_flows_into_upstream_network():
    torch.manual_seed(6)
    encoder = nn.Linear(5, 3).double()
    f = MLP(seed=6)
    x = torch.randn(4, 5, dtype=D)
    t = torch.tensor([0.0, 1.0], dtype=D)
    grads = []
    for g in (Backsolve(), Direct()):
        encoder.zero_grad()
        f.zero_grad()
        ys = solve(f, encoder(x), t, gradient=g, **TOL).ys
        (ys[-1] ** 2).sum().backward()
        grads.append([p.grad.clone() for p in list(encoder.parameters()) + list(f.parameters())])
    for a, b in zip(*grads):
        assert rel(a, b) < 1e-7


def test_non_leaf_declared_param_passes_gradient_on():
    log_k = torch.tensor([0.1, -0.3], dtype=D, requires_grad=True)
    k = log_k.exp()  # a declared param computed from a leaf
    y0 = torch.tensor([1.0, 2.0], dtype=D)
    t = torch.tensor([0.0, 1.0], dtype=D)
    ys = solve(lambda t, y: -k * y, y0, t, params=[k], **TOL).ys
    (g,) = torch.autograd.grad(ys[-1].sum(), (log_k,))
    # y(1) = y0 exp(-k): d/dlog_k = -k y0 exp(-k)
    want = -k.detach() * y0 * torch.exp(-k.detach())
    assert rel(g, want) < 1e-8


# --- the backward solve: one solve, jumps without re-evaluation, options ---------------------


def test_one_backward_solve_reuses_the_last_stage_at_jumps():
    """dopri5 (6 new stages a step): every f call is accounted for by steps, the start
    (f0 and the initial-step probe) and resets; jumps cost a VJP, not an f call."""
    calls = {"n": 0}
    lin = MLP(seed=7)

    def f(t, y):
        calls["n"] += 1
        return lin(t, y)

    y0 = torch.randn(3, dtype=D, requires_grad=True)
    t = torch.linspace(0.0, 4.0, 41, dtype=D)
    for reset in (None, 0.0, 1.0):
        sol = solve(f, y0, t, params=list(lin.parameters()), gradient=Backsolve(reset_threshold=reset), rtol=1e-6, atol=1e-8)
        calls["n"] = 0
        (sol.ys**2).sum().backward()
        b = sol.stats["backward"]
        assert calls["n"] == b["nfe"]  # honest count
        assert b["nfe"] == 6 * b["steps"] + 2 + b["resets"]
        assert b["accepted"] >= 40  # lands on every output time ...
        landings = 39
        if reset == 0.0:
            assert b["resets"] == landings
        if reset is None:
            assert b["resets"] == 0
        # ... one VJP per f call, plus one per jump that reused the last stage.
        assert b["nvjp"] == b["nfe"] + landings - b["resets"]


def test_reset_threshold_keeps_reconstruction_within_tolerance():
    # Contracting forwards: the backward re-solve of y drifts; resets at landings bound it.
    f = lambda t, y: torch.stack([-0.5 * y[0] + y[1] ** 2, -8.0 * y[1]])
    y0 = torch.tensor([1.0, 1.0], dtype=D, requires_grad=True)
    t = torch.linspace(0.0, 3.0, 31, dtype=D)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ReconstructionWarning)
        never = solve(f, y0, t, gradient=Backsolve(reset_threshold=None, reconstruction_error=None), rtol=1e-6, atol=1e-9)
        never.ys.sum().backward()
    auto = solve(f, y0, t, rtol=1e-6, atol=1e-9)
    auto.ys.sum().backward()
    assert auto.stats["backward"]["resets"] > 0
    assert auto.stats["backward"]["reconstruction_error_max"] < never.stats["backward"]["reconstruction_error_max"]


@pytest.mark.parametrize(
    "method, options, reset",
    [("dopri5", {}, 1.0), ("dopri5", {}, 0.0), ("bosh3", {}, 1.0), ("tsit5", dict(jump_t=[0.55]), 1.0), ("rk4", dict(step_size=0.05), 1.0)],
)
def test_parameter_adjoint_outside_the_state_is_the_same_computation(method, options, reset):
    """Under the seminorm a_θ is accumulated beside the solve with the step's own weights;
    a user norm equal to the seminorm carries it in the state instead: same numbers."""
    from torchadjoint.controller import rms_norm

    f = MLP(seed=15)
    y0 = torch.randn(2, 3, dtype=D, requires_grad=True)
    t = torch.linspace(0.0, 1.2, 7, dtype=D)
    w = torch.randn(7, 2, 3, dtype=D)
    same_as_seminorm = lambda parts: rms_norm(torch.cat(parts[:2]))
    out = []
    for norm in ("seminorm", same_as_seminorm):
        sol = solve(f, y0, t, method=method, gradient=Backsolve(norm=norm, reset_threshold=reset), rtol=1e-7, atol=1e-9, **options)
        out.append((torch.autograd.grad((w * sol.ys).sum(), [y0] + list(f.parameters())), sol.stats["backward"]))
    (fast, s_fast), (slow, s_slow) = out
    # Only the seminorm measures a_θ's error estimate (a user norm is the user's choice).
    assert s_slow["parameter_error"] == 0.0 and not s_fast["seminorm_fallback"]
    assert dict(s_fast, parameter_error=0.0) == s_slow
    for a, b in zip(fast, slow):
        assert rel(a, b) < 1e-12


@pytest.mark.parametrize("norm", ["full", "user"])
def test_backward_norm_options(norm):
    f = MLP(seed=8)
    y0 = torch.randn(2, 3, dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 1.0, 2.0], dtype=D)
    seen = []

    def user(parts):
        seen.append(tuple(x.shape[0] for x in parts))
        return torch.sqrt(sum((x**2).mean() for x in parts) / 3)

    gradient = Backsolve(norm="full" if norm == "full" else user)
    sol = compare(f, y0, t, lambda ys: (ys**2).sum(), gradient=gradient, tol=1e-6, leaves=[y0] + list(f.parameters()))
    semi = solve(f, y0, t, **TOL)
    (semi.ys**2).sum().backward()
    assert sol.stats["backward"]["steps"] >= semi.stats["backward"]["steps"]
    if norm == "user":
        n, p = 6, sum(x.numel() for x in f.parameters())
        assert seen and set(seen) == {(n, n, p)}


def test_separate_backward_tolerances_method_and_options():
    f = MLP(seed=9)
    y0 = torch.randn(3, dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=D)

    def run(gradient):
        sol = solve(f, y0, t, gradient=gradient, **TOL)
        return torch.autograd.grad(sol.ys[-1].sum(), (y0,))[0], sol.stats["backward"]

    want, _ = run(Direct())
    tight = run(Backsolve())
    loose = run(Backsolve(rtol=1e-5, atol=1e-7))
    bosh = run(Backsolve(method="bosh3", options=dict(first_step=0.01, max_num_steps=100000)))
    rk4 = run(Backsolve(method="rk4", options=dict(step_size=0.02)))
    assert rel(tight[0], want) < 1e-8
    assert 1e-8 < rel(loose[0], want) < 1e-4 and loose[1]["steps"] < tight[1]["steps"]
    assert rel(bosh[0], want) < 1e-7 and bosh[1]["steps"] > tight[1]["steps"]
    assert rel(rk4[0], want) < 1e-6 and rk4[1]["steps"] == 50
    with pytest.raises(Exception, match="max_num_steps"):
        run(Backsolve(options=dict(max_num_steps=3)))


def test_fixed_step_forward_and_backward():
    A, y0, t, w = linear_problem(seed=10, scale=0.6, times=(0.0, 0.5, 1.0))
    f = lambda t, y: A @ y
    sol = solve(f, y0, t, params=[A], method="rk4", step_size=0.01)
    got = torch.autograd.grad((w * sol.ys).sum(), (y0, A))
    want = torch.autograd.grad((w * exact_ys(A, y0, t)).sum(), (y0, A))
    for a, b in zip(got, want):
        assert rel(a, b) < 1e-7  # O(h^4)


def test_backward_respects_discontinuities_of_f():
    # f jumps at t = 0.5: the backward solve restarts there as the forward did.
    k = torch.tensor([0.7, -0.4], dtype=D, requires_grad=True)
    f = lambda t, y: torch.where(t < 0.5, k[0], k[1]) * y
    y0 = torch.tensor([1.0, -2.0], dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=D)
    sol = solve(f, y0, t, params=[k], jump_t=[0.5], **TOL)
    got = torch.autograd.grad(sol.ys[-1].sum(), (y0, k))
    # y(1) = y0 exp(0.5 k0 + 0.5 k1)
    e = math.exp(0.5 * (0.7 - 0.4))
    want_y0 = torch.full((2,), e, dtype=D)
    want_k = torch.full((2,), 0.5 * e * float(y0.detach().sum()), dtype=D)
    assert rel(got[0], want_y0) < 1e-8 and rel(got[1], want_k) < 1e-8


# --- statistics, reconstruction check, memory -----------------------------------------------


def test_contracting_dynamics_warn_and_name_the_alternatives():
    # Forwards y2 decays like exp(-30 t): backwards its error grows like exp(30 t).
    f = lambda t, y: torch.stack([-y[0], -30.0 * y[1] + y[0] ** 2])
    y0 = torch.tensor([1.0, 1.0], dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 0.6], dtype=D)
    sol = solve(f, y0, t, rtol=1e-6, atol=1e-9)
    with pytest.warns(ReconstructionWarning, match=r"Checkpointed\(\).*Direct\(\)"):
        sol.ys.sum().backward()
    assert sol.stats["backward"]["reconstruction_error"] > 100
    for quiet in (Backsolve(reconstruction_warning=None), Backsolve(reconstruction_warning=1e30)):
        sol = solve(f, y0, t, gradient=quiet, rtol=1e-6, atol=1e-9)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sol.ys.sum().backward()
        assert sol.stats["backward"]["reconstruction_error"] > 100


def test_stats_on_the_solution():
    f = MLP(seed=11)
    y0 = torch.randn(3, dtype=D, requires_grad=True)
    sol = solve(f, y0, torch.tensor([0.0, 1.0], dtype=D), **TOL)
    assert sol.stats["backward"] is None
    sol.ys.sum().backward()
    b = sol.stats["backward"]
    assert set(b) >= {"nfe", "nvjp", "steps", "accepted", "rejected", "resets", "reconstruction_error", "reconstruction_error_max"}
    assert b["steps"] == b["accepted"] + b["rejected"] and b["nfe"] > 0
    assert 0 <= b["reconstruction_error"] < 100


def test_forward_keeps_only_the_outputs():
    """What autograd saves for backward does not grow with the number of steps."""

    def saved_numel(rtol):
        total = [0]

        def pack(x):
            total[0] += x.numel()
            return x

        f = MLP(seed=12)
        y0 = torch.randn(5, 3, dtype=D, requires_grad=True)
        t = torch.linspace(0.0, 3.0, 4, dtype=D)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            sol = solve(f, y0, t, rtol=rtol, atol=rtol)
        return total[0], sol.stats["forward"]["steps"]

    few, steps_few = saved_numel(1e-4)
    many, steps_many = saved_numel(1e-10)
    assert steps_many > 5 * steps_few
    # The outputs (N, n) and one evaluation's graph (the check for undeclared tensors).
    assert few == many < 4 * 15 + 200


# --- errors ---------------------------------------------------------------------------------


def test_double_backward_is_refused_clearly():
    f = MLP(seed=13)
    y0 = torch.randn(3, dtype=D, requires_grad=True)
    sol = solve(f, y0, torch.tensor([0.0, 1.0], dtype=D), **TOL)
    with pytest.raises(RuntimeError, match="double backward.*Direct"):
        torch.autograd.grad(sol.ys.sum(), y0, create_graph=True)


def test_undeclared_closure_tensor_is_an_error():
    W = torch.randn(2, 2, dtype=D, requires_grad=True)
    b = torch.randn(2, dtype=D, requires_grad=True)
    y0 = torch.randn(2, dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=D)
    f = lambda t, y: torch.tanh(W @ y) + b
    with pytest.raises(ValueError, match=r"params=\[\.\.\.\]"):
        solve(f, y0, t, params=[W])
    with pytest.raises(ValueError, match="2 tensor"):
        solve(f, y0, t)
    solve(f, y0, t, params=[W, b]).ys.sum().backward()  # declared: fine
    with torch.no_grad():
        solve(f, y0, t)  # no gradient wanted: no check
    solve(f, y0.detach(), t, params=[W, b], gradient=Direct())  # Direct reaches closures itself


def test_module_closing_over_an_outside_tensor_is_an_error():
    scale = torch.tensor(2.0, dtype=D, requires_grad=True)
    f = MLP(seed=14)
    g = lambda t, y: scale * f(t, y)
    y0 = torch.randn(3, dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=D)
    with pytest.raises(ValueError, match="shape \\(\\)"):
        solve(g, y0, t, params=list(f.parameters()))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(norm="l2"), ValueError, "norm"),
        (dict(options=[1]), TypeError, "options"),
        (dict(options=dict(stepsize=0.1)), ValueError, "unknown option"),
        (dict(options=dict(rtol=1e-3)), ValueError, r"Backsolve\(rtol=...\)"),
        (dict(method="nope"), ValueError, "method"),
        (dict(rtol=-1.0), ValueError, "rtol"),
        (dict(reconstruction_warning=0), ValueError, "reconstruction_warning"),
        (dict(reset_threshold=-1), ValueError, "reset_threshold"),
        (dict(reset_threshold="always"), ValueError, "reset_threshold"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        Backsolve(**kwargs)


def test_backsolve_ends_at_once_when_y_explodes_backwards_under_an_implicit_method():
    """Contracting dynamics explode backwards. An implicit method's steps are not pinned by
    stability, so the pace check never fired and the backward solve ran on for minutes
    (103 s to max_num_steps=20000) before its SolveError; it now ends as soon as the re-solved
    y outgrows the forward's states by a factor of 1000, naming Checkpointed and Direct."""
    a = torch.tensor([[-1.0, 0.0], [0.0, -1000.0]], dtype=torch.float64)
    theta = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([1.0, -0.5], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.01, 0.5, 2.0], dtype=torch.float64)
    for gradient in (ta.Backsolve(), ta.Quadrature()):  # Quadrature re-solves y backwards too (23 s before)
        sol = ta.solve(lambda s, y: theta * (a @ y), y0, t, method="kvaerno5", gradient=gradient, params=[theta],
                       rtol=1e-8, atol=1e-10, max_num_steps=20000)
        with pytest.raises(ta.SolveError, match="exploding backwards") as caught:
            sol.ys.sum().backward()
        assert caught.value.direction == "backward" and 0.0 < caught.value.t < 2.0
        assert "Checkpointed" in str(caught.value) and "Direct" in str(caught.value)

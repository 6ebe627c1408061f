"""The checkpointed adjoint: gradients against matrix_exp, finite differences and autograd
through the solver; exact replays; bounded checkpoints; options and errors."""
import operator

import pytest
import torch
from torch import nn

import torchadjoint
from torchadjoint import Checkpointed, Direct, solve
from torchadjoint.adjoint import GRADIENT_METHODS, gradient_method
from torchadjoint.adjoint.replay import ForwardSetup
from torchadjoint.options import SolverOptions
from torchadjoint.problem import Problem, make_flat_func
from torchadjoint.validation import check_state

from linear_reference import analytic_grads, linear_problem
from nonlinear_field import Field

D = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


def rel(a, b):
    return float((a - b).norm() / b.norm())



def solver_grads(gradient, A, y0, t, w, **options):
    sol = solve(lambda s, y: A @ y, y0, t, gradient=gradient, params=[A], **{**TOL, **options})
    return torch.autograd.grad((sol.ys * w).sum(), (y0, A, t)), sol


@pytest.mark.parametrize("checkpoints", [32, 3])
@pytest.mark.parametrize("direction", [1, -1])
def test_linear_gradients_match_matrix_exp(checkpoints, direction):
    A, y0, t, w = linear_problem(times=tuple(direction * x for x in (0.0, 0.4, 1.1, 2.0)))
    want = analytic_grads(A, y0, t, w)
    got, sol = solver_grads(Checkpointed(checkpoints=checkpoints), A, y0, t, w)
    for g, ref, name in zip(got, want, ("y0", "A", "t")):
        assert rel(g, ref) < 1e-7, name
    back = sol.stats["backward"]
    assert back["replay_error"] == 0.0  # the replays retook the forward's steps bitwise
    assert back["checkpoints"] <= checkpoints
    if checkpoints == 3:
        assert back["levels"] >= 2  # the segments were split again on the way back


def test_many_output_times_one_backward_solve():
    """200 outputs: the backward solve lands on each and carries its step on (no restarts)."""
    A, y0, t, w = linear_problem(times=tuple(torch.linspace(0, 3, 200).tolist()))
    want = analytic_grads(A, y0, t, w)
    got, sol = solver_grads(Checkpointed(), A, y0, t, w, rtol=1e-8, atol=1e-10)
    for g, ref, name in zip(got, want, ("y0", "A", "t")):
        assert rel(g, ref) < 1e-6, name
    back, fwd = sol.stats["backward"], sol.stats["forward"]
    # Restarting per interval would cost ≥ 200 initial-step selections and ~6 steps each.
    assert back["accepted"] < 260
    assert back["adjoint_nfe"] < 7 * back["steps"] + 2 * 200
    assert back["replay_nfe"] <= fwd["nfe"] + 10  # one replay of the forward's steps


def test_gradcheck_nonlinear():
    def run(y0, W, t):
        def f(s, y):
            return torch.tanh(W @ y) - 0.5 * y + 0.1 * s

        return solve(f, y0, t, gradient=Checkpointed(checkpoints=2), params=[W], rtol=1e-11, atol=1e-11).ys

    y0 = torch.tensor([0.3, -0.7], dtype=D, requires_grad=True)
    W = torch.tensor([[0.5, -1.0], [0.8, 0.2]], dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 0.6, 1.0], dtype=D)  # time gradients: against autograd and matrix_exp above
    assert torch.autograd.gradcheck(lambda y0, W: run(y0, W, t), (y0, W), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_nonlinear_time_gradients_and_upstream_network_match_direct():
    field = Field()
    encoder = nn.Linear(2, 3).to(D)
    x = torch.tensor([[0.5, -1.0], [1.5, 0.2]], dtype=D)
    t = torch.tensor([0.2, 0.7, 1.0, 1.6], dtype=D, requires_grad=True)
    params = [*field.parameters(), *encoder.parameters()]
    grads = {}
    for name, gradient in (("direct", Direct()), ("checkpointed", Checkpointed(checkpoints=4))):
        sol = solve(field, encoder(x), t, gradient=gradient, **TOL)
        loss = (sol.ys[1:] ** 2).sum() + sol.ys[-1, 0, 1]
        grads[name] = torch.autograd.grad(loss, [t, *params])
    for g, ref in zip(grads["checkpointed"], grads["direct"]):
        assert rel(g, ref) < 1e-7
    assert grads["checkpointed"][0][0] != 0  # dL/dt_0 is a real output


def test_pytree_state_matches_direct():
    k = torch.tensor(0.7, dtype=D, requires_grad=True)

    def f(t, state):
        return {"x": state["v"][0], "v": (-k * state["x"], -0.1 * state["v"][1])}

    y0 = {"x": torch.tensor([1.0, 0.5], dtype=D, requires_grad=True),
          "v": (torch.tensor([0.0, 0.2], dtype=D, requires_grad=True), torch.tensor([0.3], dtype=D, requires_grad=True))}
    t = torch.linspace(0, 2, 5, dtype=D)
    leaves = [y0["x"], *y0["v"], k]
    grads = {}
    for name, gradient in (("direct", Direct()), ("checkpointed", Checkpointed(checkpoints=3))):
        ys = solve(f, y0, t, gradient=gradient, params=[k], **TOL).ys
        loss = (ys["x"] ** 3).sum() + ys["v"][0].sum() + ys["v"][1][-1]
        grads[name] = torch.autograd.grad(loss, leaves)
    for g, ref in zip(grads["checkpointed"], grads["direct"]):
        assert rel(g, ref) < 1e-7


@pytest.mark.parametrize("method", ["rk4", "dopri8", "bosh3"])
def test_other_methods(method):
    """Fixed-step (the backward steps on the forward's grid; cubic Hermite needs f1), not
    FSAL (its dense output needs f1), FSAL with cubic Hermite."""
    A, y0, t, w = linear_problem()
    want = analytic_grads(A, y0, t, w)
    options = dict(step_size=0.02) if method == "rk4" else dict(rtol=1e-9, atol=1e-11)
    got, sol = solver_grads(Checkpointed(checkpoints=4), A, y0, t, w, method=method, **options)
    bound = 1e-6 if method == "bosh3" else 1e-7
    for g, ref, name in zip(got, want, ("y0", "A", "t")):
        assert rel(g, ref) < bound, name
    assert sol.stats["backward"]["replay_error"] == 0.0


@pytest.mark.parametrize("before", [operator.lt, operator.le], ids=["f(0.9)=B", "f(0.9)=A"])
def test_jump_t_discontinuity_matches_matrix_exp(before):
    """f switches from A y to B y at t = 0.9, whichever side f(0.9) itself takes. (With
    2 checkpoints a segment of the backward pass starts at 0.9.)"""
    A, y0, t, w = linear_problem(times=(0.0, 0.5, 1.5))
    B = (torch.eye(3, dtype=D) * -0.4 + 0.2 * A.detach()).requires_grad_()

    def f(s, y):
        return (A if before(float(s), 0.9) else B) @ y

    sol = solve(f, y0, t, gradient=Checkpointed(checkpoints=2), params=[A, B], jump_t=[0.9], **TOL)
    got = torch.autograd.grad((sol.ys * w).sum(), (y0, A, B))
    E = torch.linalg.matrix_exp
    ys = torch.stack([y0, E(A * 0.5) @ y0, E(B * 0.6) @ E(A * 0.9) @ y0])
    want = torch.autograd.grad((ys * w).sum(), (y0, A, B))
    for g, ref in zip(got, want):
        assert rel(g, ref) < 1e-7


@pytest.mark.parametrize("norm", ["full", lambda parts: parts[0].abs().max()])
def test_other_norms_and_backward_options(norm):
    A, y0, t, w = linear_problem()
    want = analytic_grads(A, y0, t, w)
    gradient = Checkpointed(norm=norm, rtol=1e-9, atol=1e-11, method="tsit5", options=dict(safety=0.8))
    got, _ = solver_grads(gradient, A, y0, t, w)
    for g, ref in zip(got, want):
        assert rel(g, ref) < 1e-6


def test_segments_cover_the_steps_in_bounded_pieces():
    """The replay machinery directly: segments of ≤ K steps, contiguous, last to first;
    at most K checkpoints alive per level; exact replays."""
    y0 = torch.tensor([1.0, 0.0, 0.5], dtype=D)
    flattener, dtype, device = check_state(y0)
    osc = torch.tensor([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, -0.1]], dtype=D)
    problem = Problem(lambda s, y: osc @ y, flattener, (0.0, 20.0), (), dtype, device)
    options = SolverOptions.build(rtol=1e-8, atol=1e-10)
    for capacity in (2, 5, 16, 1000):
        setup = ForwardSetup(problem, options, make_flat_func(problem), y0)
        with torch.no_grad():
            result, checkpoints, end = setup.forward(y0, capacity)
        assert len(checkpoints) <= capacity and checkpoints[0].step == 0 and checkpoints[0].t == 0.0
        setup.nfe = 0
        covered = end.step
        pieces = list(setup.segments(checkpoints, end, capacity))
        for start, stop, depth in pieces:
            assert stop.step == covered and 0 < stop.step - start.step <= capacity
            covered = start.step
        assert covered == 0
        assert setup.replay_error == 0.0
        levels = max(d for _, _, d in pieces)
        # Each level replays the forward's steps once more (no per-segment extra selection).
        assert setup.nfe <= (levels - 1) * (result.stats["nfe"] + len(pieces))
        if capacity == 1000:
            assert len(pieces) == 1 and levels == 1
        if capacity == 2:
            assert levels >= 4  # log2 of the number of steps


def test_nondeterministic_function_is_refused():
    A, y0, t, w = linear_problem()
    scale = [1.0]
    sol = solve(lambda s, y: scale[0] * (A @ y), y0, t, gradient=Checkpointed(checkpoints=2), params=[A], **TOL)
    scale[0] = 3.0  # f is not the function the forward solved any more
    with pytest.raises(RuntimeError, match="not deterministic"):
        (sol.ys * w).sum().backward()


def test_single_output_time_and_double_backward():
    A, y0, _, _ = linear_problem()
    sol = solve(lambda s, y: A @ y, y0, torch.tensor([0.0], dtype=D), gradient=Checkpointed(), params=[A])
    g_y0, g_A = torch.autograd.grad(sol.ys.sum(), (y0, A), allow_unused=True)
    assert torch.equal(g_y0, torch.ones(3, dtype=D)) and (g_A is None or not g_A.any())

    sol = solve(lambda s, y: A @ y, y0, torch.tensor([0.0, 1.0], dtype=D), gradient=Checkpointed(), params=[A])
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(sol.ys.sum(), y0, create_graph=True)


def test_registry_and_export():
    assert GRADIENT_METHODS["checkpointed"] is Checkpointed is torchadjoint.Checkpointed
    method = gradient_method("checkpointed", checkpoints=8)
    assert isinstance(method, Checkpointed) and method.checkpoints == 8
    assert "checkpoints=8" in repr(method)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(checkpoints=1), ValueError, "at least 2"),
        (dict(checkpoints=4.0), TypeError, "int"),
        (dict(checkpoints=True), TypeError, "int"),
        (dict(norm="max"), ValueError, "seminorm"),
        (dict(method="nope"), ValueError, "nope"),
        (dict(options=[1]), TypeError, "dict"),
        (dict(options=dict(step_size=0.1)), ValueError, "step_size"),
        (dict(rtol=-1.0), ValueError, "rtol"),
    ],
)
def test_bad_arguments(kwargs, error, words):
    A, y0, t, w = linear_problem()
    with pytest.raises(error, match=words):
        gradient = Checkpointed(**kwargs)
        solver_grads(gradient, A, y0, t, w)


@pytest.mark.parametrize("gradient", [Checkpointed(), Direct(checkpoints=4)], ids=repr)
def test_undeclared_tensor_is_refused(gradient):
    """Only declared params get gradients: f closing over another tensor that requires grad
    would silently get none, so it is refused."""
    A, y0, t, w = linear_problem()
    hidden = torch.ones(3, dtype=D, requires_grad=True)
    with pytest.raises(ValueError, match="params"):
        solve(lambda s, y: A @ y + hidden, y0, t, gradient=gradient, params=[A])

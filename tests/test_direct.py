"""Discretise-then-optimise with checkpoints: the same gradient as autograd through the
whole solve (Direct()), with the graph of at most K steps alive at a time."""
import pytest
import torch
from torch import nn

import torchadjoint
from torchadjoint import Direct, solve
from torchadjoint.adjoint import GRADIENT_METHODS, gradient_method

from linear_reference import linear_problem
from nonlinear_field import Field

D = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


def rel(a, b):
    return float((a - b).norm() / b.norm())




def grads_of(gradient, f, y0, t, params, loss, **options):
    sol = solve(f, y0, t, gradient=gradient, params=params, **{**TOL, **options})
    leaves = [y0, t, *(p for p in params if p.requires_grad)]
    return torch.autograd.grad(loss(sol.ys), leaves, allow_unused=True), sol


def assert_same_as_direct(f, y0, t, params, loss, checkpoints=(2, 5, 1000), tol=1e-10, **options):
    """Direct(checkpoints=K) against Direct() for each K; returns the K-runs' stats."""
    want, plain = grads_of(Direct(), f, y0, t, params, loss, **options)
    stats = {}
    for k in checkpoints:
        got, sol = grads_of(Direct(checkpoints=k), f, y0, t, params, loss, **options)
        assert torch.equal(sol.ys, plain.ys)  # the forward is the same computation
        for g, ref in zip(got, want):
            if ref is None:
                assert g is None or not g.any()
                continue
            assert rel(g, ref) <= tol, (k, rel(g, ref))
        assert sol.stats["backward"]["replay_error"] == 0.0
        assert sol.stats["backward"]["checkpoints"] <= k
        stats[k] = sol.stats
    return stats


@pytest.mark.parametrize("direction", [1, -1])
def test_linear_matches_direct_and_matrix_exp(direction):
    A, y0, t, w = linear_problem(times=tuple(direction * x for x in (0.0, 0.4, 1.1, 2.0)))
    stats = assert_same_as_direct(lambda s, y: A @ y, y0, t, [A], lambda ys: (ys * w).sum())
    assert stats[2]["backward"]["levels"] >= 3 and stats[1000]["backward"]["levels"] == 1
    ys = torch.stack([torch.linalg.matrix_exp(A * (ti - t[0])) @ y0 for ti in t])
    want = torch.autograd.grad((ys * w).sum(), (y0, t, A))
    got, _ = grads_of(Direct(checkpoints=3), lambda s, y: A @ y, y0, t, [A], lambda ys: (ys * w).sum())
    for g, ref in zip(got, want):
        assert rel(g, ref) < 1e-8


def test_nonlinear_network_time_gradients_upstream_and_many_outputs():
    field = Field()
    encoder = nn.Linear(2, 3).to(D)
    x = torch.tensor([[0.5, -1.0], [1.5, 0.2]], dtype=D)
    t = torch.linspace(0.1, 2.0, 60, dtype=D).requires_grad_()
    params = [*field.parameters(), *encoder.parameters()]

    def loss(ys):
        return (ys[1::3] ** 2).sum() + ys[-1, 0, 1]

    def run(gradient):
        sol = solve(field, encoder(x), t, gradient=gradient, rtol=1e-8, atol=1e-10)
        return torch.autograd.grad(loss(sol.ys), [t, *params]), sol

    want, _ = run(Direct())
    for k in (3, 64):
        got, sol = run(Direct(checkpoints=k))
        for g, ref in zip(got, want):
            assert rel(g, ref) <= 1e-10
    assert want[0][0] != 0


def test_pytree_state():
    k = torch.tensor(0.7, dtype=D, requires_grad=True)

    def f(t, state):
        return {"x": state["v"][0], "v": (-k * state["x"], -0.1 * state["v"][1] * t)}

    y0 = {"x": torch.tensor([1.0, 0.5], dtype=D, requires_grad=True),
          "v": (torch.tensor([0.0, 0.2], dtype=D, requires_grad=True), torch.tensor([0.3], dtype=D, requires_grad=True))}
    t = torch.linspace(0, 2, 5, dtype=D)
    leaves = [y0["x"], *y0["v"], k]
    grads = {}
    for name, gradient in (("direct", Direct()), ("segmented", Direct(checkpoints=3))):
        ys = solve(f, y0, t, gradient=gradient, params=[k], **TOL).ys
        loss = (ys["x"] ** 3).sum() + ys["v"][0].sum() + ys["v"][1][-1].sum()
        grads[name] = torch.autograd.grad(loss, leaves)
    for g, ref in zip(grads["segmented"], grads["direct"]):
        assert rel(g, ref) <= 1e-10


@pytest.mark.parametrize(
    "method, options",
    [
        ("rk4", dict(step_size=0.1)),  # outputs on grid points: the step's end state itself
        ("euler", dict(step_size=0.03)),
        ("dopri8", dict(rtol=1e-9, atol=1e-11)),  # not FSAL: the dense output needs f1
        ("bosh3", dict(rtol=1e-7, atol=1e-9, interpolation="linear")),
        ("adaptive_heun", dict(rtol=1e-4, atol=1e-6)),
    ],
)
def test_other_methods(method, options):
    A, y0, t, w = linear_problem(times=(0.0, 0.3, 0.35, 1.0))
    f = lambda s, y: torch.tanh(A @ y) + torch.sin(s)  # noqa: E731
    assert_same_as_direct(f, y0, t, [A], lambda ys: (ys * w).sum(), checkpoints=(2, 7), method=method, **options)


def test_jump_t_and_step_t():
    A, y0, t, w = linear_problem(times=(0.0, 0.5, 1.5))

    def f(s, y):
        return (A if float(s) < 0.9 else -A) @ y

    assert_same_as_direct(f, y0, t, [A], lambda ys: (ys * w).sum(), checkpoints=(2, 4), jump_t=[0.9], step_t=[0.2, 1.2])


def test_only_some_outputs_looked_at_and_unused_parameter():
    A, y0, t, w = linear_problem(times=tuple(torch.linspace(0, 3, 12).tolist()))
    unused = torch.ones(2, dtype=D, requires_grad=True)
    frozen = torch.ones(3, dtype=D)  # in params but needs no gradient
    f = lambda s, y: A @ y + 0 * frozen  # noqa: E731
    early = assert_same_as_direct(f, y0, t, [A, unused, frozen], lambda ys: ys[4].sum(), checkpoints=(2, 6))
    late = assert_same_as_direct(f, y0, t, [A, unused, frozen], lambda ys: ys[-1].sum(), checkpoints=(6,))
    # Segments after the last output the loss looks at are not replayed at all.
    assert early[6]["backward"]["nfe"] < 0.6 * late[6]["backward"]["nfe"]


def test_memory_graph_of_at_most_k_steps():
    """Saved-for-backward bytes: Direct() keeps every step's graph; with checkpoints the
    forward keeps none, and each replayed segment's graph is of at most K steps."""
    field = Field(n=4, hidden=16)
    y0 = torch.randn(8, 4, dtype=D, requires_grad=True)

    def peak_saved(gradient, t_end):
        live, peak = [0], [0]

        class Held:
            """A saved tensor, counted while autograd holds it."""

            def __init__(self, x):
                # detach: holding x itself would tie a saved output to its own node in a
                # cycle that outlives the graph.
                self.x, self.size = x.detach(), x.numel() * x.element_size()
                live[0] += self.size
                peak[0] = max(peak[0], live[0])

            def __del__(self):
                live[0] -= self.size

        with torch.autograd.graph.saved_tensors_hooks(Held, lambda held: held.x):
            sol = solve(field, y0, torch.tensor([0.0, t_end], dtype=D), gradient=gradient, rtol=1e-6, atol=1e-8)
            saved_forward = live[0]
            sol.ys[-1].pow(2).sum().backward()
        return saved_forward, peak[0], sol.stats["forward"]["accepted"]

    plain_short = peak_saved(Direct(), 1.0)
    plain_long = peak_saved(Direct(), 40.0)
    seg_short = peak_saved(Direct(checkpoints=8), 1.0)
    seg_long = peak_saved(Direct(checkpoints=8), 40.0)
    assert plain_long[2] > 8 * plain_short[2]  # many more steps
    assert plain_long[0] > 6 * plain_short[0]  # Direct(): the graph grows with the steps
    assert seg_short[0] == seg_long[0] == 0  # no graph kept by the forward
    # At most one segment's graph of ≤ K steps is alive at a time.
    per_step = plain_long[0] / plain_long[2]
    assert seg_long[1] <= 1.5 * 8 * per_step
    assert seg_long[1] < plain_long[0] / 3


def test_registry_repr_and_errors():
    assert GRADIENT_METHODS["direct"] is Direct is torchadjoint.Direct
    assert gradient_method("direct", checkpoints=4).checkpoints == 4
    assert repr(Direct()) == "Direct()" and repr(Direct(checkpoints=4)) == "Direct(checkpoints=4)"
    with pytest.raises(ValueError, match="at least 2"):
        Direct(checkpoints=1)
    with pytest.raises(TypeError, match="int"):
        Direct(checkpoints="8")


def test_double_backward_needs_the_full_graph():
    A, y0, t, w = linear_problem()
    t = t.detach()
    sol = solve(lambda s, y: A @ y, y0, t, gradient=Direct(), params=[A], **TOL)
    (g,) = torch.autograd.grad((sol.ys * w).sum(), y0, create_graph=True)
    assert torch.autograd.grad(g.sum(), A)[0].abs().sum() > 0
    sol = solve(lambda s, y: A @ y, y0, t, gradient=Direct(checkpoints=3), params=[A], **TOL)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad((sol.ys * w).sum(), y0, create_graph=True)


def test_double_backward_with_times_requiring_grad_is_refused():
    """dL/dt is computed without a graph: second derivatives with t requiring grad would
    silently miss the paths through t, so create_graph=True says so instead."""
    A, y0, t, w = linear_problem()
    t = t.detach().requires_grad_(True)
    sol = solve(lambda s, y: A @ y, y0, t, gradient=Direct(), params=[A], **TOL)
    with pytest.raises(RuntimeError, match=r"second derivatives \(a backward with create_graph=True\) are not supported when t requires grad.*t\.detach\(\)"):
        torch.autograd.grad((sol.ys * w).sum(), (y0, A, t), create_graph=True)
    # First derivatives are unaffected.
    sol = solve(lambda s, y: A @ y, y0, t, gradient=Direct(), params=[A], **TOL)
    assert all(g is not None for g in torch.autograd.grad((sol.ys * w).sum(), (y0, A, t)))

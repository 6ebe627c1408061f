"""The quadrature (Gauss) adjoint: gradients against matrix_exp, autograd through the solver
(Direct) and backsolve; jumps at many output times; Hermite steps that wait for their end
slope; no parameter VJP per stage; options and errors."""
import math

import pytest
import torch
from torch import nn

import torchadjoint
from torchadjoint import Backsolve, Direct, Quadrature, solve
from torchadjoint.adjoint import GRADIENT_METHODS, gradient_method
from torchadjoint.adjoint.quadrature import estimate_rule, gauss_legendre

from linear_reference import analytic_grads, linear_problem

D = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-12)


def rel(a, b):
    return float((a - b).norm() / b.norm()) if not (a.requires_grad or b.requires_grad) else rel(a.detach(), b.detach())



def linear_grads(gradient, A, y0, t, w, **options):
    sol = solve(lambda s, y: A @ y, y0, t, gradient=gradient, params=[A], **{**TIGHT, **options})
    return torch.autograd.grad((sol.ys * w).sum(), (y0, A, t)), sol


class Field(nn.Module):
    """Nonlinear, time-dependent, with parameters: f(t, y) = W2 tanh(W1 y + b t) + c."""

    def __init__(self, n=3, hidden=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.l1 = nn.Linear(n, hidden).double()
        self.l2 = nn.Linear(hidden, n).double()
        self.b = nn.Parameter(torch.randn(hidden, dtype=D))

    def forward(self, t, y):
        return self.l2(torch.tanh(self.l1(y) + self.b * t))


def field_grads(gradient, func, y0, t, w, **options):
    sol = solve(func, y0, t, gradient=gradient, **{**TIGHT, **options})
    loss = (sol.ys * w).sum() + (sol.ys[-1] ** 2).sum()
    inputs = (y0, t) + tuple(func.parameters())
    return torch.autograd.grad(loss, inputs), sol


def test_gauss_legendre_rule_is_exact_to_degree_2k_minus_1():
    for k in (1, 2, 3, 4):
        x, w = gauss_legendre(k)
        assert all(0 < v < 1 for v in x) and math.isclose(sum(w), 1.0)
        for degree in range(2 * k):
            assert math.isclose(sum(wi * xi**degree for xi, wi in zip(x, w)), 1 / (degree + 1), rel_tol=1e-12)


def test_estimate_rule_is_a_null_rule_of_degree_k_minus_1_with_a_node_of_its_own():
    # a_θ's error estimate: Gauss weights (0 at the extra node) minus a lower rule on the extra
    # node and all Gauss nodes but the last. It must vanish on polynomials the lower rule
    # integrates (degree <= k - 1), not beyond, and weigh the node the Gauss rule lacks.
    for k in (1, 2, 3, 4):
        x, w = gauss_legendre(k)
        nodes, null = estimate_rule(x, w)
        assert nodes[:k] == x and len(nodes) == len(null) == k + 1
        assert all(abs(nodes[k] - v) > 0.05 for v in x) and 0 < nodes[k] < 1
        lower = [wi - ni for wi, ni in zip(w + [0.0], null)]
        assert lower[k - 1] == 0.0 and abs(null[k]) > 0.1  # the last Gauss node left out, the extra one in
        for degree in range(k):
            assert abs(sum(ni * xi**degree for xi, ni in zip(nodes, null))) < 1e-13
            assert math.isclose(sum(li * xi**degree for xi, li in zip(nodes, lower)), 1 / (degree + 1), rel_tol=1e-12)
        assert abs(sum(ni * xi**k for xi, ni in zip(nodes, null))) > 1e-4


def test_registered_and_exported():
    assert GRADIENT_METHODS["quadrature"] is Quadrature
    assert isinstance(gradient_method("quadrature", nodes=2), Quadrature)
    assert torchadjoint.Quadrature is Quadrature


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3"])
def test_linear_matches_matrix_exp(method):
    A, y0, t, w = linear_problem()
    truth = analytic_grads(A, y0, t, w)
    # bosh3 is third order: a looser tolerance keeps its step count (and the test) small.
    options = dict(rtol=1e-8, atol=1e-10) if method == "bosh3" else {}
    got, sol = linear_grads(Quadrature(), A, y0, t, w, method=method, **options)
    for g, r in zip(got, truth):
        assert rel(g, r) < (1e-6 if method == "bosh3" else 1e-7)
    back = sol.stats["backward"]
    assert 1 <= back["quadrature_vjps"] <= back["accepted"]
    # K Gauss nodes per step and one more for a_θ's error estimate (estimate_rule).
    assert back["quadrature_nfe"] == back["accepted"] * (back["nodes"] + 1)


def test_decreasing_times_match_matrix_exp():
    A, y0, t, w = linear_problem(seed=1, times=(2.0, 1.5, 0.3, -0.5))
    truth = analytic_grads(A, y0, t, w)
    got, _ = linear_grads(Quadrature(), A, y0, t, w)
    for g, r in zip(got, truth):
        assert rel(g, r) < 1e-7


def test_nonlinear_many_outputs_agrees_with_direct_and_backsolve():
    func = Field()
    g = torch.Generator().manual_seed(3)
    y0 = torch.randn(4, 3, generator=g, dtype=D, requires_grad=True)  # batched state
    t = torch.linspace(0.0, 2.0, 60, dtype=D, requires_grad=True)
    w = torch.randn(60, 4, 3, generator=g, dtype=D)
    ref, _ = field_grads(Direct(), func, y0, t, w)
    quad, sol = field_grads(Quadrature(), func, y0, t, w)
    back, _ = field_grads(Backsolve(), func, y0, t, w)
    for q, b, r in zip(quad, back, ref):
        assert rel(q, r) < 1e-6
        assert rel(q, b) < 1e-6
    assert sol.stats["backward"]["reconstruction_error"] < 100


@pytest.mark.parametrize("method, step_size", [("rk4", 0.01), ("midpoint", 0.005)])
def test_fixed_step_hermite_steps_wait_for_their_end_slope(method, step_size):
    # rk4/midpoint are neither FSAL nor densely extended: each step's Hermite interpolant
    # needs f at its end, taken from the next step or evaluated before an output jump.
    func = Field(seed=1)
    y0 = torch.randn(3, dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 0.13, 0.5, 0.77, 1.0], dtype=D, requires_grad=True)
    w = torch.randn(5, 3, dtype=D)
    ref, _ = field_grads(Direct(), func, y0, t, w, method="dopri5")
    quad, sol = field_grads(Quadrature(), func, y0, t, w, method=method, step_size=step_size)
    back, _ = field_grads(Backsolve(), func, y0, t, w, method=method, step_size=step_size)
    tol = 1e-7 if method == "rk4" else 1e-3
    for q, b, r in zip(quad, back, ref):
        assert rel(q, r) < tol
        assert rel(q, b) < tol
    st = sol.stats["backward"]
    # One extra (y, a_y) evaluation per jump (4 output times before the end, t_0 included),
    # none for the steps in between.
    dynamics = st["nfe"] - st["quadrature_nfe"]
    assert dynamics == st["accepted"] * (4 if method == "rk4" else 2) + 4
    assert st["nvjp"] == dynamics + st["quadrature_vjps"] + st["estimate_vjps"]


def test_no_parameter_vjp_per_stage():
    func = Field()
    calls = [0]
    func.l2.weight.register_hook(lambda g: calls.__setitem__(0, calls[0] + 1))
    y0 = torch.randn(3, dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=D)
    sol = solve(func, y0, t, gradient=Quadrature(), **TIGHT)
    sol.ys[-1].sum().backward()
    st = sol.stats["backward"]
    # One parameter VJP per batched call of the nodes and one for its error estimate (a_θ's,
    # trust.ParameterErrorEstimate), plus the final gradient arriving at the leaf.
    assert st["estimate_vjps"] == st["quadrature_vjps"]
    assert calls[0] == st["quadrature_vjps"] + st["estimate_vjps"] + 1
    assert 1 <= st["quadrature_vjps"] < st["accepted"]
    # many stage VJPs, none for the weights
    assert st["nvjp"] - st["quadrature_vjps"] - st["estimate_vjps"] > 5 * st["accepted"]


def test_jump_t_discontinuity_matches_direct():
    k = torch.tensor([1.3, -0.4], dtype=D, requires_grad=True)

    def f(t, y):
        return torch.where(t < 0.6, -k[0] * y, k[1] * y + 0.5)

    y0 = torch.tensor([0.7, -1.2], dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=D)
    grads = {}
    for name, g in (("direct", Direct()), ("quad", Quadrature())):
        sol = solve(f, y0, t, gradient=g, params=[k], jump_t=[0.6], **TIGHT)
        grads[name] = torch.autograd.grad((sol.ys**2).sum(), (y0, k))
    for q, r in zip(grads["quad"], grads["direct"]):
        assert rel(q, r) < 1e-7


def test_only_requested_gradients_are_integrated():
    A, y0, t, w = linear_problem()
    A.requires_grad_(False)
    sol = solve(lambda s, y: A @ y, y0, t.detach(), gradient=Quadrature(), params=[A], **TIGHT)
    (gy0,) = torch.autograd.grad((sol.ys * w).sum(), (y0,))
    truth = torch.autograd.grad(
        sum((torch.linalg.matrix_exp(A * ti) @ y0 * wi).sum() for ti, wi in zip(t.detach(), w)), (y0,)
    )[0]
    assert rel(gy0, truth) < 1e-7
    assert sol.stats["backward"]["quadrature_vjps"] == 0


def test_single_output_time_and_unused_parameter():
    func = Field()
    extra = nn.Parameter(torch.ones(2, dtype=D))
    y0 = torch.randn(3, dtype=D, requires_grad=True)
    sol = solve(func, y0, torch.tensor([0.0], dtype=D), gradient=Quadrature())
    sol.ys.sum().backward()
    assert torch.equal(y0.grad, torch.ones(3, dtype=D))
    sol = solve(lambda t, y: func(t, y), y0, torch.tensor([0.0, 1.0], dtype=D), gradient=Quadrature(),
                params=list(func.parameters()) + [extra], **TIGHT)
    grads = torch.autograd.grad(sol.ys[-1].sum(), [extra, func.l1.weight])
    assert torch.equal(grads[0], torch.zeros(2, dtype=D)) and grads[1].abs().sum() > 0


def test_nodes_option_changes_accuracy_as_a_rule_should():
    # One node (midpoint rule) on the same steps is visibly less accurate than three: ~1400
    # tolerance units in all at rtol 1e-5. a_θ's error estimate sees that (it reads ~100, on
    # the edge of the redo at 100); three nodes read ~0.1. Either the one-node gradient is
    # kept and visibly worse, or the pass was redone and is then right.
    A, y0, t, w = linear_problem(times=(0.0, 2.0))
    truth = analytic_grads(A, y0, t, w)
    errs, back = {}, {}
    for k in (1, 3):
        got, sol = linear_grads(Quadrature(nodes=k), A, y0, t, w, rtol=1e-5, atol=1e-7)
        errs[k], back[k] = rel(got[1], truth[1]), sol.stats["backward"]
    assert errs[3] < 1e-4 and not back[3]["seminorm_fallback"]
    assert back[1]["parameter_error"] > 100 * back[3]["parameter_error"]
    if back[1]["seminorm_fallback"]:
        assert errs[1] < 1e-4
    else:
        assert errs[1] > 10 * errs[3]


def test_float32_and_module_gradients_flow_to_upstream_network():
    torch.manual_seed(0)
    encoder = nn.Linear(2, 3)
    field = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(5, 2)
    sol = solve(lambda t, y: field(y), encoder(x), torch.tensor([0.0, 1.0]), gradient=Quadrature(),
                params=list(field.parameters()), rtol=1e-6, atol=1e-8)
    sol.ys[-1].pow(2).mean().backward()
    q = [p.grad.clone() for p in list(encoder.parameters()) + list(field.parameters())]
    for p in list(encoder.parameters()) + list(field.parameters()):
        p.grad = None
    sol = solve(lambda t, y: field(y), encoder(x), torch.tensor([0.0, 1.0]), gradient=Direct(), rtol=1e-6, atol=1e-8)
    sol.ys[-1].pow(2).mean().backward()
    for a, p in zip(q, list(encoder.parameters()) + list(field.parameters())):
        assert rel(a, p.grad) < 1e-3


def test_double_backward_refused():
    A, y0, t, w = linear_problem()
    sol = solve(lambda s, y: A @ y, y0, t.detach(), gradient=Quadrature(), params=[A])
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(sol.ys.sum(), (A,), create_graph=True)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(nodes=0), "nodes"),
        (dict(nodes=2.5), "nodes"),
        (dict(norm="seminorm"), "norm"),
        (dict(method="nope"), "method"),
        (dict(options=[1]), "options"),
        (dict(reconstruction_warning=-1.0), "reconstruction_warning"),
        (dict(batching="stacked"), "batching"),
        (dict(chunk=0), "chunk"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Quadrature(**kwargs)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(options=dict(stepsize=0.1)), ValueError, "unknown option"),
        (dict(options=dict(rtol=1e-3)), ValueError, r"Quadrature\(rtol=...\)"),
        (dict(rtol=-1.0), ValueError, "rtol"),
    ],
)
def test_backward_settings_are_validated_at_construction(kwargs, error, match):
    # As Backsolve's and Checkpointed's (adjoint/settings.py): at construction, not at the first backward pass.
    with pytest.raises(error, match=match):
        Quadrature(**kwargs)


def test_drift_is_judged_against_the_backward_tolerance():
    """The re-solved y is the backward solve's product: a loose backward tolerance is not
    judged against the forward's tight one (the rule Backsolve has always followed)."""
    import warnings

    A, y0, t, w = linear_problem()
    for gradient in (Quadrature(rtol=1e-4, atol=1e-6), Backsolve(rtol=1e-4, atol=1e-6, reset_threshold=None)):
        sol = solve(lambda s, y: A @ y, y0, t, gradient=gradient, params=[A], rtol=1e-11, atol=1e-13)
        with warnings.catch_warnings():
            warnings.simplefilter("error", torchadjoint.ReconstructionWarning)
            (sol.ys * w).sum().backward()
        assert 0 < sol.stats["backward"]["reconstruction_error_max"] < 100, gradient


def test_contracting_dynamics_warn():
    A = torch.tensor([[-30.0, 0.0], [0.0, -1.0]], dtype=D, requires_grad=True)
    y0 = torch.tensor([1.0, 1.0], dtype=D, requires_grad=True)
    sol = solve(lambda s, y: A @ y, y0, torch.tensor([0.0, 3.0], dtype=D), gradient=Quadrature(), params=[A],
                rtol=1e-4, atol=1e-6)
    # Every digit of y lost: an error naming the alternatives (trust.py's policy) ...
    with pytest.raises(torchadjoint.SolveError, match=r"Quadrature.*Checkpointed\(\).*Direct\(\)"):
        sol.ys[-1].sum().backward()
    # ... or, opted out, a warning beside the number.
    sol = solve(lambda s, y: A @ y, y0, torch.tensor([0.0, 3.0], dtype=D), gradient=Quadrature(reconstruction_error=None),
                params=[A], rtol=1e-4, atol=1e-6)
    with pytest.warns(torchadjoint.ReconstructionWarning, match="Quadrature"):
        sol.ys[-1].sum().backward()


@pytest.mark.parametrize("batching", ["stack", "vmap"])
def test_batched_nodes_match_one_call_per_node(batching):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    y0 = torch.randn(5, 3, dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 0.7, 1.5], dtype=D)
    out = {}
    for mode in ("loop", batching):
        sol = solve(lambda s, y: net(y), y0, t, gradient=Quadrature(batching=mode, chunk=8), params=list(net.parameters()),
                    **TIGHT)
        out[mode] = torch.autograd.grad(sol.ys.pow(2).sum(), [y0] + list(net.parameters()))
        st = sol.stats["backward"]
        # chunk=8: a batched call once 8 nodes wait, i.e. every 2 steps of 3 Gauss nodes and the
        # error estimate's one; else one per step.
        expected = st["accepted"] if mode == "loop" else math.ceil(st["accepted"] / 2)
        assert st["quadrature_vjps"] == expected
    for a, b in zip(out["loop"], out[batching]):
        assert rel(b, a) < 1e-12


def test_vmap_handles_time_dependence_and_falls_back_when_f_cannot_be_vmapped():
    func = Field()
    y0 = torch.randn(2, 3, dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=D)

    def branchy(s, y):  # Python control flow on a tensor value: vmap refuses it
        return func(s, y) if float(y.detach().abs().sum()) < 1e6 else -func(s, y)

    grads = {}
    for name, f, batching in (("loop", func, "loop"), ("vmap", func, "vmap"), ("fallback", branchy, "vmap")):
        sol = solve(f, y0, t, gradient=Quadrature(batching=batching), params=list(func.parameters()), **TIGHT)
        grads[name] = torch.autograd.grad(sol.ys[-1].sum(), [y0] + list(func.parameters()))
        if name == "vmap":
            assert sol.stats["backward"]["quadrature_vjps"] < sol.stats["backward"]["accepted"]
        if name == "fallback":
            assert sol.stats["backward"]["quadrature_vjps"] == sol.stats["backward"]["accepted"]
    for name in ("vmap", "fallback"):
        for a, b in zip(grads["loop"], grads[name]):
            assert rel(b, a) < 1e-12


def test_vmap_fallback_is_told_once_and_hides_no_error_of_f():
    """f that vmap cannot batch: one RuntimeWarning per Quadrature object and
    ``vmap_fallback`` in each backward's stats; an error f itself raises in the backward
    pass still reaches the caller (the fallback's own call of f raises it again)."""
    import warnings

    func = Field()
    y0 = torch.randn(2, 3, dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=D)
    broken = [False]

    def branchy(s, y):  # Python control flow on a tensor value: vmap refuses it
        if broken[0] and float(s) < 0.5:
            raise RuntimeError("f failed on its own")
        return func(s, y) if float(y.detach().abs().sum()) < 1e6 else -func(s, y)

    gradient = Quadrature(batching="vmap")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            sol = solve(branchy, y0, t, gradient=gradient, params=list(func.parameters()))
            sol.ys[-1].sum().backward()
            assert sol.stats["backward"]["vmap_fallback"] == 1
    told = [w for w in caught if "cannot batch f" in str(w.message)]
    assert len(told) == 1 and issubclass(told[0].category, RuntimeWarning) and "batching='loop'" in str(told[0].message)
    sol = solve(func, y0, t, gradient=Quadrature(), params=list(func.parameters()))
    sol.ys[-1].sum().backward()
    assert sol.stats["backward"]["vmap_fallback"] == 0

    sol = solve(branchy, y0, t, gradient=Quadrature(), params=list(func.parameters()))
    broken[0] = True
    with pytest.raises(RuntimeError, match="f failed on its own"):
        sol.ys[-1].sum().backward()


def test_stacked_nodes_refuse_time_dependent_or_row_mixing_f():
    func = Field()  # depends on t
    y0 = torch.randn(2, 3, dtype=D, requires_grad=True)
    sol = solve(func, y0, torch.tensor([0.0, 1.0], dtype=D), gradient=Quadrature(batching="stack"))
    with pytest.raises(ValueError, match="stack"):
        sol.ys.sum().backward()
    A = torch.randn(3, 3, dtype=D, requires_grad=True)
    sol = solve(lambda s, y: A @ y, torch.randn(3, 2, dtype=D), torch.tensor([0.0, 1.0], dtype=D),
                gradient=Quadrature(batching="stack"), params=[A])  # mixes the rows of y
    with pytest.raises(ValueError, match="stack"):
        sol.ys.sum().backward()
    with pytest.raises(ValueError, match="stack"):
        solve(lambda s, y: y, (y0, y0), torch.tensor([0.0, 1.0], dtype=D), gradient=Quadrature(batching="stack"))


def test_undeclared_closure_tensor_is_an_error():
    k = torch.tensor(0.5, dtype=D, requires_grad=True)
    with pytest.raises(ValueError, match="params"):
        solve(lambda t, y: -k * y, torch.ones(2, dtype=D, requires_grad=True), torch.tensor([0.0, 1.0], dtype=D),
              gradient=Quadrature())


def test_jump_t_with_hermite_steps_matches_direct():
    # rk4 steps wait for their end slope; at the discontinuity it must be taken on the step's
    # own side (f(0.6) itself belongs to the earlier piece here): 4e-5 off when taken at 0.6.
    k = torch.tensor([1.3, -0.4], dtype=D, requires_grad=True)

    def f(t, y):
        return torch.where(t <= 0.6, -k[0] * y, k[1] * y + 0.5)

    y0 = torch.tensor([0.7, -1.2], dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=D)
    grads = {}
    for name, g in (("direct", Direct()), ("quad", Quadrature(batching="loop"))):
        sol = solve(f, y0, t, gradient=g, params=[k], jump_t=[0.6], method="rk4", step_size=0.05)
        grads[name] = torch.autograd.grad((sol.ys**2).sum(), (y0, k))
    for q, r in zip(grads["quad"], grads["direct"]):
        assert rel(q, r) < 5e-6

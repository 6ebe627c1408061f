"""The compiled path's loop graphs (torchadjoint.compiled_loop) and compiled Direct's backward
(torchadjoint.adjoint.direct_compiled): the same steps, outputs, errors and gradients as the
solve taken step by step, and as the analytic solution of dy/dt = A y.

"Step by step" is the same compiled solve with the loop graphs switched off (integrate's
``graph_loop`` replaced by one that never applies), so any difference is the loop's. Compiles
for real (marked ``compiled``): a few seconds per (method, shape, buffer size).
"""
from __future__ import annotations

import warnings

import pytest
import torch

import torchadjoint as ta
from torchadjoint import compiled_loop, integrate
from torchadjoint.adjoint import direct, direct_compiled
from torchadjoint.compiled import CompileWarning

from linear_reference import LinearField

pytestmark = pytest.mark.compiled
D = torch.float64


def _problem(n_out=40, reverse=False, t_end=3.0):
    torch.manual_seed(0)
    a = 0.6 * torch.randn(3, 3, dtype=D) - 0.3 * torch.eye(3, dtype=D)
    y0 = torch.randn(2, 3, dtype=D)
    # Irregular outputs, two a hair apart, one just before the end.
    t = torch.sort(torch.rand(n_out - 3, dtype=D)).values * t_end
    t = torch.cat([torch.tensor([0.0], dtype=D), t, t[-1:] + 1e-9, torch.tensor([t_end * (1 - 1e-13), t_end], dtype=D)])
    t = torch.unique(t)
    return a, y0, (t.flip(0) if reverse else t)


def _solve(a, y0, t, loop=True, **options):
    func = LinearField(a)
    if not loop:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(integrate, "graph_loop", lambda *args, **kwargs: None)
            return ta.solve(func, y0, t, compile=True, **options)
    return ta.solve(func, y0, t, compile=True, **options)


def _exact(a, y0, t):
    return torch.stack([y0 @ torch.linalg.matrix_exp(a * (s - t[0])).T for s in t])


def _same_solve(a, y0, t, **options):
    """The loop's solve and the step-by-step one: same counts, outputs equal to rounding."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", CompileWarning)
        looped = _solve(a, y0, t, **options)
        stepped = _solve(a, y0, t, loop=False, **options)
    got, want = looped.stats["forward"], stepped.stats["forward"]
    for key in ("nfe", "steps", "accepted", "rejected"):
        assert got[key] == want[key], (key, got, want)
    assert got["graph_loop_steps"] == got["accepted"] and "graph_loop" not in got
    torch.testing.assert_close(looped.ys, stepped.ys, rtol=1e-13, atol=1e-14)
    return looped


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3"])
def test_the_loop_takes_the_steps_the_host_takes(method):
    a, y0, t = _problem()
    sol = _same_solve(a, y0, t, method=method, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(sol.ys, _exact(a, y0, t), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", ["reversed", "offset", "controller"])
def test_the_loop_under_other_times_and_controller_options(case):
    a, y0, t = _problem(reverse=case == "reversed")
    options = dict(rtol=1e-8, atol=1e-9)
    if case == "offset":
        # Public times still resolve the interval: the loop runs on them. (The output a hair
        # before the end would round onto it.)
        t = torch.cat([t[:-2], t[-1:]]) + 1e5
    if case == "controller":
        options.update(first_step=0.05, max_step=0.2, pcoeff=0.2, icoeff=0.6, safety=0.8, ifactor=4.0, dfactor=0.3)
    sol = _same_solve(a, y0, t, **options)
    torch.testing.assert_close(sol.ys, _exact(a, y0, t), rtol=1e-5, atol=1e-6)


def test_many_graph_calls_and_outputs_only_at_the_ends(monkeypatch):
    # Buffers of 4 steps (and 5 steps per call with nothing recorded): a solve of ~80 steps
    # takes ~20 graph calls, each handing its steps, budget and outputs to the next.
    monkeypatch.setattr(compiled_loop, "RECORDED_NUMBERS", 4 * 4 * 6)  # dopri5: 8 rows of 6 per step -> 4 steps
    monkeypatch.setattr(compiled_loop, "UNRECORDED_STEPS", 5)
    a, y0, t = _problem(n_out=300, t_end=12.0)
    sol = _same_solve(a, y0, t, rtol=1e-10, atol=1e-11)  # the outputs computed inside the graphs
    assert sol.stats["forward"]["accepted"] > 40
    monkeypatch.setattr(compiled_loop, "OUTPUT_NUMBERS", 0)  # ... and by the host, from the graphs' records
    torch.testing.assert_close(_same_solve(a, y0, t, rtol=1e-10, atol=1e-11).ys, sol.ys, rtol=1e-13, atol=1e-14)
    ends = t[[0, -1]]
    sol = _same_solve(a, y0, ends, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(sol.ys, _exact(a, y0, ends), rtol=1e-8, atol=1e-9)


def test_errors_raised_inside_the_loop_are_the_hosts():
    a, y0, t = _problem()
    for options in (dict(max_num_steps=7), dict(rtol=1e-12, atol=1e-12, max_num_steps=30)):
        messages = []
        for loop in (True, False):
            with pytest.raises(ta.SolveError) as caught, torch.no_grad():
                _solve(a, y0, t, loop=loop, **options)
            messages.append(str(caught.value))
        assert messages[0] == messages[1] and "max_num_steps" in messages[0]

    class BlowsUp(torch.nn.Module):  # f turns NaN past t = 1.3: the host rejects, shrinks, and says where
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(a.clone())

        def forward(self, t, y):
            return torch.where(t > 1.3, torch.nan, 1.0) * (y @ self.a.T)

    messages = []
    for loop in (True, False):
        with pytest.MonkeyPatch.context() as patch, torch.no_grad():
            if not loop:
                patch.setattr(integrate, "graph_loop", lambda *args, **kwargs: None)
            with pytest.raises(ta.SolveError) as caught:
                ta.solve(BlowsUp(), y0, t, compile=True)
        messages.append((str(caught.value), caught.value.t))
    assert messages[0] == messages[1] and "non-finite" in messages[0][0], messages


def test_a_training_loop_sees_each_new_weight():
    a, y0, t = _problem()
    func = LinearField(a)
    optimizer = torch.optim.SGD(func.parameters(), lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        sol = ta.solve(func, y0, t, compile=True, gradient=ta.Backsolve(), rtol=1e-9, atol=1e-10)
        assert sol.stats["forward"]["graph_loop_steps"] > 0
        torch.testing.assert_close(sol.ys.detach(), _exact(func.a.detach(), y0, t), rtol=1e-6, atol=1e-7)
        sol.ys.pow(2).sum().backward()
        optimizer.step()


def _direct_grads(a, y0, t, compile, w=None):
    """ys and dL/d(y0, A[, w]) under Direct, L a weighted sum over every output."""
    func = LinearField(a)
    y = y0.clone().requires_grad_(True)
    params = None
    if w is not None:  # f also uses a tensor requiring grad that is not its parameter
        inner = func.forward
        func.forward = lambda t_, y_: inner(t_, y_) * w
        params = [func.a]
    sol = ta.solve(func, y, t, compile=compile, gradient=ta.Direct(), rtol=1e-9, atol=1e-10,
                   **({} if params is None else {"params": params}))
    weights = torch.linspace(-1.0, 2.0, sol.ys.numel(), dtype=D).view_as(sol.ys)
    (sol.ys * weights).sum().backward()
    grads = [y.grad, func.a.grad] + ([] if w is None else [w.grad])
    return sol, grads, weights


@pytest.mark.parametrize("reverse", [False, True])
def test_compiled_direct_equals_eager_direct_and_the_analytic_gradient(reverse):
    a, y0, t = _problem(reverse=reverse)
    compiled_sol, got, weights = _direct_grads(a, y0, t, compile=True)
    assert compiled_sol.stats["backward"]["steps"] == compiled_sol.stats["forward"]["accepted"]  # the steps' VJPs ran
    _, eager, _ = _direct_grads(a, y0, t, compile=False)
    for g, e in zip(got, eager):
        torch.testing.assert_close(g, e, rtol=1e-11, atol=1e-12)
    a_ = a.clone().requires_grad_(True)
    y_ = y0.clone().requires_grad_(True)
    (_exact(a_, y_, t) * weights).sum().backward()
    torch.testing.assert_close(got[0], y_.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got[1], a_.grad, rtol=1e-6, atol=1e-7)
    with pytest.raises(RuntimeError, match="compile=False"):
        y = y0.clone().requires_grad_(True)
        sol = ta.solve(LinearField(a), y, t, compile=True, gradient=ta.Direct())
        (g,) = torch.autograd.grad(sol.ys.sum(), y, create_graph=True)
        g.sum().backward()


def test_compiled_direct_leaves_other_tensors_to_the_recorded_path():
    # f scales by w, which requires grad but is no parameter of f: the steps' VJPs would miss
    # it, so Direct records the forward as before, and w gets its gradient.
    a, y0, t = _problem()
    w = torch.tensor(0.7, dtype=D, requires_grad=True)
    sol, got, _ = _direct_grads(a, y0, t, compile=True, w=w)
    assert "steps" not in (sol.stats.get("backward") or {})
    w_eager = torch.tensor(0.7, dtype=D, requires_grad=True)
    _, eager, _ = _direct_grads(a, y0, t, compile=False, w=w_eager)
    for g, e in zip(got, eager):
        torch.testing.assert_close(g, e, rtol=1e-11, atol=1e-12)


def test_compiled_direct_replays_when_the_host_took_a_step(monkeypatch):
    # The loop graph goes off after its first call (as when it fails to compile): the host
    # takes the remaining steps, which the graphs did not record; the forward is solved
    # again with a graph and the gradient is still Direct's.
    monkeypatch.setattr(compiled_loop, "RECORDED_NUMBERS", 4 * 4 * 6)
    calls = []
    real = compiled_loop.GraphLoop._call

    def once_then_off(self, *args):
        calls.append(1)
        return real(self, *args) if len(calls) == 1 else None

    monkeypatch.setattr(compiled_loop.GraphLoop, "_call", once_then_off)
    a, y0, t = _problem()
    sol, got, _ = _direct_grads(a, y0, t, compile=True)
    assert sol.stats["backward"].get("replayed") and len(calls) >= 2
    monkeypatch.undo()
    _, eager, _ = _direct_grads(a, y0, t, compile=False)
    for g, e in zip(got, eager):
        torch.testing.assert_close(g, e, rtol=1e-11, atol=1e-12)


class _Frozen(torch.nn.Module):
    """dy/dt = s · (y Aᵀ) + y Wᵀ with W frozen and s a buffer: tensors of f that are not params,
    read through views (``.T``) inside the loop graphs."""

    def __init__(self, a):
        super().__init__()
        self.a = torch.nn.Parameter(a.clone())
        self.w = torch.nn.Parameter(0.1 * torch.ones_like(a), requires_grad=False)
        self.register_buffer("s", torch.tensor(0.9, dtype=a.dtype))

    def forward(self, t, y):
        return self.s * (y @ self.a.T) + y @ self.w.T


def test_compiled_direct_with_frozen_parameters_and_buffers():
    a, y0, t = _problem()
    grads = []
    for compile in (True, False):
        func = _Frozen(a)
        y = y0.clone().requires_grad_(True)
        sol = ta.solve(func, y, t, compile=compile, gradient=ta.Direct(), rtol=1e-9, atol=1e-10)
        (sol.ys * torch.linspace(-1.0, 2.0, sol.ys.numel(), dtype=D).view_as(sol.ys)).sum().backward()
        if compile:
            assert sol.stats["backward"]["steps"] == sol.stats["forward"]["graph_loop_steps"] > 0
        grads.append((y.grad, func.a.grad))
    for g, e in zip(*grads):
        torch.testing.assert_close(g, e, rtol=1e-11, atol=1e-12)


class _DictField(torch.nn.Module):
    """A dict state whose f returns its keys in the other order, with two parameters, one read
    through ``.T`` in two places (found trying the feature as a user: dynamo made each read a
    node of the outer graph, lifted into the loop graph's first-step branch, a torch.cond, as two
    inputs aliasing each other; inductor refused the cond and the whole loop was off)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.w = torch.nn.Parameter(0.3 * torch.randn(3, 3, dtype=D))
        self.b = torch.nn.Parameter(0.1 * torch.randn(2, dtype=D))

    def forward(self, t, y):
        return {"v": torch.tanh(y["u"] @ self.w.T)[..., :2] * self.b - 0.1 * y["v"], "u": y["u"] @ self.w.T}


def test_a_dict_state_runs_in_the_loop_with_eager_gradients_at_any_loss_scale():
    torch.manual_seed(2)
    y0 = {"u": torch.randn(4, 3, dtype=D), "v": torch.randn(4, 2, dtype=D)}
    t = torch.linspace(0.0, 1.5, 12, dtype=D) + 1e3
    grads = {}
    for compile in (True, False):
        func = _DictField()
        sol = ta.solve(func, y0, t, compile=compile, gradient=ta.Backsolve(), rtol=1e-8, atol=1e-9)
        if compile:  # every forward step inside the loop graph
            forward = sol.stats["forward"]
            assert forward["compiled"] and "graph_loop" not in forward, forward
            assert forward["graph_loop_steps"] == forward["accepted"] > 0, forward
        (1e-8 * sum((v ** 2).sum() for v in sol.ys.values())).backward()
        grads[compile] = [p.grad for p in func.parameters()]
    for g, e in zip(grads[True], grads[False]):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=0.0)

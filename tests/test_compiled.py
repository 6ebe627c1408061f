"""The compiled path (solve(..., compile=True)): gradients equal eager and the analytic ones,
compile time reported, one warning and eager results where compiling fails.

The smoke test compiles for real (inductor, its on-disk graph cache off), so it costs seconds
of compile time; it is marked ``compiled`` (the README's plain ``pytest`` runs it; ``-m "not
compiled"`` leaves it out).
"""
from __future__ import annotations

import gc
import sys
import warnings
import weakref

import pytest
import torch

import torchadjoint as ta
from torchadjoint import compiled, compiled_loop
from torchadjoint.compiled import CompileWarning

from linear_reference import LinearField


def _problem():
    torch.manual_seed(0)
    a = 0.5 * torch.randn(3, 3, dtype=torch.float64) - torch.eye(3, dtype=torch.float64)
    y0 = torch.randn(2, 3, dtype=torch.float64)
    t = torch.tensor([0.0, 0.4, 1.0], dtype=torch.float64)
    return a, y0, t


def _loss(ys):
    return (ys[1:] * torch.arange(1.0, 1.0 + ys[1:].numel(), dtype=ys.dtype).view_as(ys[1:])).sum()


def _grads(a, y0, t, gradient, **options):
    func = LinearField(a)
    y = y0.clone().requires_grad_(True)
    solution = ta.solve(func, y, t, gradient=gradient, **options)
    _loss(solution.ys).backward()
    return solution.ys.detach(), y.grad, func.a.grad, solution.stats, weakref.ref(func)


def _analytic(a, y0, t):
    a = a.clone().requires_grad_(True)
    y = y0.clone().requires_grad_(True)
    ys = torch.stack([y @ torch.linalg.matrix_exp(a * s).T for s in t])
    _loss(ys).backward()
    return ys.detach(), y.grad, a.grad


def _compare_values(a, y0, t, gradient, **options):
    """Eager and compiled solves of the linear problem: ys, dL/dy0 and dL/dA equal to tight
    tolerance, and within the solve's tolerance of the analytic values. Returns both."""
    eager = _grads(a, y0, t, gradient, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileWarning)  # it compiled: no fallback
        # The on-disk graph cache off: the graphs are really generated and built here.
        with torch._inductor.config.patch(fx_graph_cache=False):
            fast = _grads(a, y0, t, gradient, compile=True, **options)
    for e, c in zip(eager[:3], fast[:3]):  # ys, dL/dy0, dL/dA
        torch.testing.assert_close(c, e, rtol=1e-10, atol=1e-12)
    for x, c in zip(_analytic(a, y0, t), fast[:3]):
        torch.testing.assert_close(c, x, rtol=1e-6, atol=1e-8)
    return eager, fast


def _compare(a, y0, t, gradient, **options):
    """:func:`_compare_values`, and the forward compiled as one graph with eager's nfe."""
    eager, fast = _compare_values(a, y0, t, gradient, **options)
    stats = fast[3]["forward"]
    # One graph for the whole solve: step sizes and times are tensors, no recompile per step.
    assert stats["compiled"] and stats["graphs_compiled"] == 1 and stats["compile_seconds"] > 0
    # A compiled step of s stages counts s evaluations (s - 1 new): the same count as eager.
    assert stats["nfe"] == eager[3]["forward"]["nfe"]
    return eager, fast


@pytest.mark.compiled
def test_compiled_backsolve_matches_eager_and_analytic_gradients():
    """The CI smoke test: adaptive dopri5 (error norm inside the graph), Backsolve (the
    backward's f with its VJP compiled too)."""
    a, y0, t = _problem()
    compiled.clear_cache()
    options = dict(method="dopri5", rtol=1e-9, atol=1e-11)
    eager, fast = _compare(a, y0, t, ta.Backsolve(), **options)
    backward = fast[3]["backward"]
    # Two graphs: a whole backward step, and one evaluation (f at the start and after the jump).
    assert backward["compiled"] and backward["graphs_compiled"] == 2 and backward["compile_seconds"] > 0
    assert len(compiled.cached_programs("adjoint step")) == 1
    # The jump at t=0.4 re-evaluates f instead of reusing a kept graph: one evaluation more.
    assert backward["nfe"] == eager[3]["backward"]["nfe"] + 1
    # a_θ's error estimate, summed inside the step graphs, is eager's (summed stage by stage; a
    # difference of near-equal stage sums, so it keeps fewer digits than the gradient).
    assert backward["parameter_error"] == pytest.approx(eager[3]["backward"]["parameter_error"], rel=1e-6)
    # Another module of the same class reuses the graphs (no compile), and is not kept alive.
    again = _grads(a, y0, t, ta.Backsolve(), compile=True, **options)
    assert again[3]["forward"]["graphs_compiled"] == 0 and again[3]["backward"]["graphs_compiled"] == 0
    gc.collect()
    assert again[4]() is None


@pytest.mark.compiled
def test_compiled_backsolve_full_norm_carries_the_parameter_adjoint_in_the_step_graph():
    """Under the full norm a_θ is part of the integrated state: the compiled backward step
    carries it through its stage combinations and error norm (the seminorm's accumulator
    is not used), with the same steps as eager."""
    a, y0, t = _problem()
    compiled.clear_cache()
    options = dict(method="bosh3", rtol=1e-8, atol=1e-10)
    eager, fast = _compare_values(a, y0, t, ta.Backsolve(norm="full"), **options)
    backward = fast[3]["backward"]
    assert backward["compiled"] and backward["graphs_compiled"] == 2
    assert backward["steps"] == eager[3]["backward"]["steps"]
    compiled.clear_cache()


@pytest.mark.compiled
@pytest.mark.parametrize("method, options", [("adaptive_heun", dict(rtol=1e-7, atol=1e-9)),
                                             ("rk4", dict(step_size=0.02))])
def test_compiled_backward_steps_integrate_the_parameter_adjoint_themselves(monkeypatch, method, options):
    """Under the seminorm a_θ is accumulated beside the backward solve: a compiled step sums
    its own stages' parts with the step's weights (and the error weights' norm) inside its
    graph, and the accumulator adds the sums of accepted steps. Here for a method without FSAL
    (each step's first stage evaluated apart) and a fixed-step one (no error weights): every
    accepted step goes through the graph's sums, and the gradients are eager's."""
    from torchadjoint.adjoint.vjp import StageAccumulator

    taken = []
    took_step = StageAccumulator.took_step
    monkeypatch.setattr(StageAccumulator, "took_step", lambda self, *args: taken.append(args[:2]) or took_step(self, *args))
    a, y0, t = _problem()
    eager, fast = _compare_values(a, y0, t, ta.Backsolve(), method=method, **options)
    backward = fast[3]["backward"]
    assert backward["compiled"] and backward["steps"] == eager[3]["backward"]["steps"]
    assert len(taken) == backward["steps"] and all(t0 > t1 for t0, t1 in taken)
    assert backward["parameter_error"] == pytest.approx(eager[3]["backward"]["parameter_error"], rel=1e-6)
    compiled.clear_cache()


class _TiedWeights(torch.nn.Module):
    """Two layers sharing one weight (one parameter under two names)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = torch.nn.Linear(3, 3).double(), torch.nn.Linear(3, 3).double()
        self.l2.weight = self.l1.weight

    def forward(self, t, y):
        return self.l2(torch.tanh(self.l1(y)))


@pytest.mark.compiled
def test_compiled_backward_of_a_module_with_tied_weights_is_compiled_and_eager_equal():
    y0 = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    grads = []
    for compile in (False, True):
        func = _TiedWeights()
        with warnings.catch_warnings():
            warnings.simplefilter("error", CompileWarning)
            solution = ta.solve(func, y0, t, gradient=ta.Backsolve(), compile=compile, rtol=1e-8, atol=1e-10)
            solution.ys.sum().backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in func.parameters()]))
    assert solution.stats["backward"]["compiled"]
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-14)


@pytest.mark.compiled
def test_compiled_direct_matches_eager_and_analytic_gradients():
    """Autograd through compiled steps (AOTAutograd's backward graph), fixed-step rk4."""
    a, y0, t = _problem()
    compiled.clear_cache()
    _compare(a, y0, t, ta.Direct(), method="rk4", step_size=0.02)


@pytest.mark.compiled
def test_compiled_checkpointed_backward_matches_eager_and_analytic_gradients():
    """Checkpointed's backward evaluations (f with its VJP at y read along the replayed
    trajectory) compiled; its forward and replays stay eager, so they replay bitwise."""
    a, y0, t = _problem()
    compiled.clear_cache()
    options = dict(method="dopri5", rtol=1e-9, atol=1e-11)
    eager, fast = _compare_values(a, y0, t, ta.Checkpointed(), **options)
    backward = fast[3]["backward"]
    assert backward["compiled"] and backward["graphs_compiled"] == 1 and backward["compile_seconds"] > 0
    assert backward["nfe"] == eager[3]["backward"]["nfe"]
    compiled.clear_cache()


def test_implicit_backward_methods_stay_eager_without_a_warning():
    """Newton's Jacobian differentiates the adjoint dynamics, which torch.func cannot do
    through a compiled graph: an implicit backward method runs eagerly, as its forward does,
    with the eager numbers (nothing is compiled, so this is cheap)."""
    a, y0, t = _problem()
    compiled.clear_cache()
    options = dict(method="kvaerno5", rtol=1e-7, atol=1e-9)
    for gradient in (ta.Checkpointed, ta.Backsolve):
        eager = _grads(a, y0, t, gradient(), **options)
        with warnings.catch_warnings():
            warnings.simplefilter("error", CompileWarning)
            fast = _grads(a, y0, t, gradient(), compile=True, **options)
        for e, c in zip(eager[:3], fast[:3]):
            assert torch.equal(c, e)
        assert "compiled" not in fast[3]["backward"]
        assert fast[3]["backward"]["nfe"] == eager[3]["backward"]["nfe"]


@pytest.mark.compiled
def test_compiled_step_on_a_dict_state_whose_f_returns_its_keys_in_another_order():
    """The flat state is taken apart and put together inside the graph by key, as eagerly:
    a dict f returns in another order must not swap components. Reversed, offset times."""
    compiled.clear_cache()

    def oscillator(t, y):  # returns {"v", "x"} for a state {"x", "v"}
        return {"v": -y["x"] * (1.0 + 0.1 * torch.cos(t)), "x": y["v"]}

    y0 = {"x": torch.tensor([1.0, 0.5], dtype=torch.float64), "v": torch.tensor([0.0, -1.0], dtype=torch.float64)}
    t = torch.tensor([11.0, 10.5, 10.0], dtype=torch.float64)
    eager = ta.solve(oscillator, y0, t, method="rk4", step_size=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileWarning)
        fast = ta.solve(oscillator, y0, t, method="rk4", step_size=0.05, compile=True)
    assert fast.stats["forward"]["compiled"] and fast.stats["forward"]["graphs_compiled"] >= 1
    for key in y0:
        torch.testing.assert_close(fast.ys[key], eager.ys[key], rtol=1e-12, atol=1e-14)


def test_compile_failure_warns_once_and_gives_eager_results(monkeypatch):
    def unavailable(*args, **kwargs):
        raise RuntimeError("torch.compile is not available here")

    monkeypatch.setattr(torch, "compile", unavailable)
    compiled.clear_cache()
    a, y0, t = _problem()
    options = dict(method="dopri5", rtol=1e-9, atol=1e-11)
    eager = _grads(a, y0, t, ta.Backsolve(), **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = _grads(a, y0, t, ta.Backsolve(), compile=True, **options)
        second = _grads(a, y0, t, ta.Backsolve(), compile=True, **options)
    compile_warnings = [w for w in caught if issubclass(w.category, CompileWarning)]
    assert len(compile_warnings) == 1, [str(w.message) for w in compile_warnings]
    message = str(compile_warnings[0].message)
    assert "not available here" in message and "eagerly" in message
    for result in (first, second):
        for e, c in zip(eager[:3], result[:3]):  # the eager path itself: bitwise
            assert torch.equal(c, e)
        assert result[3]["forward"]["compiled"] is False
        assert result[3]["forward"]["nfe"] == eager[3]["forward"]["nfe"]
    compiled.clear_cache()


def test_a_failed_compile_leaves_the_modules_tensors_as_they_were(monkeypatch):
    """Whatever a compile that fails did to f's module (a functional_call half undone), the
    module keeps its own Parameters and buffers: an optimizer built on f.parameters() still
    trains what f computes with."""
    module = torch.nn.Sequential(torch.nn.Linear(2, 2))
    module[0].register_buffer("scale", torch.ones(2))
    held = (module[0].weight, module[0].bias, module[0].scale)
    program = compiled._Program(lambda: (lambda func, x: func(x)), "default", ("test", "default"), torch.device("cpu"))

    def failing(func, x):  # swaps the tensors for plain ones, then fails as inductor may
        func[0]._parameters["weight"] = func[0].weight.detach().clone()
        func[0]._buffers["scale"] = torch.zeros(2)
        raise RuntimeError("backend='inductor' raised")

    monkeypatch.setattr(program, "fn", failing)
    with pytest.raises(RuntimeError, match="inductor"):
        program.call(module, torch.ones(2))
    assert all(a is b for a, b in zip((module[0].weight, module[0].bias, module[0].scale), held))


class BranchesOnItem(LinearField):
    """A field torch.compile cannot capture whole: a Python branch on a tensor's value."""

    def forward(self, t, y):
        if y.abs().max().item() > 1e6:
            return torch.zeros_like(y)
        return y @ self.a.T


def test_untraceable_f_falls_back_with_one_warning():
    """The real failure (dynamo refuses .item() under fullgraph, before any code generation,
    so this is cheap): one warning naming it, and the eager answer, for forward and backward."""
    compiled.clear_cache()
    a, y0, t = _problem()
    options = dict(method="dopri5", rtol=1e-9, atol=1e-11)

    def grads(**extra):
        func = BranchesOnItem(a)
        y = y0.clone().requires_grad_(True)
        solution = ta.solve(func, y, t, **options, **extra)
        _loss(solution.ys).backward()
        return solution.ys.detach(), y.grad, func.a.grad, solution.stats

    eager = grads()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = grads(compile=True)
    compile_warnings = [w for w in caught if issubclass(w.category, CompileWarning)]
    assert len(compile_warnings) == 1, [str(w.message) for w in compile_warnings]
    assert "could not be compiled" in str(compile_warnings[0].message)
    for e, c in zip(eager[:3], result[:3]):
        torch.testing.assert_close(c, e, rtol=1e-10, atol=1e-12)
    assert result[3]["forward"]["compiled"] is False
    assert result[3]["forward"]["nfe"] == eager[3]["forward"]["nfe"]
    compiled.clear_cache()


@pytest.mark.compiled
def test_recompile_limit_is_said_not_silent():
    """A program that would need more graphs than dynamo allows runs eagerly, and says so,
    naming the limit; stats say the step was not compiled. (One real compile: the second
    graph, for grad mode, is refused before it is built.) The limit is lowered with torch's own
    config.patch: pytest's monkeypatch (9.2) deletes a config entry of torch's on undo, and
    every later compile then failed."""
    compiled.clear_cache()
    a, y0, t = _problem()
    # A method the loop graphs do not take (fixed steps): its step program, compiled without a
    # graph, would need a second graph for Direct's grad mode.
    options = dict(method="rk4", step_size=0.1)
    func = LinearField(a)
    limit = torch._dynamo.config.recompile_limit
    with torch._dynamo.config.patch(recompile_limit=1):
        with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
            first = ta.solve(func, y0, t, compile=True, **options)
        assert first.stats["forward"]["compiled"] and first.stats["forward"]["graphs_compiled"] == 1
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            second = ta.solve(func, y0, t, compile=True, gradient=ta.Direct(), **options)
    assert torch._dynamo.config.recompile_limit == limit  # restored, and still there
    messages = [str(w.message) for w in caught if issubclass(w.category, CompileWarning)]
    assert len(messages) == 1 and "recompile_limit = 1" in messages[0], messages
    assert second.stats["forward"]["compiled"] is False
    eager = ta.solve(func, y0, t, gradient=ta.Direct(), **options)
    torch.testing.assert_close(second.ys, eager.ys, rtol=0, atol=0)
    compiled.clear_cache()


@pytest.mark.parametrize("value, error", [("fast", ValueError), (1.5, TypeError), ("reduce_overhead", ValueError)])
def test_compile_option_is_validated(value, error):
    a, y0, t = _problem()
    with pytest.raises(error, match="compile"):
        ta.solve(LinearField(a), y0, t, compile=value)


@pytest.mark.parametrize("gradient", [ta.Backsolve, ta.Checkpointed])
def test_backward_options_can_turn_the_compiled_backward_off(monkeypatch, gradient):
    """Backsolve/Checkpointed(options={'compile': False}) keeps the backward eager under
    solve(compile=True): no vector-Jacobian program is even built."""
    built = []
    monkeypatch.setattr(compiled, "CompiledVJP", lambda *args, **kwargs: built.append(args))
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: (_ for _ in ()).throw(RuntimeError("off")))
    compiled.clear_cache()
    a, y0, t = _problem()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CompileWarning)
        result = _grads(a, y0, t, gradient(options={"compile": False}), compile=True)
    assert not built and "compiled" not in result[3]["backward"]
    compiled.clear_cache()


def test_program_cache_is_bounded_least_recently_used_first_out(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # no compiling: the cache alone
    compiled.clear_cache()
    build = lambda: (lambda x: x)  # noqa: E731
    cpu = torch.device("cpu")
    for i in range(compiled.CACHE_SIZE):
        compiled._program(("test", i), build, "default", ("test", "default"), cpu)
    compiled._program(("test", 0), build, "default", ("test", "default"), cpu)  # used again: now the newest
    compiled._program(("test", "one more"), build, "default", ("test", "default"), cpu)
    keys = list(compiled._PROGRAMS)
    assert len(keys) == compiled.CACHE_SIZE and ("test", 1, "cpu") not in keys and ("test", 0, "cpu") in keys
    compiled.clear_cache()


def test_cpu_programs_get_the_cpp_wrapper_and_other_modes_are_passed_on(monkeypatch):
    """The default mode on the CPU compiles with inductor's C++ wrapper (the Python code that
    calls a small graph's kernels was a large share of each call); a mode the user names
    (e.g. "reduce-overhead" for CUDA graphs) is passed on as its options (torch.compile takes
    a mode or options, not both, and the guard filter is an option)."""
    from torch._inductor import list_mode_options

    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: seen.append(kwargs) or fn)
    compiled.clear_cache()
    build = lambda: (lambda x: x)  # noqa: E731
    programs = [compiled._program(("test", 0), build, "default", ("test", "default"), torch.device("cpu")),
                compiled._program(("test", 0), build, "default", ("test", "default"), torch.device("cuda")),
                compiled._program(("test", 1), build, "reduce-overhead", ("test", "reduce-overhead"),
                                  torch.device("cpu"))]
    # CUDA graphs: every call through dynamo's own hook (torch's path), not the direct dispatch.
    assert [p._graphs is None for p in programs] == [False, False, True]
    options = [{k: v for k, v in kwargs["options"].items() if k != "guard_filter_fn"} for kwargs in seen]
    assert all("mode" not in kwargs and callable(kwargs["options"]["guard_filter_fn"]) for kwargs in seen)
    assert options[0] == {"cpp_wrapper": True}
    assert options[1] == {}
    assert options[2] == list_mode_options("reduce-overhead") and options[2]["triton.cudagraphs"]
    compiled.clear_cache()


def test_guards_on_a_programs_closure_are_dropped_and_all_others_kept():
    """A program's closure holds constants of its cache key (the tableau's coefficients, ...):
    dynamo's guards on them are dropped (they were about a third of a step's guards, checked
    on every call); guards on the arguments, on globals and on torch's state are kept."""
    from types import SimpleNamespace as Entry

    keep = compiled._skip_closure_guards({"a", "b_error", "field_of"})
    entries = [Entry(name="a", is_global=False), Entry(name="a[1][0]", is_global=False),
               Entry(name="b_error[3]", is_global=False), Entry(name="field_of.__closure__[0]", is_global=False),
               Entry(name="func._modules['net']", is_global=False), Entry(name="y0", is_global=False),
               Entry(name="", is_global=False), Entry(name="G['a']", is_global=True),
               Entry(name="ab", is_global=False)]
    assert keep(entries) == [False, False, False, False, True, True, True, True, True]


def test_methods_without_a_compiled_step_run_eagerly(monkeypatch):
    """Implicit methods keep their own stepper: compile=True changes nothing there (no
    program is built, no warning), and the answer is the eager one."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: (_ for _ in ()).throw(RuntimeError("not to be called")))
    compiled.clear_cache()
    a, y0, t = _problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileWarning)
        eager = ta.solve(LinearField(a), y0, t, method="kvaerno3", rtol=1e-6, atol=1e-8)
        fast = ta.solve(LinearField(a), y0, t, method="kvaerno3", rtol=1e-6, atol=1e-8, compile=True)
    assert torch.equal(eager.ys, fast.ys) and "compiled" not in fast.stats["forward"]


def test_a_wrapped_compile_failure_is_named_in_the_warning():
    """inductor wraps what went wrong in BackendCompilerFailed, whose own first line names no
    cause ("backend='inductor' raised:"): the warning's reason carries the wrapped error too
    (found with warnings as errors, where a DeprecationWarning inside inductor failed it)."""
    from torch._dynamo.exc import BackendCompilerFailed

    inner = DeprecationWarning("`torch.jit.script_method` is deprecated.")
    wrapped = BackendCompilerFailed(lambda *a: None, inner, None)
    reason = compiled._reason(wrapped)
    assert reason.startswith("BackendCompilerFailed") and "DeprecationWarning: `torch.jit.script_method`" in reason
    assert compiled._reason(ValueError("first\nsecond")) == "ValueError: first"


GAIN = 1.0  # read by GlobalGain.forward: a global dynamo guards on


class GlobalGain(LinearField):
    """dy/dt = GAIN · A y: a field that reads a module-level global."""

    def forward(self, t, y):
        return GAIN * (y @ self.a.T)


@pytest.mark.compiled
def test_compiled_graphs_run_without_dynamos_hook_and_their_guards_still_hold(monkeypatch):
    """After compiling, a program (here the loop graph) calls its graph itself (not through dynamo's
    frame hook), under dynamo's guards: a second solve goes through the hook not once; a changed global, which
    dynamo guards on, is still seen (a new graph, the new value's result)."""
    compiled.clear_cache()
    a, y0, t = _problem()
    func = GlobalGain(a)
    with torch.no_grad():
        first = ta.solve(func, y0, t, compile=True)
        (program,) = compiled.cached_programs("loop")  # the steps ran in one loop graph
        hooked = []
        through_hook = program.fn
        monkeypatch.setattr(program, "fn", lambda *args: hooked.append(1) or through_hook(*args))
        second = ta.solve(func, y0, t, compile=True)
        assert hooked == [] and second.stats["forward"]["graphs_compiled"] == 0
        torch.testing.assert_close(second.ys, first.ys, rtol=0, atol=0)
        monkeypatch.setattr(sys.modules[__name__], "GAIN", 0.5)
        halved = ta.solve(func, y0, t, compile=True)
        eager = ta.solve(func, y0, t)
    assert len(hooked) == 1 and halved.stats["forward"]["graphs_compiled"] == 1
    torch.testing.assert_close(halved.ys, eager.ys, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(halved.ys[-1], first.ys[-1])
    # Where dynamo's entries cannot be called directly (another torch), every call takes the hook.
    monkeypatch.setattr(program, "_dynamo_graphs", lambda: None)
    program._graphs = {}
    with torch.no_grad():
        hooked.clear()
        through = ta.solve(func, y0, t, compile=True)
        assert len(hooked) == 1 and program._graphs is None  # one loop graph call: all the steps fit
    torch.testing.assert_close(through.ys, halved.ys, rtol=0, atol=0)
    compiled.clear_cache()


@pytest.mark.parametrize("gradient", [ta.Backsolve, ta.Checkpointed])
def test_a_backward_with_nothing_to_solve_reports_the_compile_keys(gradient):
    """A loss that reads only y(t0) leaves the backward nothing to solve (dL/dy0 passes
    straight through): its stats still carry the compiled path's keys (0 graphs), as the docs
    say, rather than missing them (only the forward compiles)."""
    a, y0, t = _problem()
    func = LinearField(a)
    y = y0.clone().requires_grad_(True)
    solution = ta.solve(func, y, t, gradient=gradient(), compile=True)
    solution.ys[0].sum().backward()
    backward = solution.stats["backward"]
    assert backward["nfe"] == 0 and backward["graphs_compiled"] == 0 and backward["compile_seconds"] == 0.0
    assert backward["compiled"] is True
    assert torch.equal(y.grad, torch.ones_like(y)) and torch.equal(func.a.grad, torch.zeros_like(a))


@pytest.mark.compiled
def test_a_global_module_hook_registered_after_compiling_is_not_silently_ignored():
    """Dynamo does not guard on torch's global module hooks: a graph compiled before one was
    registered would run without it (the solve 91 % off eager's). The solve says so and runs
    eagerly, with the hook."""
    from torch.nn.modules.module import register_module_forward_hook

    compiled.clear_cache()
    a, y0, t = _problem()
    func = LinearField(a)
    with torch.no_grad():
        ta.solve(func, y0, t, compile=True)
        handle = register_module_forward_hook(lambda module, args, out: 0.5 * out)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                hooked = ta.solve(func, y0, t, compile=True)
            eager = ta.solve(func, y0, t)
        finally:
            handle.remove()
            compiled.clear_cache()
    messages = [str(w.message) for w in caught if issubclass(w.category, CompileWarning)]
    assert len(messages) == 1 and "global module hook" in messages[0], messages
    assert hooked.stats["forward"]["compiled"] is False
    torch.testing.assert_close(hooked.ys, eager.ys, rtol=0, atol=0)
    halved = torch.stack([y0 @ torch.linalg.matrix_exp(0.5 * a * s).T for s in t])
    torch.testing.assert_close(hooked.ys, halved, rtol=1e-6, atol=1e-8)


@pytest.mark.compiled
def test_a_program_leaving_the_cache_takes_its_graphs_with_it():
    """Dynamo keeps every compiled graph in the globals of the code it traced (the compiled
    module's), where it outlived its program: a program leaving the cache (evicted or cleared)
    lets go of its own, so memory does not grow with every program ever built (one per state
    shape, say)."""
    compiled.clear_cache()
    module = vars(compiled_loop)  # where the loop program's code lives, and dynamo puts its graphs
    graphs = lambda: {k for k in module if k.startswith("__compiled_fn")}  # noqa: E731
    before = graphs()
    a, y0, t = _problem()
    with torch.no_grad():
        ta.solve(LinearField(a), y0, t, compile=True)
    added = graphs() - before
    assert len(added) == 1
    (program,) = compiled.cached_programs("loop")
    graph = weakref.ref(module[next(iter(added))])
    compiled.clear_cache()
    del program
    gc.collect()
    assert graph() is None  # freed (its name may stay, emptied, until dynamo's own clean-up)
    assert all(module.get(name) is None for name in added)

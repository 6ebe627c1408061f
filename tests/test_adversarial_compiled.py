"""Adversarial checks of Backsolve's compiled backward (``solve(..., compile=True)``: each
backward Runge–Kutta step, every stage's ``f`` and vector-Jacobian product included, as one
torch.compile graph; see :mod:`torchadjoint.compiled`).

Each test runs a program a user could write both eagerly and compiled and holds the compiled
gradient to the eager one at rounding level (the two differ only in summation order), or to
an independent oracle (central differences of tight torchdiffeq solves in float64,
torchdiffeq's ``odeint_adjoint``). These found defects: a one-stage backward method
(``Backsolve(method="euler")``) raised ``IndexError`` from the compiled step's bookkeeping
(:func:`test_one_stage_backward_method`); with a running cost the warning that the backward
runs eagerly told the user to make their (module) f a module, and so it did for a float16 or
bfloat16 state (:func:`test_running_cost_backward_runs_eagerly_and_says_why`,
:func:`test_low_precision_backward_runs_eagerly_and_says_why`).

Compile-heavy tests are marked ``compiled``. Most share one small field class and state
shape so that, run together, they reuse each other's compiled programs.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import torchadjoint as ta
from torchadjoint.compiled import CompileWarning
from torchadjoint.regularisers import KineticEnergy

D = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-12)  # eager against compiled: rounding apart
# Every test solves with bosh3 (forward and backward) unless it says otherwise: an adaptive
# method (error estimate and norm inside the graph, rejections, the seminorm's a_θ estimate)
# whose graphs compile in about half dopri5's time. Most tests then reuse the programs the
# first compiled (one field class, one state shape, one dtype).
METHOD = "bosh3"


class Field(torch.nn.Module):
    """dy/dt = gain · tanh(y Wᵀ + b) - decay · y + forcing · sin(ω t) on (batch, 2) states.

    ``gain`` is a Python float (dynamo guards on it: changing it recompiles); ``decay`` and
    ``ω`` (and ``root_offset``, below) are buffers, so the tests that need a contracting or a fast-forced problem reuse the
    programs the others compiled (a buffer is a graph input, not a constant); ``unused`` is a
    parameter f never reads (its gradient is zero either way)."""

    def __init__(self, seed: int = 0, gain: float = 1.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(2, 2, generator=g, dtype=D))
        self.b = torch.nn.Parameter(0.3 * torch.randn(2, generator=g, dtype=D))
        self.forcing = torch.nn.Parameter(0.2 * torch.randn(2, generator=g, dtype=D))
        self.unused = torch.nn.Parameter(torch.ones(3, dtype=D))
        self.register_buffer("decay", torch.tensor(0.5, dtype=D))
        self.register_buffer("omega", torch.tensor(2.0, dtype=D))
        self.gain = gain

        # sqrt(y - y + root_offset) · 0 is 0 in f; its product for y is 0/0 = NaN where root_offset = 0.
        self.register_buffer("root_offset", torch.tensor(1.0, dtype=D))

    def forward(self, t, y):
        dy = self.gain * torch.tanh(y @ self.w.T + self.b) - self.decay * y + self.forcing * torch.sin(self.omega * t)
        return dy + torch.sqrt(y - y + self.root_offset) * 0.0

    def with_buffers(self, **values) -> "Field":
        with torch.no_grad():
            for name, value in values.items():
                getattr(self, name).fill_(value)
        return self


def _y0():
    return torch.tensor([[0.3, -0.6], [0.1, 0.9], [-1.2, 0.4]], dtype=D)


def _times():
    return torch.tensor([0.0, 0.35, 0.7, 1.0], dtype=D)


def _weighted(ys):
    """A loss that weighs every output entry differently (no symmetry hides a wrong sign)."""
    return (ys * torch.arange(1.0, 1.0 + ys.numel(), dtype=ys.dtype).view_as(ys)).sin().sum()


def _gradients(func, y0, t, compile, loss=_weighted, **options):
    """(dL/dy0, dL/dθ for each parameter of func requiring grad (None where unused), stats)."""
    y = y0.clone().requires_grad_(True)
    options.setdefault("method", METHOD)
    solution = ta.solve(func, y, t, compile=compile, **options)
    wanted = [y] + [p for p in func.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss(solution.ys), wanted, allow_unused=True)
    return grads, solution.stats


def _eager_and_compiled(make_func, y0, t, loss=_weighted, **options):
    """The same program eagerly and compiled (no CompileWarning: it really compiled)."""
    eager = _gradients(make_func(), y0, t, False, loss, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileWarning)
        fast = _gradients(make_func(), y0, t, True, loss, **options)
    return eager, fast


def _assert_same_gradients(eager, fast, **tolerance):
    for e, c in zip(eager[0], fast[0]):
        if e is None or c is None:
            assert e is None and c is None
        else:
            torch.testing.assert_close(c, e, **(tolerance or TIGHT))


@pytest.mark.compiled
@pytest.mark.parametrize("forward", ["euler", METHOD])
def test_one_stage_backward_method(forward):
    """Backsolve(method="euler") compiled: the step graph evaluates no stage beyond f0 (the
    loop's own call), so it has no side outputs. It raised IndexError (``sides[-1]`` of an
    empty tuple) in CompiledAdjointStepper.evaluated; now the eager numbers and counts."""
    options = dict(method=forward, rtol=1e-7, atol=1e-9, **(dict(step_size=0.05) if forward == "euler" else {}))
    gradient = ta.Backsolve(method="euler", options=dict(step_size=0.05), reconstruction_warning=None)
    eager, fast = _eager_and_compiled(Field, _y0(), _times(), gradient=gradient, **options)
    _assert_same_gradients(eager, fast)
    assert fast[1]["backward"]["compiled"]
    for key in ("nfe", "nvjp", "steps", "resets"):  # Euler keeps no graph: no extra evaluation
        assert fast[1]["backward"][key] == eager[1]["backward"][key], key


@pytest.mark.compiled
def test_counts_against_eager_on_a_densely_observed_series():
    """Twelve observed outputs: the compiled backward takes eager's steps, accepts, rejects and
    resets; makes as many vector-Jacobian products; and calls f once more per landing that
    was not a reset (eager reuses the jump's kept graph, a compiled step cannot)."""
    t = torch.linspace(0.0, 2.0, 12, dtype=D)
    eager, fast = _eager_and_compiled(Field, _y0(), t, rtol=1e-7, atol=1e-9)
    _assert_same_gradients(eager, fast)
    e, c = eager[1]["backward"], fast[1]["backward"]
    for key in ("steps", "accepted", "rejected", "resets", "nvjp"):
        assert c[key] == e[key], (key, c[key], e[key])
    landings = len(t) - 2  # the observed outputs strictly between the last one and t_0
    assert c["nfe"] == e["nfe"] + landings - c["resets"]
    assert c["compiled"] is True
    assert (c["graphs_compiled"] > 0) == (c["compile_seconds"] > 0)


@pytest.mark.compiled
def test_two_instances_of_one_class_a_changed_attribute_and_a_frozen_parameter():
    """Programs are cached per class: two instances solved, then differentiated through one
    loss, each get their own weights' gradients. A Python attribute changed between solves
    reaches the graph (dynamo guards on it), and freezing a parameter changes the program
    (its gradient is not asked for) without mixing up the others."""
    t = torch.tensor([0.0, 1.0], dtype=D)
    results = {}
    for compile in (False, True):
        first, second = Field(0), Field(1)
        y = _y0().requires_grad_(True)
        a = ta.solve(first, y, t, method=METHOD, rtol=1e-8, atol=1e-10, compile=compile)
        b = ta.solve(second, y, t, method=METHOD, rtol=1e-8, atol=1e-10, compile=compile)
        loss = _weighted(a.ys) + 3.0 * _weighted(b.ys)
        results[compile] = torch.autograd.grad(loss, [y, first.w, first.b, second.w, second.b])
    for e, c in zip(results[False], results[True]):
        torch.testing.assert_close(c, e, **TIGHT)

    def changed():
        func = Field(0, gain=2.5)
        func.b.requires_grad_(False)
        return func

    eager, fast = _eager_and_compiled(changed, _y0(), t, rtol=1e-8, atol=1e-10)
    _assert_same_gradients(eager, fast)
    assert fast[1]["backward"]["compiled"]


@pytest.mark.compiled
def test_reversed_offset_times_and_a_loss_on_some_outputs_only():
    """Output times reversed and offset by 100; the loss reads one batch row at two outputs,
    the one in between not at all (no landing there)."""
    t = 100.0 - torch.tensor([0.0, 0.3, 0.6, 1.0], dtype=D)
    eager, fast = _eager_and_compiled(Field, _y0(), t, loss=lambda ys: _weighted(ys[[1, 3], 0]), rtol=1e-8, atol=1e-10)
    _assert_same_gradients(eager, fast)
    assert fast[1]["backward"]["compiled"]


@pytest.mark.compiled
def test_nan_in_the_backward_products_is_named_as_eagerly():
    """The SolveError says where and which product became NaN, as the eager one does (the
    compiled step hands its last stage's f, a_y and products to the explanation)."""
    messages = {}
    for compile in (False, True):
        y = _y0().requires_grad_(True)
        solution = ta.solve(Field().with_buffers(root_offset=0.0), y, _times(), method=METHOD, compile=compile)
        with pytest.raises(ta.SolveError) as caught:
            _weighted(solution.ys).backward()
        messages[compile] = str(caught.value)
    assert "its part for y" in messages[True] and "t=1" in messages[True]
    assert messages[True] == messages[False]


@pytest.mark.compiled
def test_explosion_guard_ends_a_compiled_backward_on_a_contracting_problem():
    """decay = 40: the reversed dynamics explode; the guard (on the host, after each compiled
    step) ends the solve where it ends eagerly."""
    errors = {}
    for compile in (False, True):
        y = _y0().requires_grad_(True)
        solution = ta.solve(Field().with_buffers(decay=40.0), y, torch.tensor([0.0, 2.0], dtype=D),
                            method=METHOD, rtol=1e-7, atol=1e-9, compile=compile)
        with pytest.raises(ta.SolveError) as caught:
            _weighted(solution.ys).backward()
        errors[compile] = caught.value
    assert "exploding backwards" in str(errors[True])
    assert errors[True].t == pytest.approx(errors[False].t, rel=1e-9)


def test_running_cost_backward_runs_eagerly_and_says_why():
    """A running cost wraps f (a module here) and the cost into one function, which the compiled
    backward cannot differentiate by parameters: it runs eagerly, with the eager gradients. The
    warning told the user to "make f a module" — it is one; it now names the running cost.
    (The backward alone asks to compile: nothing is compiled, the warning comes first.)"""
    t = _times()

    def run(gradient):
        func = Field()
        y = _y0().requires_grad_(True)
        solution = ta.solve(func, y, t, method=METHOD, rtol=1e-8, atol=1e-10, running_cost=KineticEnergy(),
                            gradient=gradient)
        loss = _weighted(solution.ys) + solution.running_cost.sum()
        return torch.autograd.grad(loss, [y, func.w, func.b, func.forcing])

    eager = run(ta.Backsolve())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asked = run(ta.Backsolve(options={"compile": True}))
    said = [str(w.message) for w in caught if issubclass(w.category, CompileWarning)]
    assert len(said) == 1 and "running cost" in said[0] and "Make f a module" not in said[0], said
    for e, c in zip(eager, asked):
        assert torch.equal(c, e)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_backward_runs_eagerly_and_says_why(dtype):
    """A float16/bfloat16 state is integrated in float32 through a wrapper around f: the
    compiled backward cannot differentiate the module's parameters through it and runs
    eagerly. The warning said "f is not an nn.Module" of a module f; it now names the
    widening. (The backward alone asks to compile: nothing is compiled.)"""

    def run(gradient):
        func = Field().to(dtype)
        y = _y0().to(dtype).requires_grad_(True)
        solution = ta.solve(func, y, _times().to(dtype), method=METHOD, rtol=1e-2, atol=1e-4, gradient=gradient)
        return torch.autograd.grad(_weighted(solution.ys.double()), [y, func.w, func.b, func.forcing])

    eager = run(ta.Backsolve())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asked = run(ta.Backsolve(options={"compile": True}))
    said = [str(w.message) for w in caught if issubclass(w.category, CompileWarning)]
    assert len(said) == 1 and str(dtype) in said[0] and "Make f a module" not in said[0], said
    for e, c in zip(eager, asked):
        assert torch.equal(c, e)


@pytest.mark.compiled
def test_seminorm_fallback_redone_under_the_full_norm_as_eagerly():
    """forcing 1e-4 at ω = 60: y and a_y smooth, the forcing's a_θ integrand oscillating fast.
    The seminorm's a_θ error estimate exceeds its limit and the pass is redone with a_θ in the
    state (a second compiled step program): same decision, counts and gradients as eager.
    They agree to 1e-7, not to rounding: on such a problem a 1-ulp change of y0 moves the eager
    answer by ~1e-9 (step control amplifies it); measured eager/compiled ~1e-8."""

    def forced():
        func = Field().with_buffers(omega=60.0)
        with torch.no_grad():
            func.forcing.fill_(1e-4)
        return func

    eager, fast = _eager_and_compiled(forced, _y0(), torch.tensor([0.0, 1.0], dtype=D),
                                      loss=lambda ys: (ys ** 2).sum(), rtol=1e-7, atol=1e-9)
    _assert_same_gradients(eager, fast, rtol=1e-7, atol=1e-12)
    e, c = eager[1]["backward"], fast[1]["backward"]
    assert e["seminorm_fallback"] and c["seminorm_fallback"]
    for key in ("nfe", "nvjp", "seminorm_nfe", "steps"):
        assert c[key] == e[key], key
    assert c["compiled"]


def _gentle(ys):
    """A loss whose third derivatives are small: central differences of it are accurate."""
    return (ys[[1, 3]] * torch.tensor([0.5, -1.0], dtype=ys.dtype)).sum() + 0.5 * (ys[3] ** 2).sum()


@pytest.mark.compiled
def test_against_central_differences_of_torchdiffeq_solves():
    """Independent truth: central differences (h = 1e-5, float64) of the loss through tight
    torchdiffeq solves, against the compiled Backsolve gradient for y0, W, b and the forcing,
    with a time-dependent f, offset times and an unobserved output in between."""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    t = 10.0 + torch.tensor([0.0, 0.5, 0.9, 1.4], dtype=D)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileWarning)
        fast, _ = _gradients(Field(), _y0(), t, True, _gentle, rtol=1e-10, atol=1e-12)
    func, y0 = Field(), _y0()

    def central_difference(target, h=1e-5):
        """dL/d(target), target (y0 or a parameter's data) moved in place and put back."""
        numeric = torch.zeros_like(target)
        for i in range(target.numel()):
            original = float(target.view(-1)[i])
            values = []
            for x in (original + h, original - h):
                target.view(-1)[i] = x
                with torch.no_grad():
                    values.append(float(_gentle(torchdiffeq.odeint(func, y0, t, rtol=1e-13, atol=1e-15))))
            target.view(-1)[i] = original
            numeric.view(-1)[i] = (values[0] - values[1]) / (2 * h)
        return numeric

    for found, target in zip(fast, [y0, func.w.data, func.b.data, func.forcing.data]):
        torch.testing.assert_close(found, central_difference(target), rtol=1e-6, atol=1e-8)
    assert torch.equal(fast[4], torch.zeros(3, dtype=D))  # the unused parameter


@pytest.mark.compiled
def test_against_torchdiffeq_odeint_adjoint():
    """Independent truth: torchdiffeq's odeint_adjoint on the same program, tight tolerances."""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    t = _times()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileWarning)
        fast, _ = _gradients(Field(2), _y0(), t, True, rtol=1e-10, atol=1e-12)
    func = Field(2)
    y = _y0().requires_grad_(True)
    ys = torchdiffeq.odeint_adjoint(func, y, t, rtol=1e-12, atol=1e-14, method="dopri5",
                                    adjoint_params=(func.w, func.b, func.forcing))
    reference = torch.autograd.grad(_weighted(ys), [y, func.w, func.b, func.forcing])
    for c, r in zip(fast, reference):
        torch.testing.assert_close(c, r, rtol=1e-6, atol=1e-8)

"""Terminal events: integrate until ``event_fn(t, y)`` crosses zero; the event time is differentiable.

**Finding the event.** The solve checks the event function at the end of every accepted
step (one call per step). A multivariate event function stops at the first component to
cross (torchdiffeq's rule: components are flipped to start positive and the minimum ``g``
is watched). In the first step whose end has ``g <= 0``, the event time is the *first*
point of the step where ``g(t_a + θh, y(t_a + θh)) <= 0`` on the step's dense output: the
step is scanned at ``SCAN`` evenly spaced points (the earliest sub-interval that crosses
wins, so a later root in the same step, or an event function that is exactly zero from
some time on, cannot hide an earlier crossing), then the crossing in that sub-interval is
located by the Illinois method (regula falsi that cannot stall), which falls back to
bisection on the sign whenever the root is not bracketed by values of opposite sign (an
exact zero, a jump) or the bracket fails to halve, down to a few ulps of ``t``. The step is
not redone and ``f`` is not called again. A component that crosses and crosses back
inside one step, with the step's ends on the same side, is not seen (as in torchdiffeq):
bound the steps with ``max_step`` (or ``step_size``) when that can happen.

**Differentiating the event.** The event time ``τ`` solves ``g(τ, y(τ; θ), θ) = 0``, so by
the implicit-function theorem::

    dτ/dθ = -(∂g/∂y · ∂y/∂θ + ∂g/∂θ) / ġ,      ġ = ∂g/∂t + ∂g/∂y · f(τ, y(τ))

and the state returned there, ``y(τ(θ); θ)``, moves with ``τ`` at speed ``f``:
``dy_τ/dθ = ∂y/∂θ + f · dτ/dθ``. Both are built from autograd pieces whose *values* are
zero and whose gradients are these formulas (``ġ`` and ``f`` enter as constants, so first
derivatives are exact; higher ones are not provided). ``∂y/∂θ`` at the fixed time ``τ``
comes from the chosen gradient method: with ``Direct()`` it is autograd through the very
steps of the search (the dense output at ``τ`` carries the graph); with an adjoint method
the solve from ``t0`` to ``τ`` is repeated under that method (the forward pass then costs
two solves). ``∂y/∂t0`` is handled as in :func:`torchadjoint.solve`.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from .adjoint.base import GradientMethod
from .errors import SolveError
from .integrate import CountedCalls, StepInfo, integrate
from .implicit.substep import ImplicitSubsteps
from .interpolation import interpolate, needs_f1
from .options import SolverOptions
from .problem import Problem, make_controller, make_flat_func, option_landings, solve_flat
from .solve import LOW_PRECISION, resolve_gradient, solve, widened, widened_options
from .time_gradients import StartTime
from .validation import check_entry, resolve_params

# The adaptive search has no end time; integrate() needs one. An event later than this is
# treated as no event at all (the solve reports it).
FAR = 1e30
# The fixed-step search builds its grid this many steps at a time (it has no end either).
CHUNK = 256
# The step where the event function's sign changed is scanned at this many sub-intervals
# for the earliest one that crosses (15 extra event_fn calls per event, no f calls).
SCAN = 16


@dataclass
class EventSolution:
    """Result of :func:`solve_to_event`.

    Attributes:
        t: 0-dim tensor, the event time (dtype and device of ``t0``), differentiable.
        y: the state at the event time, in the structure of ``y0``, differentiable.
        stats: ``stats["forward"]``: the search (``nfe``, ``steps``, ``accepted``,
            ``rejected``, ``event_calls``, ``root_iterations``); ``stats["gradient_solve"]``:
            the stats of the repeated solve to ``τ`` when an adjoint method needed one.
    """

    t: torch.Tensor
    y: Any
    stats: dict = field(default_factory=dict)


def solve_to_event(
    func: Callable,
    y0: Any,
    t0: torch.Tensor,
    event_fn: Callable,
    *,
    direction: float = 1.0,
    method: Any = "dopri5",
    gradient: Optional[GradientMethod] = None,
    params: Optional[Sequence[torch.Tensor]] = None,
    **options: Any,
) -> EventSolution:
    """Solve ``dy/dt = func(t, y)`` from ``y(t0) = y0`` until ``event_fn(t, y)`` crosses zero.

    Args:
        func: ``func(t, y) -> dy/dt`` as for :func:`torchadjoint.solve`.
        y0: initial state, a tensor or a tuple/list/dict of tensors.
        t0: start time, a tensor with one element (may require grad).
        event_fn: ``event_fn(t, y) -> tensor`` (any shape); the solve stops when any
            component changes sign from its value at ``t0``. A component that is zero at
            ``t0`` is an event at ``t0``. Its own parameters receive gradients too.
        direction: ``+1.0`` integrates forward in time, ``-1.0`` backward. There is no
            end time: the solve runs until the event (or ``max_num_steps``).
        method, gradient, params, **options: as for :func:`torchadjoint.solve`
            (``gradient`` defaults to ``Backsolve()``). A fixed-step method needs
            ``step_size`` (a ``grid_constructor`` has no grid past its last time).

    Returns:
        :class:`EventSolution` with the event time and the state there.

    Raises:
        ValueError, TypeError: for bad arguments (the message names the argument).
        SolveError: the solve stopped (too many steps, step underflow) or ran past
            ``|t - t0| = 1e30`` without an event.
    """
    flattener, dtype, device = check_entry("solve_to_event()", func, y0, options, _refuse_function_transforms,
                                           event_fn=event_fn)
    t0 = _check_t0(t0)
    if dtype in LOW_PRECISION:
        return _solve_to_event_widened(func, y0, t0, event_fn, dtype, direction, method, gradient, params, options)
    direction, opts = _search_options(direction, method, options)
    gradient = resolve_gradient(gradient)
    params = resolve_params(func, params)

    t0f = float(t0.detach())
    y0_flat = flattener.flatten(y0)
    problem = Problem(func, flattener, (t0f, t0f + direction * FAR), params, dtype, device)
    g = _combined_event(event_fn, flattener, dtype, device, t0f, y0_flat)
    with torch.no_grad():
        g_start = float(g(problem.time_tensor(t0f), y0_flat.detach()))
    if g_start == 0.0:
        # torchdiffeq's rule: a component that starts at zero is an event at t0.
        stats = {"forward": dict(nfe=0, steps=0, accepted=0, rejected=0, event_calls=1, root_iterations=0)}
        return EventSolution(t0.reshape(()), y0, stats)

    grad_on = torch.is_grad_enabled()
    # Autograd through the search itself: the dense output at the event then carries the graph.
    direct = grad_on and gradient.records_graph
    flat_func = make_flat_func(problem)
    start = StartTime.apply(flat_func, y0_flat, t0.reshape(1), t0f) if direct and t0.requires_grad else y0_flat
    crossing, theta, stats = _find_event(problem, opts, flat_func, g, g_start, start, direction, direct)
    t_star = crossing.time_at(theta)
    y_star = crossing.state_at(theta, detached=not direct)
    if not direct and t_star != t0f and grad_on and (
            y0_flat.requires_grad or t0.requires_grad or any(p.requires_grad for p in params)):
        # ∂y/∂θ at the fixed time τ from the chosen method: the solve t0 → τ once more.
        solution = _solve_again(func, y0, t0, t_star, opts, options, gradient, params)
        stats["gradient_solve"] = solution.stats
        y_resolved = flattener.flatten(solution.y_final)
        y_star = y_star + (y_resolved - y_resolved.detach())

    t_event, y_event = _implicit_gradients(g, flat_func, problem, t_star, y_star, t0, grad_on,
                                           lambda: crossing.crossed_by_time(g, problem, theta))
    stats["forward"]["nfe"] += crossing.extra_nfe  # the crossing step's own evaluations, all of them by now
    return EventSolution(t_event, flattener.unflatten(y_event), stats)


def _search_options(direction: Any, method: Any, options: dict):
    """``(direction as a float, SolverOptions)`` of an event search, checked."""
    if direction not in (1, -1):
        raise ValueError(f"direction must be 1.0 (forward in time) or -1.0 (backward), got {direction!r}")
    opts = SolverOptions.build(method=method, **options)
    if not opts.method.adaptive and opts.step_size is None:
        raise ValueError(
            f"an event solve with the fixed-step method {opts.method.name!r} needs step_size=...: a grid_constructor "
            f"cannot say where steps go past its last time"
        )
    return float(direction), opts


def _find_event(problem: Problem, opts: SolverOptions, flat_func, g, g_start: float, start: torch.Tensor,
                direction: float, direct: bool):
    """Integrate from ``start`` until ``g`` is no longer positive, then locate the first
    crossing on that step's dense output: ``(crossing step, theta, stats)``. With
    ``direct`` the search records autograd through its steps."""
    search = _Search(g, problem, g_start)
    with torch.enable_grad() if direct else torch.no_grad():
        run = _search_fixed if not opts.method.adaptive else _search_adaptive
        run_stats = run(problem, opts, flat_func, start, search, direction)
    if search.info is None:
        raise SolveError(run_stats["t_end"], f"event_fn did not change sign within |t - t0| = {FAR:g}")
    crossing = _CrossingStep(search.info, opts, flat_func, direct, problem)
    theta, iterations = first_crossing(
        lambda x: crossing.event_value(g, problem, x), search.g_before, search.g_after, crossing.xtol)
    stats = {"forward": dict(
        {k: v for k, v in run_stats.items() if k != "t_end"},
        nfe=run_stats["nfe"], event_calls=search.calls + iterations + 1, root_iterations=iterations,
    )}
    return crossing, theta, stats


class _CrossingStep:
    """The dense output of the accepted step where the event function's sign changed,
    at fractions ``theta`` in [0, 1] of the step (``f`` at its end evaluated once more when
    the interpolant needs it and the step did not keep it). With ``direct`` the step's
    tensors carry the search's graph. ``extra_nfe``: the evaluations of ``f`` made here.

    Inside an implicit method's step the state comes from a shorter implicit step from its
    start (:mod:`torchadjoint.implicit.substep`), not from the dense output (then cubic
    Hermite), which is far off over long stiff steps: Robertson's event y2 = 1e-6 was located 1.6e-3
    (relative) early, y2 = 1e-7 1.6e-2, at rtol 1e-6."""

    def __init__(self, info: StepInfo, opts: SolverOptions, flat_func, direct: bool, problem: Problem):
        y0 = info.y0
        self.info, self.h = info, info.t1 - info.t0
        self.coeffs = opts.method.as_tensors(y0.dtype, y0.device)
        self.linear = opts.interpolation == "linear"
        self._f = CountedCalls(flat_func)
        f1 = info.f1
        self.substeps = None
        if getattr(opts.method, "implicit", False) and not self.linear:
            self.substeps = ImplicitSubsteps(
                opts.method, make_controller(problem, opts), self._f, self.coeffs, record_graph=direct,
                advice="the event search needs the state there; bound the steps with max_step")
        elif f1 is None and not self.linear and needs_f1(self.coeffs, opts.method.stages):
            with torch.enable_grad() if direct else torch.no_grad():
                f1 = self._f(info.t1, info.y1)
        self.parts = (info.y0, info.y1, info.stages, f1)
        self.detached = tuple(None if x is None else x.detach() for x in self.parts)
        # The root is located to a few ulps of t.
        scale = max(abs(info.t0), abs(info.t1), abs(self.h))
        self.xtol = 4 * math.ulp(scale) / abs(self.h)

    def time_at(self, theta: float) -> float:
        return self.info.t1 if theta == 1.0 else self.info.t0 + theta * self.h

    @property
    def extra_nfe(self) -> int:
        return self._f.calls

    def state_at(self, theta: float, detached: bool = True) -> torch.Tensor:
        y_a, y_b, stages, f_end = self.detached if detached else self.parts
        if theta == 1.0:
            return y_b
        if self.substeps is not None and theta > 0.0:
            return self.substeps(self.info.t0, y_a, stages[0], self.time_at(theta))
        return interpolate(self.coeffs, y_a, y_b, stages, f_end, self.h, [theta], self.linear)[0]

    def event_value(self, g, problem: Problem, theta: float) -> float:
        with torch.no_grad():
            return float(g(problem.time_tensor(self.time_at(theta)), self.state_at(theta)))

    def crossed_by_time(self, g, problem: Problem, theta: float) -> bool:
        """Whether the time alone crossed at ``theta``: ``g`` at the event time with the state
        from just before it is already ``<= 0`` (a jump in t, such as an end-time trick; not a
        jump in y)."""
        with torch.no_grad():
            before = self.state_at(max(0.0, theta - 2 * self.xtol))
            return float(g(problem.time_tensor(self.time_at(theta)), before)) <= 0


def _solve_again(func, y0, t0: torch.Tensor, t_star: float, opts: SolverOptions, options: dict, gradient, params):
    """The solve from ``t0`` to the event time ``t_star`` under ``gradient``, with the search's
    method and options (its ``step_t``/``jump_t`` restricted to that interval)."""
    t0f = float(t0.detach())
    times = torch.stack([t0.reshape(()), t0.new_tensor(t_star)])
    again = {k: v for k, v in options.items() if k not in ("step_t", "jump_t")}
    for name in ("step_t", "jump_t"):
        inside = [x for x in getattr(opts, name) if min(t0f, t_star) <= x <= max(t0f, t_star)]
        if inside:
            again[name] = inside
    return solve(func, y0, times, method=opts.method, gradient=gradient, params=params, **again)


def _solve_to_event_widened(func, y0, t0, event_fn, dtype, direction, method, gradient, params, options) -> EventSolution:
    """A float16/bfloat16 search, integrated in float32 as :func:`torchadjoint.solve` does
    (in float16 the steps stalled into a 'step size underflow' at t0); ``func`` and
    ``event_fn`` see the state's own dtype, the state at the event is returned in it."""
    options = widened_options(method, options, dtype)
    params = resolve_params(func, params)  # the module's parameters, before func is wrapped
    func_wide, y0_wide, narrow = widened(func, y0, dtype)

    def event_in_own_dtype(t, y_wide):
        return event_fn(t.to(dtype), narrow(y_wide))

    result = solve_to_event(func_wide, y0_wide, t0, event_in_own_dtype, direction=direction, method=method,
                            gradient=gradient, params=params, **options)
    return EventSolution(result.t, narrow(result.y), result.stats)


def _refuse_function_transforms(kinds) -> None:
    """An event solve under torch.func (grad, vmap, ...) failed deep inside torch (the event
    gradient calls requires_grad_; the search branches on the event's sign): say so here."""
    raise NotImplementedError(
        f"solve_to_event()/odeint_event() cannot run under torch.func transforms ({', '.join(sorted(kinds))}): the "
        "search branches on the event function's sign on the host, and the event time's gradient is attached by "
        "autograd. Use loss.backward() or torch.autograd.grad, and batch inside the state instead of vmap."
    )


def _check_t0(t0: Any) -> torch.Tensor:
    if not isinstance(t0, torch.Tensor):
        raise TypeError(f"t0 must be a tensor with one element, got {type(t0).__name__}; use torch.tensor(0.0)")
    if not t0.dtype.is_floating_point:
        raise TypeError(f"t0 must have a floating-point dtype, got {t0.dtype}; use t0.double()")
    if t0.numel() != 1:
        raise ValueError(f"t0 must have exactly one element, got shape {tuple(t0.shape)}")
    if not math.isfinite(float(t0.detach())):
        raise ValueError(f"t0 must be finite, got {float(t0.detach())}")
    return t0


def _combined_event(event_fn: Callable, flattener, dtype, device, t0: float, y0_flat: torch.Tensor):
    """``g(t, y_flat) -> 0-dim``: the event function's components, each flipped to start
    positive, reduced by ``min`` (the first to cross zero ends the solve)."""
    with torch.no_grad():
        c0 = event_fn(torch.tensor(t0, dtype=dtype, device=device), flattener.unflatten(y0_flat.detach()))
    if not isinstance(c0, torch.Tensor) or not c0.dtype.is_floating_point or c0.numel() == 0:
        raise TypeError(
            f"event_fn(t, y) must return a non-empty floating-point tensor, got "
            f"{type(c0).__name__ if not isinstance(c0, torch.Tensor) else f'a tensor of dtype {c0.dtype} and shape {tuple(c0.shape)}'}"
        )
    c0 = _components(c0)
    if not bool(torch.isfinite(c0).all()):
        raise ValueError(f"event_fn(t0, y0) returned non-finite values {c0}; the event function must be finite at the start")
    signs = torch.sign(c0)
    shape = c0.shape

    def g(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c = event_fn(t, flattener.unflatten(y))
        if isinstance(c, torch.Tensor):
            c = _components(c)
        if not isinstance(c, torch.Tensor) or c.shape != shape:
            got = f"shape {tuple(c.shape)}" if isinstance(c, torch.Tensor) else type(c).__name__
            raise TypeError(
                f"event_fn(t, y) returned {got} at t={float(t):.6g}; it must always return the shape it returned at t0, "
                f"{tuple(shape)} (a 0-dim value counts as shape (1,))"
            )
        return (c * signs).min()

    return g


def _components(c: torch.Tensor) -> torch.Tensor:
    """A 0-dim event value is one component, like shape (1,): ``torch.sum(...)``-style event
    functions, and ones returning ``torch.zeros(1)`` on one branch, switch between the two."""
    return c.reshape(1) if c.dim() == 0 else c


class _Search:
    """``on_accept`` hook: evaluates the event function at each accepted step's end and
    stops the solve at the first step where it is no longer positive."""

    def __init__(self, g, problem: Problem, g_start: float):
        self.g, self.problem = g, problem
        self.g_before = g_start  # g at the start of the step being checked
        self.g_after = None
        self.info: Optional[StepInfo] = None
        self.calls = 0

    def __call__(self, info: StepInfo) -> bool:
        with torch.no_grad():
            value = float(self.g(self.problem.time_tensor(info.t1), info.y1.detach()))
        self.calls += 1
        if math.isnan(value):
            raise SolveError(info.t1, "event_fn returned NaN")
        if value > 0:
            self.g_before = value
            return False
        self.info, self.g_after = info, value
        return True


def _search_adaptive(problem, opts, flat_func, y0, search, direction) -> dict:
    result = solve_flat(problem, opts, y0, func=flat_func, on_accept=search)
    return dict(result.stats, t_end=result.t_end)


def _search_fixed(problem, opts, flat_func, y0, search, direction) -> dict:
    """The grid ``t0 + k·step_size`` built ``CHUNK`` steps at a time (same points as one
    long solve; the chunks continue each other)."""
    t0 = problem.times[0]
    h = opts.step_size
    total = dict(nfe=0, steps=0, accepted=0, rejected=0)
    t, y, f0, k = t0, y0, None, 0
    while True:
        left = opts.max_num_steps - total["steps"]
        if left <= 0:
            raise SolveError(t, f"max_num_steps={opts.max_num_steps} exceeded before event_fn changed sign")
        grid = [t0 + direction * (k + j) * h for j in range(1, CHUNK + 1)]
        result = integrate(
            flat_func, y, t, grid[-1], (t,), opts.method, grid=grid, landings=option_landings(opts),
            max_num_steps=left, linear_interpolation=opts.interpolation == "linear", f0=f0, on_accept=search,
        )
        for key in total:
            total[key] += result.stats[key]
        if search.info is not None or abs(result.t_end - t0) >= FAR:
            return dict(total, t_end=result.t_end)
        t, y, f0, k = result.t_end, result.y_end, result.f_end, k + CHUNK


def first_crossing(phi: Callable[[float], float], f_lo: float, f_hi: float, xtol: float, scan: int = SCAN):
    """The first ``x`` in (0, 1] with ``phi(x) <= 0``, given ``phi(0) = f_lo > 0 >= phi(1) = f_hi``.

    ``phi`` is evaluated at ``j / scan`` for ``j = 1 … scan-1`` until one is ``<= 0``; the
    crossing in the first such sub-interval is then refined by :func:`illinois`. Returns
    ``(x, calls)``: ``phi(x) <= 0`` and ``phi`` is positive at ``x - xtol`` (to the
    resolution of the scan: a crossing and re-crossing within ``1/scan`` of the step before
    the first sub-interval that ends crossed is not seen).
    """
    a, fa, b, fb = 0.0, f_lo, 1.0, f_hi
    calls = 0
    for j in range(1, scan):
        x = j / scan
        fx = phi(x)
        calls += 1
        if math.isnan(fx):
            raise SolveError(x, "event_fn returned NaN while locating the event")
        if fx <= 0:
            b, fb = x, fx
            break
        a, fa = x, fx
    x, iterations = illinois(phi, fa, fb, xtol, lo=a, hi=b)
    return x, calls + iterations


def illinois(phi: Callable[[float], float], f_lo: float, f_hi: float, xtol: float, max_iter: int = 200,
             lo: float = 0.0, hi: float = 1.0):
    """The first point where ``phi`` is ``<= 0`` in [lo, hi], given ``phi(lo) = f_lo > 0 >= phi(hi) = f_hi``
    and a single crossing in between (a root, a jump, or the start of a stretch where ``phi``
    is exactly zero).

    The Illinois variant of regula falsi (superlinear, never stuck on one side), falling
    back to bisection on the sign when the secant point is not strictly inside (``phi`` is
    exactly zero at the crossed end: the secant would stop there, although ``phi`` may have
    crossed earlier) or the bracket fails to halve. An exact zero inside is accepted only
    once ``phi`` is positive just before it. Returns ``(x, iterations)`` with ``x`` on the
    crossed side (``phi(x) <= 0``) within ``xtol`` of the crossing.
    """
    a, b, fa, fb = lo, hi, f_lo, f_hi
    side, width, it = 0, hi - lo, 0
    bisect = False
    while b - a > xtol and it < max_iter:
        it += 1
        x = 0.5 * (a + b) if bisect or fb == 0.0 else (a * fb - b * fa) / (fb - fa)
        if not a < x < b:
            x = 0.5 * (a + b)
        fx = phi(x)
        if math.isnan(fx):
            raise SolveError(x, "event_fn returned NaN while locating the event")
        if fx == 0.0:
            # A root, or inside a stretch of zeros: it is the first crossing only if phi is
            # still positive just before it.
            before = max(a, x - xtol)
            it += 1
            f_before = phi(before) if before > a else fa
            if f_before > 0:
                return x, it
            b, fb = (before, f_before) if before > a else (x, fx)
            side, bisect = -1, True
            width = b - a
            continue
        if fx > 0:
            a, fa = x, fx
            if side == 1:
                fb *= 0.5  # the same end twice in a row: halve the other's weight (Illinois)
            side = 1
        else:
            b, fb = x, fx
            if side == -1:
                fa *= 0.5
            side = -1
        bisect = b - a > 0.5 * width
        width = b - a
    return b, it


class _NoDerivative(torch.autograd.Function):
    """The event time where the event function jumps in ``y``: in the graph of ``y_star`` so
    that a loss may contain it, but a non-zero gradient into it is a SolveError."""

    @staticmethod
    def forward(ctx, t_event, y_star, t_star):
        ctx.t_star, ctx.shape = t_star, y_star.shape
        return t_event.clone()

    @staticmethod
    def backward(ctx, grad):
        if grad is not None and bool((grad != 0).any()):
            raise SolveError(
                ctx.t_star,
                "the event function jumps in y at the event (it is constant in y on both sides, e.g. a sign or a "
                "threshold): the event time moves with the parameters but has no derivative that can be computed. "
                "Use an event function that crosses zero continuously (e.g. y - level instead of sign(y - level)), "
                "or keep the event time out of the loss",
            )
        return None, grad.new_zeros(ctx.shape) if grad is not None else None, None


def _held(t_event: torch.Tensor, y_star: torch.Tensor) -> torch.Tensor:
    """``t_event`` attached to the graph of ``y_star`` with a zero gradient."""
    if not y_star.requires_grad:
        return t_event
    return t_event + y_star.sum().mul(0.0).to(t_event.dtype)


def _implicit_gradients(g, flat_func, problem: Problem, t_star: float, y_star: torch.Tensor, t0: torch.Tensor, grad_on: bool,
                        crossed_by_time: Callable[[], bool] = lambda: True):
    """The event time and state with their implicit-function-theorem gradients attached."""
    t_event = torch.tensor(t_star, dtype=t0.dtype, device=t0.device)
    if not grad_on:
        return t_event, y_star
    t_tensor = problem.time_tensor(t_star)
    G = g(t_tensor, y_star)
    if not G.requires_grad:
        # The event function does not depend on y or parameters here. If the time alone
        # crossed (an end-time trick, a component in t only), the event time does not move
        # with them: zero gradient, still in the graph so that a loss on it backpropagates
        # (as in torchdiffeq). If it jumped in y, the time moves but has no derivative to
        # compute: a gradient through it would be garbage, so asking for one is an error.
        if crossed_by_time():
            return _held(t_event, y_star), y_star
        return _NoDerivative.apply(t_event, y_star, t_star), y_star
    with torch.enable_grad():
        td = t_tensor.clone().requires_grad_(True)
        yd = y_star.detach().requires_grad_(True)
        dg_dt, dg_dy = torch.autograd.grad(g(td, yd), (td, yd), allow_unused=True)
    with torch.no_grad():
        f_star = flat_func(t_star, y_star.detach())
        g_dot = (dg_dy * f_star).sum() if dg_dy is not None else torch.zeros((), dtype=yd.dtype, device=yd.device)
        if dg_dt is not None:
            g_dot = g_dot + dg_dt
    if float(g_dot) == 0.0:
        warnings.warn(
            f"the event at t={t_star:.10g} is tangential (d/dt event_fn(t, y(t)) = 0 there): the event time has no "
            f"derivative, so no gradient flows through it",
            RuntimeWarning,
            stacklevel=3,
        )
        return _held(t_event, y_star), y_star
    # Zero in value; gradient -(∂g/∂y · dy* + ∂g/∂θ) / ġ: the implicit-function theorem.
    delta = -(G - G.detach()) / g_dot
    return t_event + delta.to(t0.dtype), y_star + f_star * delta

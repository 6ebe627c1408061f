"""``solve``: the one entry point for every solve, whatever the gradient method."""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Optional, Sequence, Set

import torch

from .adjoint.backsolve import Backsolve
from .adjoint.base import GradientMethod
from .controller import clamp_rtol
from .errors import TimeResolutionWarning, user_stacklevel
from .integrate import check_interval
from .options import SolverOptions, resolve_method
from .problem import Problem, make_flat_func, solve_flat
from .pytree import tree_leaves, tree_unflatten
from .running_cost import with_running_cost
from .solution import Solution
from .time_gradients import OutputTimes, StartTime
from .validation import check_entry, check_times, check_times_inside, resolve_params


def solve(
    func: Callable,
    y0: Any,
    t: torch.Tensor,
    *,
    method: str = "dopri5",
    gradient: Optional[GradientMethod] = None,
    params: Optional[Sequence[torch.Tensor]] = None,
    running_cost: Optional[Callable] = None,
    **options: Any,
) -> Solution:
    """Solve ``dy/dt = func(t, y)``, ``y(t[0]) = y0``, and return the state at every ``t``.

    Args:
        func: ``func(t, y) -> dy/dt`` with ``t`` a 0-dim tensor and ``y`` in the structure
            of ``y0``. An ``nn.Module`` contributes its trainable parameters to ``params``.
        y0: initial state: a floating-point tensor of any shape (batch dimensions
            included), or a tuple/list/dict of such tensors.
        t: (N,) strictly increasing or decreasing output times; ``t[0]`` is the start.
        method: a Runge–Kutta method: fixed step ``euler``, ``midpoint``, ``heun2``,
            ``heun3``, ``rk4`` (need ``step_size``); adaptive ``adaptive_heun``,
            ``fehlberg2``, ``bosh3``, ``dopri5`` (default), ``tsit5``, ``dopri8``; implicit
            (for stiff problems) ``kvaerno3``, ``kvaerno5``; fixed-step multistep
            ``explicit_adams``, ``implicit_adams``, ``fixed_adams``.
        gradient: how gradients are computed when any of ``y0``, ``t``, ``params``
            requires grad: ``Backsolve()`` (default), ``Direct()``, or another method of
            :mod:`torchadjoint.adjoint`.
        params: tensors ``func`` depends on that need gradients, when ``func`` is not an
            ``nn.Module``.
        **options: ``rtol`` (1e-7), ``atol`` (1e-9): floats, tensors broadcastable to the
            state, or one per state tensor; ``norm``; ``step_size``; ``grid_constructor``;
            ``first_step``; ``min_step``; ``max_step``; ``max_num_steps``; ``safety``;
            ``ifactor``; ``dfactor``; ``pcoeff``, ``icoeff`` (PI control); ``step_t``,
            ``jump_t``; ``interpolation`` ("dense", "linear", or "land": every output time
            is a step end, the default for kvaerno3/kvaerno5); ``compile`` (False; True or a
            ``torch.compile`` mode: each step, and Backsolve's and Checkpointed's backward evaluations, as compiled
            graphs; see :mod:`torchadjoint.compiled`).
            ``norm`` (scaled error in the state's structure -> one number) defaults to one
            RMS over all entries, for tuple/dict states too; torchdiffeq's largest
            per-tensor RMS is ``torchadjoint.compat.norms.mixed_norm``. Measured on a CNF
            state ``(z, log p)`` (``benchmarks/bench_pytree_norm.py``): per tensor takes
            more steps at the same tolerance and gives no smaller gradient error at the
            same number of evaluations, so the default stays.
        running_cost: ``ℓ(t, y, dy) -> tensor`` (``dy = func(t, y)``): the solve also
            integrates ``∫ ℓ dt`` over ``[t[0], t[-1]]`` into ``Solution.running_cost``, and
            every gradient method differentiates it (see :mod:`torchadjoint.running_cost`;
            built-in regularisers in :mod:`torchadjoint.regularisers`).

    Returns:
        :class:`Solution` with ``ys`` (N, *state shape) in the structure of ``y0``.

    Precision: a float16 or bfloat16 state is integrated in float32 (``f`` still receives
    ``t`` and ``y`` in the state's dtype, and its result is widened), and ``ys`` is
    returned in the state's dtype; an ``rtol`` below the precision ``f`` is evaluated in
    is raised to it with a :class:`~torchadjoint.ToleranceWarning` (see
    :func:`~torchadjoint.controller.rtol_floor`). ``max_num_steps`` defaults to 100 000.

    Raises:
        ValueError, TypeError: for bad arguments (the message names the argument).
        SolveError: when the solve cannot go on (it carries the time reached).
        NotImplementedError: under ``torch.func`` transforms other than ``grad``/``jvp``
            family transforms over ``gradient=Direct()``.
    """
    if running_cost is not None:
        augmented = with_running_cost(func, y0, t, running_cost, params, options)
        solution = _solve(augmented.func, augmented.y0, t, method, gradient, augmented.params, augmented.options,
                          integrals=augmented.integrals)
        return augmented.split(solution)
    return _solve(func, y0, t, method, gradient, params, options)


def _solve(func, y0, t, method, gradient, params, options: dict, integrals: int = 0) -> Solution:
    """:func:`solve` without a running cost (``integrals``: how many trailing state tensors
    are integrals riding along, see :attr:`Problem.integrals`)."""
    flattener, dtype, device = check_entry("solve()", func, y0, options, lambda kinds: refuse_transforms(kinds, gradient))
    times = check_times(t)
    if not math.isfinite(times[-1] - times[0]):
        try:
            check_interval(times[0], times[-1])
        except ValueError as error:
            raise ValueError(f"t: {error}") from None
    if dtype in LOW_PRECISION:
        return _solve_widened(func, y0, t, dtype, method, gradient, params, options, integrals)
    opts = SolverOptions.build(method=method, **options)
    check_times_inside(times, opts.step_t, "step_t")
    check_times_inside(times, opts.jump_t, "jump_t")
    opts = opts.landing_on_outputs(times)
    gradient = resolve_gradient(gradient)
    warn_time_resolution(times, dtype, gradient)
    params = resolve_params(func, params)
    problem = Problem(func, flattener, times, params, dtype, device, integrals)
    y0_flat = flattener.flatten(y0)

    solution = Solution(ts=t, ys=None)
    # A method that records autograd through the steps reaches whatever func closes over,
    # not only params: it records whenever grad mode is on, and autograd keeps a graph only
    # where something requires grad.
    wants_grad = torch.is_grad_enabled() and (
        gradient.records_graph or y0_flat.requires_grad or t.requires_grad or any(p.requires_grad for p in params)
    )
    if not wants_grad:
        with torch.no_grad():
            result = solve_flat(problem, opts, y0_flat)
        solution.stats["forward"] = result.stats
        solution.ys = flattener.unflatten(result.ys)
        return solution

    flat_func = make_flat_func(problem)
    # y(t_0) is y0 itself, not the solve's copy: the gradient reaching the solve's start is
    # then a_y(t_0⁺) alone, which StartTime turns into dL/dt_0.
    start = StartTime.apply(flat_func, y0_flat, t, times[0], solution.stats) if t.requires_grad else y0_flat
    ys = gradient.run(problem, opts, start, solution.stats)
    ys = torch.cat([y0_flat[None], ys[1:]])
    if t.requires_grad:
        ys = OutputTimes.apply(flat_func, ys, t, times, solution.stats)
    solution.ys = flattener.unflatten(ys)
    return solution


def resolve_gradient(gradient: Optional[GradientMethod]) -> GradientMethod:
    """``gradient`` checked, ``Backsolve()`` when None."""
    if gradient is None:
        return Backsolve()
    if not isinstance(gradient, GradientMethod):
        raise TypeError(
            f"gradient must be a gradient method such as torchadjoint.Backsolve(), got {type(gradient).__name__}"
        )
    return gradient


# Too coarse to carry a solve: 11 and 8 significant bits. The loop runs in float32 instead.
LOW_PRECISION = (torch.float16, torch.bfloat16)


def _solve_widened(func, y0, t, dtype, method, gradient, params, options, integrals) -> Solution:
    """A float16/bfloat16 solve, integrated in float32.

    In the state's own dtype every step ``y + h·Σ b k`` shorter than half a spacing of
    ``y`` rounds back to ``y`` (dy/dt = -y from 1 stalled at 1.0 for 4,521 steps), and
    the error estimate is rounding noise. Widening the state keeps the steps; ``f``
    still sees its own dtype, so an ``nn.Module`` in half precision runs as it is, and
    gradients flow through the casts to ``y0`` and the parameters in their dtypes.
    ``rtol`` is raised to what ``f``'s evaluations resolve (its dtype's unit roundoff).
    """
    options = widened_options(method, options, dtype)
    params = resolve_params(func, params)  # the module's parameters, before func is wrapped
    func_in_own_dtype, y0_wide, narrow = widened(func, y0, dtype)
    solution = _solve(func_in_own_dtype, y0_wide, t, method, gradient, params, options, integrals)
    solution.ys = narrow(solution.ys)
    return solution


def widened_options(method, options: dict, dtype: torch.dtype) -> dict:
    """``options`` for a float16/bfloat16 state integrated in float32: an adaptive method's
    ``rtol`` raised to what ``dtype`` resolves (a fixed-step method has no tolerance to raise)."""
    options = dict(options)
    if resolve_method(method).adaptive:
        options["rtol"] = _clamp_rtol_leaves(options.get("rtol", SolverOptions.rtol), dtype)
    return options


def widened(func, y0, dtype: torch.dtype):
    """``(func_wide, y0_wide, narrow)``: ``y0`` cast to float32, ``func`` taking and returning
    float32 while calling the user's ``func`` in ``dtype``, and ``narrow`` casting a state
    tree back to ``dtype`` (see :func:`_solve_widened`; used by the event search too)."""
    leaves, spec = tree_leaves(y0)
    y0_wide = tree_unflatten([x.to(torch.float32) for x in leaves], spec)

    def narrow(tree):
        found, structure = tree_leaves(tree, "f(t, y)")
        return tree_unflatten([x.to(dtype) for x in found], structure)

    def func_in_own_dtype(t_wide: torch.Tensor, y_wide):
        out = func(t_wide.to(dtype), narrow(y_wide))
        if isinstance(out, torch.Tensor) or isinstance(out, (tuple, list, dict)):
            try:
                found, structure = tree_leaves(out, "f(t, y)")
            except TypeError:
                return out  # the solve's own check reports what f returned
            return tree_unflatten([x.to(torch.float32) if x.dtype == dtype else x for x in found], structure)
        return out

    # Read by compiled.compile_dynamics: the warning that the backward runs eagerly names the
    # widening (this wrapper is no nn.Module), not the user's f, which may well be one.
    func_in_own_dtype.narrow_dtype = dtype
    return func_in_own_dtype, y0_wide, narrow


def _clamp_rtol_leaves(rtol, dtype: torch.dtype):
    """``rtol`` as given (float, tensor, or one per state tensor) with each value below
    ``dtype``'s resolution raised to it (see :func:`~torchadjoint.controller.clamp_rtol`)."""
    if isinstance(rtol, (tuple, list)):
        return type(rtol)(_clamp_rtol_leaves(r, dtype) for r in rtol)
    if isinstance(rtol, dict):
        return {k: _clamp_rtol_leaves(r, dtype) for k, r in rtol.items()}
    if isinstance(rtol, torch.Tensor):
        return clamp_rtol(rtol.double(), dtype, " (for a float16/bfloat16 state)")
    if isinstance(rtol, (int, float)) and not isinstance(rtol, bool):
        return clamp_rtol(float(rtol), dtype, " (for a float16/bfloat16 state)")
    return rtol  # not a number: SolverOptions.build names it


def warn_time_resolution(times: Sequence[float], dtype: torch.dtype, gradient: Optional[GradientMethod] = None) -> None:
    """Warn (:class:`~torchadjoint.TimeResolutionWarning`) when ``f``, which receives
    ``t`` in ``dtype``, can tell apart fewer than ``2^(p/3)`` times across the interval
    (p: the dtype's significant bits; 256 in float32, about 200 000 in float64): the
    offset of the times dwarfs their span. Steps are unaffected (the loop keeps its clock
    relative to the interval); only an ``f`` that depends on ``t`` sees it rounded, and
    Checkpointed's backward, which reads ``y(t)`` off the stored steps at the rounded times."""
    if len(times) < 2:
        return
    length = abs(times[-1] - times[0])
    largest = max(abs(times[0]), abs(times[-1]))
    eps = torch.finfo(dtype).eps
    spacing = math.ldexp(eps, math.frexp(largest)[1] - 1)  # between floats of dtype near `largest`
    bits = 1 - math.log2(eps)
    distinct = length / spacing
    if distinct < 2 ** (bits / 3):
        name = str(dtype).replace("torch.", "")
        warnings.warn(
            f"t runs from {times[0]!r} to {times[-1]!r}, but f receives t as {name}, which near "
            f"{largest:.3g} only expresses times {spacing:.3g} apart ({distinct:.3g} of them across the interval). "
            f"The solve itself is resolved; if f depends on t, it sees t rounded and the result is wrong. "
            + (f"Checkpointed's gradient is off even for an f that ignores t: its backward reads y(t) off the stored "
               f"steps at t rounded so (Backsolve, Quadrature and Direct are not affected). "
               if getattr(gradient, "name", None) == "checkpointed" else "")
            + f"Shift the time origin (solve over t - t[0] and add t[0] back inside f), or use a float64 state.",
            TimeResolutionWarning,
            stacklevel=user_stacklevel(),
        )


def refuse_transforms(kinds: Set[str], gradient: Optional[GradientMethod]) -> None:
    """Refuse the ``torch.func`` transforms (``kinds``) the solve cannot run under, naming what can.

    ``vmap``: the adaptive loop decides on the host (accept or reject, step size) from
    one error norm over the whole state, which a batched tensor does not have per member.
    ``grad``/``jacrev``/``jvp``/...: the adjoint methods are ``autograd.Function``s with a
    hand-written backward pass, which functorch's transforms do not run; autograd through
    the solver's own steps (``Direct()``) is plain PyTorch and works.
    """
    if "Vmap" in kinds:
        raise NotImplementedError(
            "solve() cannot run under torch.func.vmap: step sizes are chosen on the host from one error norm "
            "over the whole state, not per batch member. Batch inside the state instead: give y0 a batch "
            "dimension (shape (B, ...)) and make func handle it (e.g. func = torch.func.vmap(f_single, in_dims=(None, 0))); "
            "all members then share one step sequence, which is what vmap would need anyway. "
            "torch.func.grad/jacrev/jvp work with gradient=Direct()."
        )
    if not (isinstance(gradient, GradientMethod) and gradient.records_graph):
        name = "Backsolve" if gradient is None else type(gradient).__name__
        raise NotImplementedError(
            f"solve() with gradient={name}() cannot run under torch.func transforms "
            f"({', '.join(sorted(kinds))}): the adjoint methods are autograd.Functions with their own backward "
            "pass, which torch.func does not run. Use gradient=Direct() (autograd through the solver's steps; "
            "supported under torch.func.grad, jacrev, jvp and friends), or use loss.backward()/torch.autograd.grad, "
            "which every gradient method supports."
        )

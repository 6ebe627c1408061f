"""``solve``: the one entry point for every solve, whatever the gradient method."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from .adjoint.base import GradientMethod
from .options import OPTION_NAMES, SolverOptions
from .problem import Problem, make_flat_func, solve_flat
from .solution import Solution
from .time_gradients import OutputTimes, StartTime
from .validation import check_func, check_state, check_times, check_times_inside, resolve_params


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
            ``fehlberg2``, ``bosh3``, ``dopri5`` (default), ``tsit5``, ``dopri8``.
        gradient: how gradients are computed when any of ``y0``, ``t``, ``params``
            requires grad: ``Backsolve()`` (default), ``Direct()``, or another method of
            :mod:`torchadjoint.adjoint`.
        params: tensors ``func`` depends on that need gradients, when ``func`` is not an
            ``nn.Module``.
        **options: ``rtol`` (1e-7), ``atol`` (1e-9): floats, tensors broadcastable to the
            state, or one per state tensor; ``norm``; ``step_size``; ``grid_constructor``;
            ``first_step``; ``min_step``; ``max_step``; ``max_num_steps``; ``safety``;
            ``ifactor``; ``dfactor``; ``pcoeff``, ``icoeff`` (PI control); ``step_t``,
            ``jump_t``; ``interpolation`` ("dense" or "linear").
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

    Raises:
        ValueError, TypeError: for bad arguments (the message names the argument).
        SolveError: when the solve cannot go on (it carries the time reached).
    """
    if running_cost is not None:
        from .running_cost import solve_with_running_cost

        return solve_with_running_cost(solve, func, y0, t, running_cost, method=method, gradient=gradient, params=params, options=options)
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(f"solve() got unknown option(s) {unknown}; valid options are {sorted(OPTION_NAMES)}")
    check_func(func)
    flattener, dtype, device = check_state(y0)
    times = check_times(t)
    opts = SolverOptions.build(method=method, **options)
    check_times_inside(times, opts.step_t, "step_t")
    check_times_inside(times, opts.jump_t, "jump_t")
    if gradient is None:
        from .adjoint.backsolve import Backsolve

        gradient = Backsolve()
    elif not isinstance(gradient, GradientMethod):
        raise TypeError(
            f"gradient must be a gradient method such as torchadjoint.Backsolve(), got {type(gradient).__name__}"
        )
    params = resolve_params(func, params)
    problem = Problem(func, flattener, times, params, dtype, device)
    y0_flat = flattener.flatten(y0)

    solution = Solution(ts=t, ys=None)
    from .adjoint.direct import Direct

    # Autograd through the steps (Direct without checkpoints) reaches whatever func closes
    # over, not only params: it records whenever grad mode is on, and autograd keeps a graph
    # only where something requires grad.
    records_all = isinstance(gradient, Direct) and getattr(gradient, "checkpoints", None) is None
    wants_grad = torch.is_grad_enabled() and (
        records_all or y0_flat.requires_grad or t.requires_grad or any(p.requires_grad for p in params)
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

"""Compiled ``Direct``: the gradient of the solver's own steps from loop graphs of step VJPs.

``Direct()`` is autograd through every step the forward solve took (the step sizes, chosen
from detached error estimates, are constants). Under ``compile=True`` on the CPU the same
gradient is computed without recording the forward: the forward solve runs in loop graphs
(:mod:`~torchadjoint.compiled_loop`), which record each accepted step's start state and
stages anyway (for the dense output); the backward pass then walks the steps from the last
to the first, in one ``while_loop`` graph per forward graph call, each iteration recomputing
one step from its start state and taking its vector-Jacobian product (``torch.func.vjp``
over ``functional_call``: the cotangents of the step's end state and of its stages, to its
start state, its first stage and the parameters). The outputs' cotangents enter where the
forward computed them: an output inside a step through the dense output's weights (to the
step's start state and stages), an output on a step's end as the cotangent of that end
state. The first stage of each step is the last stage of the one before (FSAL): its
cotangent is handed back to it, and the first step's to one VJP of ``f`` at ``(t_0, y_0)``.

Why: recorded, each compiled step's forward and backward pass through AOTAutograd's Python
runtime wrappers (~45 µs each way per step on benchmark problem 1, whose step's kernels take
44 µs), and the forward cannot run in a loop graph. Same arithmetic, so the same gradient up
to rounding; the cost is one extra evaluation of each stage in the backward pass (the
recomputation), as a checkpointed gradient's.

Used where the loop graphs apply (see :mod:`~torchadjoint.compiled_loop`: an explicit
adaptive FSAL method, the RMS norm, no ``step_t``/``jump_t``, the CPU), the state is small
(:data:`MAX_STATE`: on a large one the recomputation costs more than the per-step time it
saves), ``f`` is an
``nn.Module`` whose parameters include every param, and ``f`` at ``t_0`` uses no other
tensor requiring grad (checked as the adjoints check it, with a graph walk; a tensor ``f``
uses only later is not seen, as for the adjoints). Elsewhere ``Direct`` records the forward
as it always did. Should a loop graph leave a step to the host (a non-finite error estimate,
say), the steps are not all recorded: the forward is then solved again with autograd on,
and the backward goes through that graph. Double backward is refused (compiled graphs have
no second derivative; ``compile=False`` keeps it).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import torch

from .. import compiled
from ..compiled_loop import RecordedSteps, while_loop
from ..interpolation import DenseOutput, place_outputs
from ..problem import Problem, make_flat_func, solve_flat
from ..tableaux.base import ButcherTableau
from .base import AdjointCall, forward_stats
from .vjp import DeclaredTensors


def _build_backward(tableau: ButcherTableau, flattener, dtype, names: Tuple[Tuple[str, ...], ...], p: int):
    """The backward program over one graph call's steps, from the last to the first, in one
    ``while_loop``: ``(func, tensors, times (cap + 1,) float64, count, states (cap, n), stages
    (cap, s, n), g_states (cap, n), g_stages (cap, s, n), a (n,), g_last (n,)) -> (a, g_last,
    (g_θ_j, ...))``. ``tensors``: the ``p`` params, then f's other tensors (``names``, their
    paths in ``func``, in the same order; passed in, not differentiated). Step ``i`` (of
    ``count``) goes from ``times[i]`` to ``times[i + 1]`` from ``states[i]`` with ``stages[i]``; ``g_states``/``g_stages`` are the
    outputs' cotangents of its start state and stages; ``a`` comes in as the cotangent of the
    last step's end state and leaves as the first step's start state's; ``g_last`` is the
    cotangent of the last stage of the last step (the next call's first stage), and leaves as
    the first step's first stage's."""
    step = compiled._build_step(tableau, compiled._parametrised_field_of(flattener, dtype, names), None)
    s = tableau.stages

    def backward(func, tensors, times, count, states, stages, g_states, g_stages, a, g_last):
        def cond(i, a, g_last, *rest):
            return i >= 0

        def body(i, a, g_last, *rest):
            g_params, params, others = rest[:p], rest[p : 2 * p], rest[2 * p :]
            # (Rows by index_select: a tensor index would need its value while tracing.)
            at = i.reshape(1)
            row = lambda x: x.index_select(0, at)[0]  # noqa: E731
            y0, ks, (t0, t1) = row(states), row(stages), times.index_select(0, torch.cat([at, at + 1]))
            step_times = torch.stack([t0, t1 - t0, t1])
            # The last stage is also the next step's first: its cotangent from there is added.
            g_ks = row(g_stages) + torch.cat([g_last.new_zeros(s - 1, g_last.shape[0]), g_last[None]])

            def run(y0, f0, *params):
                y1, _, _, _, stages_, _, _, _ = step(func, params + others, step_times, y0, f0, None, None)
                return y1, stages_

            _, pull = torch.func.vjp(run, y0, ks[0], *params)
            grads = pull((a, g_ks))
            return (i - 1, grads[0] + row(g_states), grads[1], *[g + d for g, d in zip(g_params, grads[2:])])

        zeros = [torch.zeros_like(x) for x in tensors[:p]]
        out = while_loop(cond, body, (count - 1, a.clone(), g_last.clone(), *zeros), tensors)
        return out[1], out[2], tuple(out[3:])

    return backward


#: The largest state (entries) whose steps' VJPs are taken this way. The recomputation costs one
#: more evaluation of every stage; what it saves is per step, not per entry. Measured on the
#: benchmark problems (fwd+bwd against recorded compiled Direct: an A/B alternating in one
#: process on a loaded machine, not a benchmark row): problem 1 (40 entries) 0.64x the time,
#: problem 2 (8192 entries, a 32-128-128-32 MLP) 1.43x.
MAX_STATE = 4096


def compiled_direct(method, problem: Problem, options, y0: torch.Tensor, stats: dict) -> Optional[torch.Tensor]:
    """``ys`` (N, n) with compiled Direct's backward, or None where it does not apply (the
    caller then records the forward). See the module docstring."""
    func, tableau = problem.func, options.method
    if (not getattr(options, "compile", None) or method.checkpoints is not None or problem.device.type != "cpu"
            or not isinstance(func, torch.nn.Module) or not isinstance(tableau, ButcherTableau)
            or not tableau.adaptive or not tableau.fsal or getattr(tableau, "implicit", False)
            or options.step_t or options.jump_t or problem.integrals or len(problem.times) < 2
            or y0.numel() > MAX_STATE):
        return None
    held = [*func.parameters(), *func.buffers()]
    if not {id(p) for p in problem.params} <= {id(x) for x in held}:
        return None
    flat_func = make_flat_func(problem)
    with torch.enable_grad():  # f at t_0, with a graph to look for tensors the steps' VJPs would miss
        y_leaf = y0.detach().requires_grad_(True)
        f0 = flat_func(problem.times[0], y_leaf)
        if f0.requires_grad and DeclaredTensors(problem.params, "Direct").undeclared(f0, (y_leaf,)):
            return None
    call = AdjointCall(method, problem, options, None, stats)
    call.flat_func, call.f0 = flat_func, f0.detach()
    # f's tensors, the params first: f's other tensors go into the graphs as inputs too, by path.
    declared = {id(p) for p in problem.params}
    call.tensors = tuple(problem.params) + tuple(x for x in held if id(x) not in declared)
    call.names = compiled.tensor_paths(func, call.tensors)
    return call.apply(_CompiledDirectFunction, y0)


def _forward(ctx, call: AdjointCall, y0: torch.Tensor) -> torch.Tensor:
    problem = call.problem
    kept = RecordedSteps()
    result = solve_flat(problem, call.forward, y0.detach(), func=call.flat_func, f0=call.f0, keep_steps=kept)
    call.stats["forward"] = forward_stats(result.stats, call.f0)
    ctx.call, ctx.kept, ctx.replay = call, kept, None
    if not kept.complete:
        # A step the loop graphs did not record (the host took it): solve again with a graph.
        with torch.enable_grad():
            leaf = y0.detach().requires_grad_(True)
            ctx.replay = (leaf, solve_flat(problem, call.forward, leaf, func=call.flat_func).ys)
    return result.ys


def _backward(ctx, grad_ys: torch.Tensor) -> tuple:
    if torch.is_grad_enabled():
        raise RuntimeError(
            "double backward through Direct() under compile=True is not supported (its backward pass runs compiled "
            "graphs, which have no second derivative); for higher derivatives solve with compile=False")
    call = ctx.call
    problem = call.problem
    params = problem.params
    wanted = AdjointCall.wanted(ctx)
    if ctx.replay is not None:
        leaf, ys = ctx.replay
        inputs = [leaf] + [p for p, w in zip(params, wanted) if w]
        grads = iter(torch.autograd.grad(ys, inputs, grad_ys, allow_unused=True))
        g_y0 = next(grads)
        call.stats["backward"] = dict(nvjp=1, replayed=True)
        return AdjointCall.gradients(g_y0, [next(grads) if w else None for w in wanted])
    return _backward_through_steps(ctx, call, grad_ys, wanted)


def _backward_through_steps(ctx, call: AdjointCall, grad_ys: torch.Tensor, wanted) -> tuple:
    problem, tableau = call.problem, call.forward.method
    params, chunks, mode = problem.params, ctx.kept.chunks, call.forward.compile
    starts = [x for chunk in chunks for x in chunk[0][:-1]] + [chunks[-1][0][-1]]
    g_states, g_stages = _output_cotangents(problem, tableau, grad_ys, starts)
    field = compiled._field_key(problem.func)
    p = len(params)
    key = ("direct backward", tableau, field, problem.flattener.spec, problem.dtype, call.names, p, mode)
    program = compiled._program(key, lambda: _build_backward(tableau, problem.flattener, problem.dtype, call.names, p),
                                mode, (field, mode), problem.device)
    run = compiled._Runner(program, f"the {tableau.name} steps' vector-Jacobian products")
    g_params = [torch.zeros_like(p) for p in params]
    steps = len(starts) - 1
    a = g_states[steps].clone()  # the cotangent of the state at the end (not a view: see _padded)
    g_last = torch.zeros_like(a)
    end = steps
    for chunk_starts, times, states, stages in reversed(chunks):
        count = len(chunk_starts) - 1
        begin = end - count
        args = (problem.func, call.tensors, times, torch.tensor(count), states, stages,
                _padded(g_states[begin:end], states.shape[0]), _padded(g_stages[begin:end], stages.shape[0]), a, g_last)
        out = run(*args)
        a, g_last, g_p = out if out is not None else program.eager(*args)
        for total, g in zip(g_params, g_p):
            total += g
        end = begin
    # The first step's first stage is f(t_0, y_0), evaluated before the loop: its own VJP.
    vjp = compiled.CompiledVJP(problem.func, problem.flattener, problem.dtype, params, mode, problem.device)
    _, minus_g_y, minus_g_p = vjp(problem.times[0], chunks[0][2][0], g_last)
    a = a - minus_g_y
    for total, g in zip(g_params, minus_g_p):
        total -= g
    evaluations = steps * (tableau.stages - 1) + 1
    call.stats["backward"] = dict(nfe=evaluations, nvjp=evaluations, steps=steps,
                                  **compiled.combined_stats(run.stats, vjp.stats))
    return AdjointCall.gradients(a, [g if w else None for g, w in zip(g_params, wanted)])


def _padded(rows: torch.Tensor, length: int) -> torch.Tensor:
    """``rows`` (m, ...) followed by zeros up to ``length`` rows (a graph call's buffer length),
    always a new tensor: views of one tensor as separate inputs would alias inside the loop."""
    return torch.cat([rows, rows.new_zeros(length - rows.shape[0], *rows.shape[1:])])


def _output_cotangents(problem: Problem, tableau, grad_ys: torch.Tensor,
                       starts: List[float]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The outputs' cotangents ``grad_ys`` (N, n) as cotangents of the steps' start states
    ``(S + 1, n)`` (the last: the end state) and stages ``(S, s, n)``: an output inside step
    ``i`` is ``y_i + h_i W K_i`` (the dense output, placed and weighted as
    :meth:`~torchadjoint.integrate._Outputs.fill_steps` computed it); one on a step's end is
    the next state; one at ``t_0`` is ``y_0``."""
    steps, n = len(starts) - 1, grad_ys.shape[1]
    g_states = grad_ys.new_zeros(steps + 1, n)
    g_stages = grad_ys.new_zeros(steps, tableau.stages, n)
    times = np.asarray(problem.times, dtype=np.float64)
    direction = 1.0 if times[-1] >= times[0] else -1.0
    g_states[0] = grad_ys[0]  # the only output at t_0 (times are strictly monotone)
    at = place_outputs(times, direction * times, direction, np.asarray(starts, dtype=np.float64), 1)
    ended = np.flatnonzero(at.on_end)
    if ended.size:
        g_states.index_add_(0, torch.from_numpy(ended + 1), grad_ys[torch.from_numpy(at.last[ended] - 1)])
    if at.steps.size:
        dense = DenseOutput(tableau, problem.dtype, problem.device)
        # The forward's weights, rounded as it rounded them: (k, m, s); the padding's cotangents 0.
        w = dense._tensor(dense.weights(at.fractions) * at.hs[:, None, None])
        if w.shape[2] > tableau.stages:  # a column for f at the step's end: FSAL, the last stage
            w = torch.cat([w[:, :, :-2], w[:, :, -2:].sum(2, keepdim=True)], dim=2)
        rows = grad_ys[torch.from_numpy(at.window)] * torch.from_numpy(at.kept)[:, :, None].to(grad_ys.dtype)
        chosen = torch.from_numpy(at.steps)
        g_states.index_add_(0, chosen, rows.sum(1))
        g_stages.index_add_(0, chosen, torch.bmm(w.transpose(1, 2), rows))
    return g_states, g_stages


class _CompiledDirectFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, call: AdjointCall, y0: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        return _forward(ctx, call, y0)

    @staticmethod
    def backward(ctx, grad_ys: torch.Tensor) -> tuple:
        return _backward(ctx, grad_ys)

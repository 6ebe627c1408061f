"""Discretise-then-optimise: autograd through the solver's own steps.

The exact gradient of the computation the forward pass did (the step sizes, chosen by
the controller from detached error estimates, are constants to it).

- ``Direct()``: the forward solve records the autograd graph of every step; memory grows
  with the number of steps (every stage is kept for backward). Higher derivatives work.
- ``Direct(checkpoints=K)``: the forward solve keeps no graph, only at most ``K``
  checkpoints (state, proposed step, controller state; see :mod:`.replay`). Backward,
  segment by segment from the last to the first, replays the forward's steps from the
  segment's checkpoint with autograd on — exactly the forward's steps, bitwise — and
  backpropagates through that segment alone: the gradient arriving at the segment's
  end and at its output times goes to its checkpoint state and to the parameters. Same
  gradient as ``Direct()`` up to rounding; memory is ``K`` states per level of
  checkpoints plus the graph of at most ``K`` steps, for one extra forward solve (per
  level).
"""
from __future__ import annotations

from typing import List, Optional

import torch

from ..integrate import StepInfo
from ..interpolation import interpolate, needs_f1
from ..options import SolverOptions
from ..problem import Problem, solve_flat
from .base import AdjointCall, GradientMethod, adjoint_function
from .checkpointed import segmented_forward
from .direct_compiled import compiled_direct
from .replay import check_checkpoints
from .vjp import DeclaredTensors


class Direct(GradientMethod):
    """Backpropagate with autograd through every step of the solver.

    Args:
        checkpoints: ``None`` (default) keeps the whole graph. An int ``K >= 2`` bounds
            memory instead: at most ``K`` states are kept per level of checkpoints and the
            graph of at most ``K`` steps at once, recomputed on the way back (up to
            ``K²`` steps, for ``K`` a power of two, about half that otherwise, cost one
            extra forward solve; every further factor of ``K`` one more). Double
            backward needs ``checkpoints=None``.

    With checkpoints, ``stats["backward"]`` holds ``nfe`` (evaluations of ``f`` in the
    replays), ``nvjp`` (backward passes: one per segment), ``checkpoints`` (kept by the
    forward), ``levels`` and ``replay_error`` (largest difference between a replayed state
    and the forward's; 0 when ``f`` is deterministic).
    """

    name = "direct"

    def __init__(self, checkpoints: Optional[int] = None):
        self.checkpoints = None if checkpoints is None else check_checkpoints(checkpoints, "Direct")

    @property
    def records_graph(self) -> bool:  # see GradientMethod; with checkpoints the forward keeps no graph
        return self.checkpoints is None

    def __repr__(self) -> str:
        return "Direct()" if self.checkpoints is None else f"Direct(checkpoints={self.checkpoints})"

    def run(self, problem: Problem, options: SolverOptions, y0: torch.Tensor, stats: dict) -> torch.Tensor:
        if self.checkpoints is not None:
            return AdjointCall(self, problem, options, None, stats).apply(_SegmentedDirectFunction, y0)
        ys = compiled_direct(self, problem, options, y0, stats)  # None unless compile=True and it applies
        if ys is not None:
            return ys
        with torch.enable_grad():
            result = solve_flat(problem, options, y0)
        stats["forward"] = result.stats
        return result.ys


def _segmented_backward(ctx, grad_ys: torch.Tensor) -> tuple:
    """Segment by segment from the last to the first: replay with autograd on, backpropagate
    through the segment alone (into its checkpoint state and the parameters)."""
    call, setup = ctx.call, ctx.setup
    params, times = call.problem.params, call.problem.times
    active = [i for i, x in enumerate(params) if x.requires_grad]
    grad_params = [torch.zeros_like(x) for x in params]
    stats = dict(nfe=0, nvjp=0, checkpoints=len(ctx.checkpoints), levels=0, replay_error=0.0)
    call.stats["backward"] = stats
    if len(times) == 1:
        return AdjointCall.gradients(grad_ys[0], grad_params)

    setup.nfe = 0
    direction = setup.direction
    looked_at = grad_ys.any(dim=1).tolist()
    declared = DeclaredTensors(params, "checkpointed direct")
    # dL/d(state at the current segment's end); nothing follows the last output.
    a = torch.zeros_like(grad_ys[-1])

    def outputs_in(start, end) -> List[int]:
        # The forward wrote an output while taking the step whose (t0, t1] holds it.
        return [
            i for i in range(1, len(times))
            if looked_at[i] and direction * (times[i] - start.t) > 0 and direction * (times[i] - end.t) <= 0
        ]

    def needed(start, end) -> bool:
        # Past the last output the loss looks at, no gradient flows: nothing to replay.
        return bool(a.any()) or bool(outputs_in(start, end))

    for start, end, depth in setup.segments(ctx.checkpoints, ctx.end, call.method.checkpoints, needed):
        stats["levels"] = max(stats["levels"], depth)
        outputs = outputs_in(start, end)
        recorded = _ReplayedOutputs(setup, times, outputs, grad_ys)
        with torch.enable_grad():
            y_start = start.y.detach().requires_grad_(True)
            last = setup.replay(start, end, recorded, y=y_start)
            targets = [last.y1] + recorded.values
            # f may use a tensor only later than t_0: refuse it here too (one walk per segment).
            declared.check([x for x in targets if x.requires_grad], (y_start,), None)
            cotangents = [a] + [grad_ys[i] for i in outputs]
            inputs = [y_start] + [params[i] for i in active]
            grads = torch.autograd.grad(targets, inputs, cotangents, allow_unused=True)
        stats["nvjp"] += 1
        a = grads[0] if grads[0] is not None else torch.zeros_like(a)
        for i, g in zip(active, grads[1:]):
            if g is not None:
                grad_params[i] += g
        del recorded, targets, last, grads

    a = a + grad_ys[0]  # the forward's output at t_0 is y0 itself
    stats.update(nfe=setup.nfe, replay_error=setup.replay_error)
    return AdjointCall.gradients(a, grad_params)


_SegmentedDirectFunction = adjoint_function(
    "checkpointed direct", lambda ctx, call, y0: segmented_forward(ctx, call, y0, "checkpointed direct"),
    _segmented_backward)


class _ReplayedOutputs:
    """``on_accept`` hook of a replay with autograd on: the outputs the forward wrote during
    each step (``outputs``, indices into ``times`` in the order reached), recomputed as the
    forward loop computes them (integrate): dense output inside the step, the step's end
    state exactly at its end. :attr:`values` holds them, with their graphs, in order."""

    def __init__(self, setup, times, outputs: List[int], like: torch.Tensor):
        self.setup, self.times = setup, times
        self.pending = list(outputs)
        self.coeffs = setup.tableau.as_tensors(like.dtype, like.device)
        self.linear = setup.options.interpolation == "linear"
        self.want_f1 = needs_f1(self.coeffs, setup.tableau.stages) and not self.linear
        self.values: List[torch.Tensor] = []

    def __call__(self, info: StepInfo) -> None:
        setup, times, pending = self.setup, self.times, self.pending
        mine = []
        while pending and setup.direction * (times[pending[0]] - info.t1) <= 0:
            mine.append(pending.pop(0))
        if not mine:
            return
        inside = [i for i in mine if times[i] != info.t1]
        if inside:
            f1 = info.f1
            if f1 is None and self.want_f1:
                f1 = setup.f(setup.end_time_side(info.t0, info.t1), info.y1)
            h = info.t1 - info.t0
            fractions = [(times[i] - info.t0) / h for i in inside]
            self.values.extend(
                interpolate(self.coeffs, info.y0, info.y1, info.stages, f1, h, fractions, self.linear).unbind(0))
        if len(inside) < len(mine):
            self.values.append(info.y1)

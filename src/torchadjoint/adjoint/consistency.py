"""Checkpointed's continuous adjoint, checked against the discrete adjoint of the same steps.

With an implicit forward method, :class:`~torchadjoint.Checkpointed` linearises the
continuous adjoint along a forward path that is only ``rtol``-accurate; across a stiff
relaxation jump (Van der Pol, μ = 1000) that linearisation can be far off while every
step of the backward solve is within its tolerance: the gradient came out 3.2× off at
rtol 1e-6 without a word. Neither the backward solve's error estimate nor the dense
output's see it.

The check: each segment the backward pass replays is replayed *with autograd on*, and the
gradient arriving at the segment's end is backpropagated through the replayed steps — the
discrete adjoint of the forward solve (the implicit-function-theorem VJP of every implicit
stage, :mod:`torchadjoint.implicit.implicit_function`), carried from segment to segment as
``Direct(checkpoints=K)`` carries it. Outputs inside a step enter through the same implicit
sub-step the continuous solve reads ``y(t)`` from. Both gradients approximate the same
exact gradient: on problems where each is accurate they agree to well under 1 %; where
they part, at least one of them is off by half the gap. At the end, ``dL/dy0`` and
``dL/dθ`` of the two are compared (relative 2-norm of the difference, per part, on the
parts autograd wants, floored at the part's absolute tolerance: :func:`relative_gap`), and :class:`AdjointMismatchWarning` is raised past the threshold,
naming the segment across which they parted most.

Cost: per segment, the replay with a graph (the stages once more, with ``f`` recorded;
the graph of one segment is held, as ``Direct(checkpoints=K)`` holds it) and one
backpropagation through it (one Jacobian per implicit stage, for the IFT). Off with
``Checkpointed(mismatch_warning=None)``; explicit forward methods are not checked.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Callable, List

import torch

from ..integrate import StepInfo
from ..problem import flat_tolerance
from .base import AdjointMismatchWarning, adjoint_scale, parameter_tolerance


def _detached(info: StepInfo) -> StepInfo:
    return dataclasses.replace(info, y0=info.y0.detach(), y1=info.y1.detach(), stages=info.stages.detach(),
                               f1=None if info.f1 is None else info.f1.detach())


def relative_gap(got: torch.Tensor, other: torch.Tensor, floor: float) -> float:
    """``‖got - other‖ / max(‖got‖, ‖other‖, floor)`` (0 when all three are 0; at most 2).

    ``floor``: the absolute tolerance of the whole vector. A gradient below it has no
    relative accuracy to compare: ``dL/dy0`` of a system that forgets its start (``y' = -100y``
    to ``t = 10``: 4e-107 by one adjoint, another tiny number by the other) is 0 to the
    tolerance asked, and would read as a gap of 1."""
    size = max(float(torch.linalg.vector_norm(got)), float(torch.linalg.vector_norm(other)), floor)
    return float(torch.linalg.vector_norm(got - other)) / size if size > 0 else 0.0


class DiscreteAdjointCheck:
    """The discrete adjoint of a checkpointed forward, built beside the continuous one.

    ``problem``: the Problem (its ``params``, ``times``); ``grad_ys`` (N, n): the incoming
    gradients; ``warn_at``: the threshold on the relative gap; ``atol``: the backward solve's
    absolute tolerance as given (float or per state tensor), scaled like the adjoint's
    (:func:`.base.adjoint_scale`) into the floors of :func:`relative_gap`. Call
    :meth:`start`, then :meth:`replay` and :meth:`step_back` per segment, last segment first,
    then :meth:`judge`.
    """

    def __init__(self, problem, grad_ys: torch.Tensor, warn_at: float, atol):
        self.problem, self.grad_ys, self.warn_at = problem, grad_ys, warn_at
        scale = adjoint_scale(grad_ys)
        tol = flat_tolerance(problem, atol, "atol")
        n = grad_ys.shape[1]
        self.floor_y = tol * scale * math.sqrt(n) if isinstance(tol, float) else float(torch.linalg.vector_norm(tol)) * scale
        self.floor_entry_theta = parameter_tolerance(problem, atol, "atol", scale)
        self.jumping: List[int] = []
        params = problem.params
        self.active = [i for i, x in enumerate(params) if x.requires_grad]
        self.a = grad_ys[-1].clone()  # the discrete dL/dy at the current segment's end
        self.theta = [torch.zeros_like(params[i]) for i in self.active]
        self.worst = (0.0, None, None)  # (growth of the relative gap of a_y across a segment, its start, end)
        self.gap = 0.0
        self._graph = None
        self.backprops = 0

    def start(self, jumping: List[int]) -> None:
        """``jumping``: the output indices where the continuous solve adds ``g_i`` at a
        landing (every looked-at output but the last, whose ``g`` is the initial value)."""
        self.jumping = jumping

    def replay(self, setup, start, end, dense: Callable) -> List[StepInfo]:
        """Replay the segment ``start → end`` with autograd on, keep its graph, and return
        its steps detached (for the continuous solve's ``y(t)``). ``dense(steps)``: the
        continuous solve's ``y(t)`` on ``steps``, with grad mode left to the caller."""
        steps: List[StepInfo] = []
        direction, times = setup.direction, self.problem.times
        inside = [i for i in self.jumping if direction * (times[i] - start.t) > 0 and direction * (times[i] - end.t) < 0]
        with torch.enable_grad():
            y_start = start.y.detach().requires_grad_(True)
            last = setup.replay(start, end, steps.append, y=y_start)
            y_of_t = dense(steps)
            outputs = [y_of_t(times[i]) for i in inside]
        self._graph = (y_start, [last.y1] + outputs, inside)
        return [_detached(s) for s in steps]

    def step_back(self, start, end, a_continuous: torch.Tensor) -> None:
        """Backpropagate through the kept segment; ``a_continuous`` (n,): the continuous
        solve's ``a_y`` at the segment's start, jumps there included."""
        y_start, targets, inside = self._graph
        self._graph = None
        params = self.problem.params
        cotangents = [self.a] + [self.grad_ys[i] for i in inside]
        inputs = [y_start] + [params[i] for i in self.active]
        with torch.enable_grad():
            grads = torch.autograd.grad(targets, inputs, cotangents, allow_unused=True)
        self.backprops += 1
        a = grads[0] if grads[0] is not None else torch.zeros_like(self.a)
        for i in self.jumping:
            if self.problem.times[i] == start.t:
                a = a + self.grad_ys[i]
        self.a = a.detach()
        for j, g in enumerate(grads[1:]):
            if g is not None:
                self.theta[j] = self.theta[j] + g.detach()
        gap = relative_gap(a_continuous, self.a, self.floor_y)
        if gap - self.gap > self.worst[0]:
            self.worst = (gap - self.gap, start.t, end.t)
        self.gap = gap

    def judge(self, grad_y0: torch.Tensor, grad_params, wanted_y0: bool, wanted, stats: dict) -> None:
        """Record ``adjoint_mismatch`` (the largest relative gap over the parts autograd
        wants: ``wanted_y0``, ``wanted`` one bool per param) in ``stats``; warn past the
        threshold. ``grad_y0`` (n,), ``grad_params``: the continuous adjoint's gradients."""
        parts = []
        if wanted_y0:
            parts.append(("y0", relative_gap(grad_y0, self.a, self.floor_y)))
        theirs = [t.reshape(-1) for i, t in zip(self.active, self.theta) if wanted[i]]
        ours = [grad_params[i].reshape(-1) for i in self.active if wanted[i]]
        if theirs:
            ours, theirs = torch.cat(ours), torch.cat(theirs)
            parts.append(("params", relative_gap(ours, theirs, self.floor_entry_theta * math.sqrt(ours.numel()))))
        name, value = max(parts, key=lambda part: part[1]) if parts else ("y0", 0.0)
        stats["adjoint_mismatch"] = value
        if not value <= self.warn_at:  # NaN included
            _, t_a, t_b = self.worst
            span = "?" if t_a is None else f"[{min(t_a, t_b):.6g}, {max(t_a, t_b):.6g}]"
            warnings.warn(
                f"Checkpointed's gradient with respect to {name} differs from the discrete adjoint of the same "
                f"forward steps (autograd through them, as Direct() computes it) by {value:.3g}, relative "
                f"(threshold {self.warn_at:g}); they parted most across t in {span}. At least one of the two is off "
                f"by half that or more: the forward path is too coarse there for a gradient along it (a stiff "
                f"relaxation jump?). Tighten the forward rtol/atol until this passes (both converge as it tightens), "
                f"or use gradient=Direct() at a tight tolerance. Raise or silence this check with "
                f"Checkpointed(mismatch_warning=... or None).",
                AdjointMismatchWarning,
                stacklevel=4,
            )

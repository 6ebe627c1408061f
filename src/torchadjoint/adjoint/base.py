"""The small protocol every gradient method follows.

A gradient method turns a forward solve into outputs ``ys`` (N, n) carrying an autograd
graph (or a custom ``autograd.Function``) to the flat initial state ``y0`` (n,) and to the
problem's ``params``. Time gradients are not its business: :mod:`torchadjoint.time_gradients`
attaches them around every method in the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import torch

from ..options import SolverOptions
from ..problem import Problem, flat_tolerance


class ReconstructionWarning(UserWarning):
    """The backward re-solve of ``y`` drifted far from the forward trajectory (see
    :mod:`torchadjoint.adjoint.trust` for when it is raised)."""


class AdjointMismatchWarning(UserWarning):
    """Checkpointed's continuous adjoint and the discrete adjoint of the same forward steps
    gave gradients far apart (see :mod:`torchadjoint.adjoint.consistency`)."""


class GradientMethod:
    """Base class. Subclasses implement :meth:`run`."""

    name = "gradient method"
    # True when the forward pass is plain autograd through every step of the solve: the
    # graph then reaches whatever ``func`` closes over (not only ``params``), so the solve
    # records whenever grad mode is on, and torch.func transforms can run through it.
    records_graph = False

    def run(self, problem: Problem, options: SolverOptions, y0: torch.Tensor, stats: dict) -> torch.Tensor:
        """Solve forward from ``y0`` (n,) and return ``ys`` (N, n), differentiable with
        respect to ``y0`` and ``problem.params``. Fill ``stats["forward"]`` now and
        ``stats["backward"]`` when the backward pass runs."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@dataclass
class AdjointCall:
    """Everything a gradient method's ``autograd.Function`` needs besides the tensors it
    differentiates, passed as one object: ``Function.apply(call, y0, *params)`` (see
    :meth:`apply`), whose backward returns :meth:`gradients`.

    ``stats``: the solution's stats dict; the forward fills ``stats["forward"]`` and the
    backward ``stats["backward"]`` when it runs (that is how its counts come back).
    ``backward``: the backward solve's options (None for a method without one).
    """

    method: GradientMethod
    problem: Problem
    forward: SolverOptions
    backward: Optional[SolverOptions]
    stats: dict

    def apply(self, function, y0: torch.Tensor) -> torch.Tensor:
        """``ys`` (N, n): ``function.apply(self, y0, *params)``."""
        return function.apply(self, y0, *self.problem.params)

    @staticmethod
    def wanted(ctx) -> Tuple[bool, ...]:
        """For each of the problem's params, whether autograd wants its gradient."""
        return tuple(ctx.needs_input_grad[2:])

    @staticmethod
    def gradients(grad_y0: torch.Tensor, grad_params: Sequence[Optional[torch.Tensor]]) -> tuple:
        """What the Function's backward returns: none for the call, then ``y0``'s and the params'."""
        return (None, grad_y0, *grad_params)


def adjoint_function(label: str, forward: Callable, backward: Callable) -> type:
    """The ``torch.autograd.Function`` of a gradient method, from its two halves.

    ``forward(ctx, call, y0) -> ys`` (N, n) runs the forward solve (:class:`AdjointCall`
    ``call``); ``backward(ctx, grad_ys) -> call.gradients(...)`` the backward pass. A graph
    through the backward pass (double backward) is refused, naming ``label``."""

    def function_forward(ctx, call: AdjointCall, y0: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        return forward(ctx, call, y0)

    def function_backward(ctx, grad_ys: torch.Tensor) -> tuple:
        if torch.is_grad_enabled():
            refuse_double_backward(label)
        return backward(ctx, grad_ys)

    name = "".join(word.capitalize() for word in label.split()) + "Function"
    return type(name, (torch.autograd.Function,), dict(forward=staticmethod(function_forward),
                                                       backward=staticmethod(function_backward)))


def split_like(flat: torch.Tensor, tensors: Tuple[torch.Tensor, ...]) -> Tuple[torch.Tensor, ...]:
    """Split a flat vector into pieces shaped like ``tensors``."""
    sizes = [t.numel() for t in tensors]
    return tuple(piece.view_as(t) for piece, t in zip(torch.split(flat, sizes), tensors))


def refuse_double_backward(method_name: str) -> None:
    """Raised when a graph through an adjoint's backward is differentiated again."""
    raise RuntimeError(
        f"double backward through the {method_name} adjoint is not supported (its backward pass is itself a "
        f"solve with no graph); for higher derivatives use gradient=Direct(), which differentiates through the "
        f"solver's steps with autograd"
    )


def forward_stats(stats: dict, first_stage) -> dict:
    """A forward solve's stats, counting the evaluation of the params check that served as
    its first stage (``first_stage`` not None)."""
    return dict(stats, nfe=stats["nfe"] + (first_stage is not None))


def adjoint_scale(grad_ys: torch.Tensor, norm=None) -> float:
    """The size of the adjoint: the largest ``|∂L/∂y(t_i)|`` over all outputs (1 if all are 0).

    The adjoint equations are linear in ``a_y``: scaling the loss by ``c`` scales ``a_y`` and
    ``a_θ`` by ``c``. The backward solves therefore measure the adjoint's error against
    ``rtol·|a| + atol·scale`` instead of ``rtol·|a| + atol``: then ``L → cL`` changes no
    step and no relative error (exactly so for powers of two), where an absolute tolerance
    meant for ``y`` would let a small adjoint (a mean-reduced loss) take huge, inaccurate
    steps and a large one take needlessly small ones. One host sync per backward pass.

    ``norm``: the method's backward norm; if it has ``combine_scale(float) -> float`` (a norm
    reduced over processes, :class:`~torchadjoint.training.distributed.GlobalPartsNorm`), the
    scale is combined through it too, so every process uses the same tolerance.
    """
    scale = float(grad_ys.abs().max()) if grad_ys.numel() else 0.0
    combine = getattr(norm, "combine_scale", None)
    if combine is not None:
        scale = float(combine(scale))
    return scale if 0.0 < scale < float("inf") else 1.0


def backward_tolerance(problem: Problem, value, name: str, *, with_y: bool, p: int = 0, scale: float = 1.0):
    """Tolerance for a backward state ``[y (if with_y), a_y, a_θ (p entries)]``.

    ``value``: the backward rtol or atol as given (float, tensor or one per state tensor).
    ``y`` keeps it; ``a_y`` gets it times ``scale`` (:func:`adjoint_scale`; 1 for rtol);
    ``a_θ`` the smallest entry times ``scale``. A float when one value serves every entry
    (the controller's cheapest path)."""
    tol = flat_tolerance(problem, value, name)
    if isinstance(tol, float):
        if scale == 1.0 or not with_y:
            return tol * scale
        tol = torch.full((problem.flattener.numel,), tol, dtype=problem.dtype, device=problem.device)
    blocks = ([tol] if with_y else []) + [tol * scale]
    if p:
        blocks.append((tol.min() * scale).expand(p))
    return torch.cat(blocks)


def parameter_tolerance(problem: Problem, value, name: str, scale: float = 1.0) -> float:
    """The tolerance ``a_θ`` is held to (as :func:`backward_tolerance` gives it): the smallest
    entry of the backward ``value`` times ``scale``."""
    tol = flat_tolerance(problem, value, name)
    return (tol if isinstance(tol, float) else float(tol.min())) * scale

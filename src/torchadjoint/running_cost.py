"""Running costs: a loss term ``∫_{t_0}^{t_N} ℓ(t, y(t), f(t, y(t))) dt`` computed by the solve.

``solve(func, y0, t, running_cost=ℓ)`` appends one component ``c`` to the state with
``dc/dt = ℓ(t, y, f(t, y))``, ``c(t_0) = 0``, and solves the augmented system ``(y, c)``
(:func:`with_running_cost`, a transformation of the problem: the gradient methods see
it like any other) with the gradient method asked for. The adjoint of the augmented system is the adjoint of
the loss with the running cost: ``a_c`` is constant (``ℓ`` does not depend on ``c``) and
equals ``∂L/∂c(t_N)``, so ``da_y/dt = -a_y ∂f/∂y - a_c ∂ℓ/∂y`` and
``da_θ/dt = -a_y ∂f/∂θ - a_c ∂ℓ/∂θ`` — the source terms of the continuous adjoint with
a running cost, for every gradient method at once (backsolve, quadrature, checkpointed,
autograd through the solver), time gradients included.

The cost's integral is error-controlled like the state (its tolerance is the smallest of
the state's), so the solver takes the steps the integral needs too.

Protocol for the cost ``ℓ(t, y, dy) -> tensor``: ``t`` a 0-dim tensor, ``y`` the state in
its own structure, ``dy = f(t, y)`` in the same structure (evaluated once for both). The
result has a fixed shape of the user's choosing (a scalar for a batch-averaged
regulariser, ``(batch,)`` for one value per sample, ...) and the state's dtype. Optional
attributes let a cost object say more:

- ``output_shape``: the shape of its result; without it the solve evaluates ``f`` and
  ``ℓ`` once at ``(t_0, y0)`` to find out.
- ``needs_graph = True``: ``ℓ`` differentiates ``dy`` with respect to ``y`` (a Jacobian
  regulariser): ``dy`` then always carries a graph to ``y``, also in a solve without
  gradients.
- ``for_solve(y0) -> ℓ``: called once per solve; the returned callable serves the whole
  solve, forward and backward (a stochastic estimator fixes its noise draw there).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Tuple

import torch
from torch import nn

from .controller import norm_value, rms_norm
from .pytree import tree_leaves, tree_unflatten
from .solution import Solution
from .validation import check_func, check_state, resolve_params


@dataclass
class WithRunningCost:
    """The problem of :func:`torchadjoint.solve` transformed to carry a running cost.

    ``func((y, c)) -> (dy, ℓ)`` on the state ``y0 = (y0, 0)``; ``params`` the parameters
    of the field and of the cost (``func`` is no ``nn.Module`` any more); ``options`` the
    user's for ``(y, c)`` (see :func:`_augment_options`); ``integrals = 1``: the solve's
    :class:`~torchadjoint.problem.Problem` marks ``c`` as an integral riding along, which
    the adjoints' reconstruction check leaves out (it never feeds back into the dynamics).
    """

    func: Callable
    y0: Tuple[Any, torch.Tensor]
    params: Tuple[torch.Tensor, ...]
    options: dict
    integrals: int = 1

    @staticmethod
    def split(solution: Solution) -> Solution:
        """The user's solution from the augmented one: ``ys`` the original state's,
        ``running_cost`` the integral ``∫_{t_0}^{t_N} ℓ dt`` (shaped like ``ℓ``'s result; an
        oriented integral, negative for decreasing times and positive ``ℓ``)."""
        ys, cs = solution.ys
        return Solution(ts=solution.ts, ys=ys, stats=solution.stats, running_cost=cs[-1])


def with_running_cost(func: Callable, y0: Any, t: torch.Tensor, running_cost: Callable,
                      params: Optional[Sequence[torch.Tensor]], options: dict) -> WithRunningCost:
    """The state ``y`` augmented by the running cost's integral; see the module docs."""
    check_func(running_cost, "running_cost")
    check_func(func)
    leaves, spec = tree_leaves(y0, "y0")
    _, dtype, device = check_state(y0)
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"t must be a non-empty 1-D tensor of times, got {t!r}")
    # The gradient method differentiates the augmented function, which is no nn.Module:
    # collect the parameters of func and of the cost here.
    params = list(resolve_params(func, params))
    if isinstance(running_cost, nn.Module) or isinstance(getattr(running_cost, "__self__", None), nn.Module):
        params += list(resolve_params(running_cost, None, "running_cost"))
    cost = running_cost.for_solve(y0) if hasattr(running_cost, "for_solve") else running_cost
    check_func(cost, "running_cost.for_solve(y0)")
    needs_graph = bool(getattr(cost, "needs_graph", getattr(running_cost, "needs_graph", False)))
    evaluate = _evaluator(func, cost, needs_graph)
    shape = getattr(cost, "output_shape", None)
    if shape is None:
        with torch.no_grad():
            _, probe = evaluate(t[0].detach(), y0 if not needs_graph else _tree_map(torch.Tensor.detach, y0))
        _check_value(probe, None, dtype, float(t[0].detach()))
        shape = tuple(probe.shape)
    shape = tuple(shape)

    def augmented(t_, state):
        y, _ = state
        dy, value = evaluate(t_, y)
        _check_value(value, shape, dtype, float(t_))
        return dy, value

    c0 = torch.zeros(shape, dtype=dtype, device=device)
    return WithRunningCost(augmented, (y0, c0), tuple(params), _augment_options(options, spec, leaves, shape))


def _evaluator(func: Callable, cost: Callable, needs_graph: bool) -> Callable:
    """``evaluate(t, y) -> (dy, ℓ)`` with ``f`` evaluated once for both; with ``needs_graph``,
    ``dy`` carries a graph to ``y`` even in a solve without gradients (then dropped after ``ℓ``)."""

    def evaluate(t_, y):
        if not needs_graph:
            dy = func(t_, y)
            return dy, cost(t_, y, dy)
        outer = torch.is_grad_enabled()
        with torch.enable_grad():
            y_in = _tree_map(lambda x: x if (outer and x.requires_grad) else x.detach().requires_grad_(True), y)
            dy = func(t_, y_in)
            value = cost(t_, y_in, dy)
        if not outer:  # a solve without gradients: keep no graph
            dy, value = _tree_map(torch.Tensor.detach, dy), value.detach() if isinstance(value, torch.Tensor) else value
        return dy, value

    return evaluate


def _check_value(value, shape, dtype, t: float) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"running_cost(t, y, dy) at t={t:.6g} returned {type(value).__name__}; it must return a tensor")
    if value.dtype != dtype:
        raise TypeError(f"running_cost(t, y, dy) at t={t:.6g} returned dtype {value.dtype}; it must match the state's {dtype}")
    if shape is not None and tuple(value.shape) != shape:
        raise ValueError(
            f"running_cost(t, y, dy) at t={t:.6g} returned shape {tuple(value.shape)}, but {shape} before "
            f"(or its output_shape); its result must keep one shape during a solve"
        )


def _tree_map(fn, tree):
    leaves, spec = tree_leaves(tree, "state")
    return tree_unflatten([fn(x) for x in leaves], spec)


def _augment_options(options: dict, spec, leaves: Sequence[torch.Tensor], cost_shape) -> dict:
    """Options of the augmented state ``(y, c)`` from the user's for ``y``.

    Per-tensor tolerances gain one entry for ``c``: the smallest of ``y``'s, so the
    integral is at least as accurate as the state. A user norm sees ``y``'s scaled error
    in ``y``'s structure; the norm of the augmented error is the larger of that and the RMS
    of ``c``'s. A grid constructor sees ``y0``.
    """
    options = dict(options)
    for name in ("rtol", "atol"):
        if name in options and not _is_number(options[name]):
            options[name] = _augment_tolerance(options[name], spec, leaves, name)
    norm = options.get("norm")
    if norm is not None and callable(norm):
        def augmented_norm(scaled, norm=norm):
            y_err, c_err = scaled
            return torch.maximum(norm_value(norm(y_err), "norm"), rms_norm(c_err.reshape(-1)))

        options["norm"] = augmented_norm
    grid = options.get("grid_constructor")
    if grid is not None and callable(grid):
        options["grid_constructor"] = lambda state, t, grid=grid: grid(state[0], t)
    return options


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _augment_tolerance(value, spec, leaves, name: str):
    """Per-leaf tolerances (flat order) for ``(y, c)``; the user's value is validated by solve."""
    if isinstance(value, dict):
        missing = [k for k in spec.keys if k not in value] if spec.kind == "dict" else None
        if missing is None or missing:
            raise ValueError(f"{name} is a dict but its keys do not match the state's keys {list(spec.keys)}")
        parts = [value[k] for k in spec.keys]
    elif isinstance(value, (tuple, list)):
        parts = list(value)
        if len(parts) != len(leaves):
            raise ValueError(
                f"{name} has {len(parts)} components but the state has {len(leaves)} tensors; give one value per "
                f"state tensor, or a single scalar"
            )
    else:
        parts = [value] * len(leaves)
    try:
        smallest = min(float(torch.as_tensor(v).min()) for v in parts)
    except (TypeError, ValueError, RuntimeError):
        return value
    if not math.isfinite(smallest):
        return value
    return [*parts, smallest]

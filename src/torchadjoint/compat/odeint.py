"""``odeint``, ``odeint_adjoint`` and ``odeint_event`` with torchdiffeq's signatures.

Thin layers over :func:`torchadjoint.solve` and :func:`torchadjoint.events.solve_to_event`:

- ``odeint`` differentiates by autograd through the solver's steps (``gradient=Direct()``),
  as torchdiffeq's ``odeint`` does;
- ``odeint_adjoint`` uses the continuous adjoint (``gradient=Backsolve(...)``) with
  torchdiffeq's defaults for the backward solve, or another gradient method named by
  ``adjoint_options["gradient"]``;
- with ``event_fn`` both stop at a terminal event and return ``(event_t, solution)``, the
  event time differentiable by the implicit-function theorem (torchdiffeq's ``odeint``
  returns it without a gradient; only its ``odeint_event`` attaches one).

See ``docs/migration.md`` for every deliberate difference from torchdiffeq.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..adjoint import GRADIENT_METHODS, Backsolve, Checkpointed, Direct, GradientMethod, Quadrature
from ..events import solve_to_event
from ..pytree import tree_leaves, tree_unflatten
from ..solve import solve
from ..validation import check_has_values, check_state, check_times
from .methods import resolve_method
from .scipy_solver import scipy_odeint
from .norms import adjoint_norm, default_state_norm
from .options import OPTIONS, Plan, check_keys, plan_backward, plan_solve, usable_options
from .perturb import EnterBackward, SideOfStep

# torchdiffeq's fixed-grid event search gives up after this many steps.
FIXED_EVENT_MAX_STEPS = 20000


def odeint(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None, event_fn=None):
    """Integrate ``dy/dt = func(t, y)``, ``y(t[0]) = y0`` (torchdiffeq's ``odeint``).

    Args:
        func: ``func(t, y) -> dy/dt``; ``t`` a 0-dim tensor in ``y``'s dtype.
        y0: a tensor of any shape, or a tuple of tensors.
        t: (N,) increasing or decreasing output times; ``t[0]`` is the start.
        rtol, atol: tolerances: floats, tensors broadcastable to the state, or (tuple
            states) one per tensor.
        method: a torchdiffeq method name (default ``"dopri5"``): ``dopri8``, ``dopri5``,
            ``bosh3``, ``fehlberg2``, ``adaptive_heun`` (adaptive); ``euler``, ``midpoint``,
            ``heun2``, ``heun3``, ``rk4`` (fixed grid; ``rk4`` is the 3/8 rule, as in
            torchdiffeq). This library's ``tsit5`` is accepted too.
        options: dict with keys among ``OPTIONS`` (see :mod:`.options` for which apply).
        event_fn: ``event_fn(t, y) -> tensor``: stop when a component crosses zero. Then
            ``t`` must have two entries: the start and any time giving the direction.

    Returns:
        ``y`` (N, *y0.shape) (a tuple for tuple states); with ``event_fn``,
        ``(event_t, y)`` with ``y`` of length 2: the initial state and the state at the event.
    """
    if method == "scipy_solver" and event_fn is None:
        params = list(func.parameters()) if isinstance(func, nn.Module) else []
        return scipy_odeint(func, y0, t, rtol, atol, options, params)
    tableau = resolve_method(method)
    plan, direction = _plan_forward(tableau, method, options, func, y0, t, event_fn is not None)
    wrapped = SideOfStep(func, plan.sides) if plan.sides is not None else func
    if event_fn is not None:
        return _event_solve(wrapped, y0, t, event_fn, direction, plan, Direct(), None, rtol, atol)
    return solve(wrapped, y0, t, method=tableau, gradient=Direct(), rtol=rtol, atol=atol, **plan.native).ys


def odeint_adjoint(
    func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None, event_fn=None,
    adjoint_rtol=None, adjoint_atol=None, adjoint_method=None, adjoint_options=None, adjoint_params=None,
):
    """``odeint`` whose gradients come from the continuous adjoint (torchdiffeq's ``odeint_adjoint``).

    The forward solve keeps no graph; the backward solve integrates ``(y, a_y, a_θ)`` from
    the last output time to the first (one solve, landing on every output time).

    Args:
        func, y0, t, rtol, atol, method, options, event_fn: as for :func:`odeint`.
        adjoint_rtol, adjoint_atol, adjoint_method: the backward solve's (default: the
            forward's). Per-tensor tuple tolerances work here too.
        adjoint_options: the backward solve's options (default: ``options`` without
            ``norm``; required when ``adjoint_method`` differs and ``options`` is given).
            ``norm`` may be ``"seminorm"`` (error control on ``y`` and ``a_y`` only) or a
            callable receiving ``(t, y, a_y, *a_θ)`` (``t`` is a zero scalar here). The key
            ``"gradient"`` selects another gradient method by name from
            ``torchadjoint.GRADIENT_METHODS`` (e.g. ``"checkpointed"``, ``"quadrature"``,
            ``"direct"``) or as an instance; further keys naming that method's constructor
            arguments (``checkpoints``, ``nodes``, ...) are passed to it.
        adjoint_params: the tensors to differentiate (default: ``func``'s parameters; a
            plain function needs ``adjoint_params=...``, possibly ``()``). Parameters not
            requiring grad are left out.
    """
    if adjoint_params is None and not isinstance(func, nn.Module):
        raise ValueError(
            "func must be an instance of nn.Module to specify the adjoint parameters; alternatively they can be "
            "specified explicitly via the `adjoint_params` argument. If there are no parameters then it is "
            "allowable to set `adjoint_params=()`."
        )
    if method == "scipy_solver" and event_fn is None:
        params = list(func.parameters()) if adjoint_params is None else (
            [adjoint_params] if isinstance(adjoint_params, torch.Tensor) else list(adjoint_params))
        return scipy_odeint(func, y0, t, rtol, atol, options, params)
    tableau, request = _backward_request(method, options, adjoint_rtol, adjoint_atol, adjoint_method, adjoint_options)
    params = _trainable(func, adjoint_params)
    plan, direction = _plan_forward(tableau, method, options, func, y0, t, event_fn is not None)
    gradient, backward_sides = request.build(plan, func, y0, t, params, rtol, atol)

    wrapper = None
    if plan.sides is not None or backward_sides is not None:
        wrapper = SideOfStep(func, plan.sides, backward_sides)
    used = wrapper if wrapper is not None else func
    if event_fn is not None:
        return _event_solve(used, y0, t, event_fn, direction, plan, gradient, params, rtol, atol, wrapper)
    ys = solve(used, y0, t, method=tableau, gradient=gradient, params=params, rtol=rtol, atol=atol, **plan.native).ys
    # Past the forward pass, f is evaluated by the adjoint's backward solve (nudged per its own grid, if at all).
    return _mark_backward(wrapper, ys) if wrapper is not None else ys


def odeint_event(func, y0, t0, *, event_fn, reverse_time=False, odeint_interface=odeint, **kwargs):
    """Solve from ``t0`` until ``event_fn(t, y)`` crosses zero (torchdiffeq's ``odeint_event``).

    Args:
        t0: the start time, a tensor with one element.
        reverse_time: integrate backwards in time.
        odeint_interface: :func:`odeint` (gradients by autograd through the solver) or
            :func:`odeint_adjoint` (by the adjoint); both return a differentiable event time.
        **kwargs: passed on (``rtol``, ``atol``, ``method``, ``options``, ``adjoint_*``).

    Returns:
        ``(event_t, solution)``: the event time (0-dim) and the states at ``t0`` and at the
        event (length 2 along the first dimension).
    """
    if not isinstance(t0, torch.Tensor):
        raise TypeError(f"t0 must be a tensor, got {type(t0).__name__}; use torch.tensor(0.0)")
    start = t0.reshape(-1)
    if start.numel() != 1:
        raise ValueError(f"t0 must have exactly one element, got shape {tuple(t0.shape)}")
    t = torch.cat([start, start.detach() + (-1.0 if reverse_time else 1.0)])
    return odeint_interface(func, y0, t, event_fn=event_fn, **kwargs)


def _plan_forward(tableau, method, options, func, y0, t, event: bool):
    """``(Plan, direction)`` of the forward solve, ``y0`` and ``t`` checked as the native
    solve checks them before the options are planned from them (``direction``: of an
    event solve, else None)."""
    _, dtype, _ = check_state(y0)
    if event:
        direction = _event_direction(t)
    else:
        direction = None
        check_times(t)
    return plan_solve(tableau, method or "dopri5", options, func, y0, t, dtype, event_direction=direction), direction


def _event_direction(t: Any) -> float:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a 1-D torch.Tensor of times, got {type(t).__name__}; use torch.tensor([...])")
    check_has_values(t, "t")
    if t.dim() != 1 or t.numel() != 2:
        raise ValueError(
            f"We require len(t) == 2 when in event handling mode, but got t of shape {tuple(t.shape)}: give the start "
            f"time and any later (or earlier, to go back in time) time"
        )
    a, b = float(t[0].detach()), float(t[1].detach())
    if a == b:
        raise ValueError(f"t[0] and t[1] must differ (t[1] gives the direction of integration), got {a} twice")
    return 1.0 if b > a else -1.0


def _event_solve(func, y0, t, event_fn, direction, plan: Plan, gradient, params, rtol, atol, wrapper=None):
    native = dict(plan.native)
    if not plan.tableau.adaptive:
        native.setdefault("max_num_steps", FIXED_EVENT_MAX_STEPS)
    result = solve_to_event(
        func, y0, t[0], event_fn, direction=direction, method=plan.tableau, gradient=gradient, params=params,
        rtol=rtol, atol=atol, **native,
    )
    leaves, spec = tree_leaves(y0)
    event_leaves, _ = tree_leaves(result.y)
    solution = tree_unflatten([torch.stack([a, b]) for a, b in zip(leaves, event_leaves)], spec)
    event_t = result.t.to(t)
    if wrapper is not None:
        solution = _mark_backward(wrapper, solution)
    return event_t, solution


def _mark_backward(wrapper: SideOfStep, ys):
    leaves, spec = tree_leaves(ys, "solution")
    if not any(x.requires_grad for x in leaves):
        return ys
    return tree_unflatten(list(EnterBackward.apply(wrapper, *leaves)), spec)


def _trainable(func, adjoint_params) -> tuple:
    """The tensors to differentiate: ``adjoint_params`` (default ``func``'s parameters), less
    those not requiring grad."""
    if adjoint_params is None:
        adjoint_params = list(func.parameters())
    elif isinstance(adjoint_params, torch.Tensor):
        adjoint_params = [adjoint_params]
    return tuple(p for p in adjoint_params if p.requires_grad)


# The constructor arguments of each gradient method, declared for the routing of
# ``adjoint_options`` keys (tests/test_compat.py checks them against the constructors).
CONSTRUCTOR_ARGUMENTS = {
    Backsolve: ("rtol", "atol", "method", "norm", "options", "reconstruction_warning", "reset_threshold",
                "reconstruction_error"),
    Checkpointed: ("checkpoints", "rtol", "atol", "method", "norm", "options", "mismatch_warning"),
    Direct: ("checkpoints",),
    Quadrature: ("rtol", "atol", "method", "nodes", "norm", "options", "reconstruction_warning", "batching", "chunk",
                 "reconstruction_error"),
}
# The arguments the front door fills from adjoint_rtol, adjoint_atol, adjoint_method and the
# solver keys of adjoint_options; the others are the method's own, given as adjoint_options keys.
BACKWARD_SOLVE_ARGUMENTS = ("rtol", "atol", "method", "norm", "options")


def constructor_arguments(cls) -> tuple:
    """The declared constructor arguments of the gradient method class ``cls`` (of the
    nearest declared base class; none for a class outside the library)."""
    for declared in cls.__mro__:
        if declared in CONSTRUCTOR_ARGUMENTS:
            return CONSTRUCTOR_ARGUMENTS[declared]
    return ()


def _gradient_class(choice: Any):
    if choice is None:
        return Backsolve
    if isinstance(choice, GradientMethod):
        return type(choice)
    if isinstance(choice, str) and choice in GRADIENT_METHODS:
        return GRADIENT_METHODS[choice]
    raise ValueError(
        f"adjoint_options['gradient'] must be one of {sorted(GRADIENT_METHODS)} (torchadjoint.GRADIENT_METHODS) or a "
        f"gradient method instance, got {choice!r}"
    )


@dataclass
class BackwardRequest:
    """What an ``odeint_adjoint`` call asks of its gradient method, as given.

    ``choice``: ``adjoint_options["gradient"]`` (None: backsolve); ``rtol``, ``atol``,
    ``method``: ``adjoint_rtol``, ``adjoint_atol``, ``adjoint_method`` (None: not given);
    ``options``: the backward solve's torchdiffeq options (``adjoint_options``, or the
    forward's when ``explicit`` is False); ``norm``: ``adjoint_options["norm"]``;
    ``own``: ``adjoint_options`` keys that are the chosen method's own constructor arguments.
    """

    choice: Any
    forward_method: Any
    rtol: Any
    atol: Any
    method: Any
    options: dict
    explicit: bool
    norm: Any = None
    own: dict = field(default_factory=dict)

    @property
    def cls(self):
        return _gradient_class(self.choice)

    def build(self, plan: Plan, func, y0, t, params, rtol, atol):
        """``(gradient method, backward Sides or None)`` for a forward solve planned as ``plan``."""
        flattener, dtype, _ = check_state(y0)
        if isinstance(self.choice, GradientMethod):
            self._refuse_settings()
            return self.choice, None
        method = self.forward_method if self.method is None else self.method
        tableau, label = resolve_method(method, "adjoint_method"), method or "dopri5"
        if self.cls is Backsolve:
            native, sides = plan_backward(tableau, label, self.options, plan, func, y0, t, dtype, defaults=self.explicit)
            state_norm = plan.native.get("norm", default_state_norm(y0))
            own = dict(self.own)
            own.setdefault("reset_threshold", 0.0)  # torchdiffeq puts the forward's y back at every output time
            return Backsolve(
                rtol=rtol if self.rtol is None else self.rtol,
                atol=atol if self.atol is None else self.atol,
                method=tableau,
                norm=adjoint_norm(self.norm, state_norm, flattener, params),
                options=native,
                **own,
            ), sides
        if self.explicit and self.options.get("perturb") and not tableau.adaptive:
            raise ValueError(
                f"adjoint_options['perturb'] is supported with the backsolve gradient only, not {self.cls.__name__}"
            )
        return self._build_other(tableau, label, plan, func, y0, t, dtype), None

    def _refuse_settings(self) -> None:
        """A ready-made gradient method is configured by its constructor alone."""
        given = [k for k, v in dict(adjoint_rtol=self.rtol, adjoint_atol=self.atol, adjoint_method=self.method).items()
                 if v is not None]
        if self.explicit:
            given += [f"adjoint_options[{k!r}]" for k in self.options if k in OPTIONS]
        if given or self.own or self.norm is not None:
            raise ValueError(
                f"adjoint_options['gradient'] is a ready-made {type(self.choice).__name__}; configure it in its "
                f"constructor, not through {given + list(self.own) + (['norm'] if self.norm is not None else [])}"
            )

    def _build_other(self, tableau, label, plan, func, y0, t, dtype) -> GradientMethod:
        """A gradient method other than backsolve, from the torchdiffeq-style settings the user
        gave explicitly (its own defaults otherwise; ``norm`` in its own meaning)."""
        wanted = dict(rtol=self.rtol, atol=self.atol, norm=self.norm)
        if self.method is not None:
            wanted["method"] = tableau
        wanted = {k: v for k, v in wanted.items() if v is not None}
        if self.explicit and self.options:
            native, _ = plan_backward(tableau, label, self.options, plan, func, y0, t, dtype, defaults=False)
            translated = {k: v for k, v in native.items() if k in self.options and v is not None}
            if translated:
                wanted["options"] = translated
        arguments = constructor_arguments(self.cls)
        refused = [("adjoint_" + k if k in ("rtol", "atol", "method") else f"adjoint_options[{k!r}]")
                   for k in wanted if k not in arguments]
        if refused:
            raise ValueError(
                f"the {self.cls.__name__} gradient method takes no {refused}; its arguments are {list(arguments)}"
            )
        return self.cls(**self.own, **wanted)


def _backward_request(method, options, adjoint_rtol, adjoint_atol, adjoint_method, adjoint_options):
    """``(forward tableau, BackwardRequest)`` from ``odeint_adjoint``'s arguments, checked
    as torchdiffeq checks them."""
    if adjoint_method is not None and adjoint_method != method and options is not None and adjoint_options is None:
        raise ValueError(
            "If `adjoint_method != method` then we cannot infer `adjoint_options` from `options`. So as `options` "
            "has been passed then `adjoint_options` must be passed as well."
        )
    explicit = adjoint_options is not None
    if explicit and not isinstance(adjoint_options, dict):
        raise TypeError(f"adjoint_options must be a dict or None, got {type(adjoint_options).__name__}")
    tableau = resolve_method(method)
    if explicit:
        chosen = dict(adjoint_options)
    else:
        # The forward's options, less the keys it ignores (the forward's planning warns about those once).
        inherited = usable_options(check_keys(options, "options"), tableau, method or "dopri5", "options", warn=False)
        chosen = {k: v for k, v in inherited.items() if k != "norm"}
    request = BackwardRequest(chosen.pop("gradient", None), method, adjoint_rtol, adjoint_atol, adjoint_method,
                              chosen, explicit)
    own = [k for k in constructor_arguments(request.cls) if k not in BACKWARD_SOLVE_ARGUMENTS and k not in OPTIONS]
    request.own = {k: chosen.pop(k) for k in list(chosen) if k in own}
    request.norm = chosen.pop("norm", None)
    return tableau, request

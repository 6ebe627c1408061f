"""torchdiffeq's ``options`` dicts, validated and translated to :func:`torchadjoint.solve` options.

torchdiffeq's adaptive solvers take ``first_step``, ``min_step``, ``max_step``, ``step_t``,
``jump_t``, ``safety``, ``ifactor``, ``dfactor``, ``max_num_steps``, ``dtype`` and ``norm``;
its fixed-grid solvers take ``step_size``, ``grid_constructor``, ``interp`` and ``perturb``
(and ignore ``norm``). torchdiffeq warns about other keys and goes on; so does the front
door, naming them (the native :func:`torchadjoint.solve` refuses them).
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional

import torch

from ..errors import user_stacklevel
from ..integrate import fixed_grid
from ..options import DEFAULT_MAX_NUM_STEPS
from ..problem import direction_of
from ..tableaux import ButcherTableau
from .methods import end_stages
from .norms import default_state_norm
from .perturb import Sides, point_set, uniform_grid

ADAPTIVE_OPTIONS = (
    "first_step", "min_step", "max_step", "step_t", "jump_t", "safety", "ifactor", "dfactor", "max_num_steps", "dtype",
    "norm",
)
FIXED_OPTIONS = ("step_size", "grid_constructor", "interp", "perturb", "norm")
OPTIONS = tuple(sorted(set(ADAPTIVE_OPTIONS) | set(FIXED_OPTIONS)))
_SCALARS = ("first_step", "min_step", "max_step", "safety", "ifactor", "dfactor", "max_num_steps")
# torchdiffeq's defaults for a solve whose options leave them out (this library's backsolve
# would otherwise inherit the forward's) -- except max_num_steps: torchdiffeq's 2**31 - 1
# lets a stagnating backward solve run for hours, so it gets the native bounded default.
ADAPTIVE_DEFAULTS = dict(min_step=0.0, max_step=math.inf, safety=0.9, ifactor=10.0, dfactor=0.2,
                         max_num_steps=DEFAULT_MAX_NUM_STEPS)


@dataclass
class Plan:
    """One solve's translated options.

    ``native``: keyword options for :func:`torchadjoint.solve` (rtol/atol aside);
    ``sides``: where ``f`` is evaluated just inside a step (see :mod:`.perturb`), or None;
    ``points``: the step points of a fixed-step solve (for ``perturb`` in the adjoint).
    """

    tableau: ButcherTableau
    native: dict = field(default_factory=dict)
    sides: Optional[Sides] = None
    points: List[float] = field(default_factory=list)


def check_keys(options: Any, name: str) -> dict:
    """A copy of ``options`` (None → {}) with the keys no torchdiffeq solver takes left out
    silently (see :func:`usable_options`, which warns about them)."""
    return {k: v for k, v in _options_dict(options, name).items() if k in OPTIONS}


def _options_dict(options: Any, name: str) -> dict:
    """``options`` checked to be a dict (None → {})."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise TypeError(f"{name} must be a dict of solver options or None, got {type(options).__name__}")
    return options


def usable_options(options: Any, tableau: ButcherTableau, label: str, name: str, warn: bool = True) -> dict:
    """The keys of ``options`` that the method uses; the others are left out with one warning
    naming them, as torchdiffeq's solvers do (``Unexpected arguments``): programs pass
    ``step_size`` whatever the method, and old ones ``grid_points``. The native
    :func:`torchadjoint.solve` keeps these as errors."""
    options = _options_dict(options, name)
    valid = ADAPTIVE_OPTIONS if tableau.adaptive else FIXED_OPTIONS
    dropped = [k for k in options if k not in valid]
    if dropped and warn:
        kind = "adaptive" if tableau.adaptive else "fixed-grid"
        unknown = [k for k in dropped if k not in OPTIONS]
        warnings.warn(
            f"{name} key(s) {dropped} are ignored: the {kind} method {label!r} does not use them (it takes "
            f"{list(valid)})" + (f"; {unknown} is not an option of any solver here" if unknown else "")
            + ". torchdiffeq ignores them too, with a warning",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
    return {k: v for k, v in options.items() if k in valid}


def _check_dtype(value: Any, name: str) -> None:
    if not (isinstance(value, torch.dtype) and value.is_floating_point):
        raise TypeError(f"{name}['dtype'] must be a floating-point torch.dtype such as torch.float64, got {value!r}")


def _times_list(value: Any, name: str) -> List[float]:
    try:
        return [float(x) for x in torch.as_tensor(value, dtype=torch.float64).reshape(-1).tolist()]
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a 1-D tensor or sequence of times, got {type(value).__name__}") from None


@dataclass
class _Span:
    """Where a solve runs: its output ``times`` (host floats), ``direction`` (+1/-1), and the
    interval ``[lo, hi]`` it covers (an event solve, with no end time, runs to ±inf)."""

    times: List[float]
    direction: float
    lo: float
    hi: float
    event: bool = False

    @classmethod
    def of(cls, t: torch.Tensor, event_direction: Optional[float] = None) -> "_Span":
        times = _times_list(t.detach(), "t")
        if event_direction is not None:
            lo, hi = (times[0], math.inf) if event_direction > 0 else (-math.inf, times[0])
            return cls(times, event_direction, lo, hi, True)
        return cls(times, direction_of(times), min(times[0], times[-1]), max(times[0], times[-1]))


def _constructed_grid(constructor: Any, func: Callable, y0: Any, t: torch.Tensor, name: str) -> List[float]:
    """The grid torchdiffeq's ``grid_constructor(func, y0, t)`` returns, as host floats."""
    if not callable(constructor):
        raise TypeError(f"{name}['grid_constructor'] must be callable as (func, y0, t) -> grid, got {constructor!r}")
    grid = constructor(func, y0, t)
    if not isinstance(grid, torch.Tensor):
        grid = torch.as_tensor(grid)
    return [float(x) for x in grid.detach().reshape(-1).to(torch.float64).tolist()]


class FixedGrid:
    """A native ``grid_constructor(y0, ts)`` returning a grid computed up front (torchdiffeq
    calls its constructor with all output times; the native one sees only the two ends).
    Asked for the reverse interval (the adjoint's solve), it returns the grid reversed."""

    def __init__(self, grid: List[float], fallback: Optional[Callable] = None):
        self.grid = grid
        self.fallback = fallback

    def __call__(self, y0, ts: torch.Tensor):
        a, b = float(ts[0]), float(ts[-1])
        if (a, b) == (self.grid[0], self.grid[-1]):
            return torch.tensor(self.grid, dtype=torch.float64)
        if (a, b) == (self.grid[-1], self.grid[0]):
            return torch.tensor(self.grid[::-1], dtype=torch.float64)
        return self.fallback(y0, ts) if self.fallback is not None else ts


def _fixed_grid_options(opts: dict, name: str) -> tuple:
    """``(interp, perturb, step_size, grid_constructor)`` of a fixed-grid method's options,
    checked: interp 'linear' (default) or 'cubic', perturb a bool, not both a step size and
    a grid constructor."""
    interp = opts.get("interp", "linear")
    if interp not in ("linear", "cubic"):
        raise ValueError(f"{name}['interp'] must be 'linear' or 'cubic', got {interp!r}")
    perturb = opts.get("perturb", False)
    if not isinstance(perturb, bool):
        raise TypeError(f"{name}['perturb'] must be True or False, got {perturb!r}")
    step_size, constructor = opts.get("step_size"), opts.get("grid_constructor")
    if step_size is not None and constructor is not None:
        raise ValueError(f"{name}: step_size and grid_constructor are mutually exclusive arguments")
    return interp, perturb, step_size, constructor


def plan_solve(
    tableau: ButcherTableau,
    label: str,
    options: Optional[dict],
    func: Callable,
    y0: Any,
    t: torch.Tensor,
    state_dtype: torch.dtype,
    *,
    event_direction: Optional[float] = None,
    name: str = "options",
) -> Plan:
    """Translate a forward solve's torchdiffeq ``options`` (``event_direction``: an event
    solve from ``t[0]`` in that direction, with no end time)."""
    opts = usable_options(options, tableau, label, name)
    span = _Span.of(t, event_direction)
    plan = Plan(tableau)
    native = plan.native
    native["norm"] = opts["norm"] if "norm" in opts else default_state_norm(y0)
    if native["norm"] is None:
        del native["norm"]
    if "dtype" in opts:
        _check_dtype(opts["dtype"], name)  # times are float64 on the host here, whatever is asked
    if tableau.adaptive:
        _plan_adaptive(plan, opts, name, span, state_dtype)
    else:
        _plan_fixed(plan, opts, name, label, func, y0, t, span, state_dtype)
    return plan


def _plan_adaptive(plan: Plan, opts: dict, name: str, span: _Span, state_dtype: torch.dtype) -> None:
    """An adaptive method's options into ``plan``: the scalars as they are, ``step_t`` and
    ``jump_t`` within the interval ``[lo, hi]``, and the sides of the steps at those marks."""
    native, times, lo, hi = plan.native, span.times, span.lo, span.hi
    for key in _SCALARS:
        if key in opts:
            native[key] = opts[key]
    marks = []
    for key in ("step_t", "jump_t"):
        if key in opts and opts[key] is not None:
            values = [x for x in _times_list(opts[key], f"{name}['{key}']") if lo <= x <= hi]
            native[key] = values
            marks += values
    if len(set(marks)) < len(marks):
        raise ValueError(f"{name}: step_t and jump_t must not have any repeated elements between them")
    inner = [x for x in marks if lo < x < hi and x != times[0]]
    if inner:
        # torchdiffeq evaluates every end-of-step stage just before the step's end: at
        # a jump in f, the step that ends there sees only the piece before it.
        plan.sides = Sides(point_set(inner, state_dtype), span.direction, end_stages(plan.tableau), lo, hi)


def _plan_fixed(plan: Plan, opts: dict, name: str, label: str, func: Callable, y0: Any, t: torch.Tensor, span: _Span,
                state_dtype: torch.dtype) -> None:
    """A fixed-grid method's options into ``plan``: the interpolation, the grid (a step size,
    or torchdiffeq's grid constructor called once on all output times) and, with
    ``perturb``, the sides of the steps at the grid's points."""
    native, times, direction = plan.native, span.times, span.direction
    interp, perturb, step_size, constructor = _fixed_grid_options(opts, name)
    native["interpolation"] = "linear" if interp == "linear" else "dense"  # dense = cubic Hermite for these
    if span.event:
        if step_size is None:
            raise ValueError(
                f"event handling with the fixed-grid method {label!r} requires {name}['step_size'] "
                f"(the solve has no end time for a grid to span)"
            )
        native["step_size"] = step_size
        is_point = uniform_grid(times[0], float(step_size), direction, state_dtype)
    else:
        if step_size is not None:
            native["step_size"] = step_size
            h = float(step_size.item() if isinstance(step_size, torch.Tensor) else step_size)
            if not (isinstance(h, numbers.Real) and h > 0 and math.isfinite(h)):
                raise ValueError(f"{name}['step_size'] must be a positive finite number, got {step_size!r}")
            grid = [times[0]] + (fixed_grid(times[0], times[-1], h) if times[-1] != times[0] else [])
        else:
            if constructor is not None:
                grid = _constructed_grid(constructor, func, y0, t, name)
            else:
                grid = times  # torchdiffeq's default: step from output time to output time
            if len(times) > 1:
                native["grid_constructor"] = FixedGrid(grid, None if constructor is None else (lambda y, ts: constructor(func, y, ts)))
            else:
                native["step_size"] = 1.0  # a single output time: nothing to integrate
        plan.points = grid
        is_point = point_set(grid, state_dtype)
    if perturb:
        plan.sides = Sides(is_point, direction, end_stages(plan.tableau), span.lo, span.hi)


def plan_backward(
    tableau: ButcherTableau,
    label: str,
    opts: dict,
    forward: Plan,
    func: Callable,
    y0: Any,
    t: torch.Tensor,
    state_dtype: torch.dtype,
    *,
    name: str = "adjoint_options",
    defaults: bool = True,
) -> tuple:
    """Translate torchdiffeq ``adjoint_options`` (keys already checked) for the adjoint's
    backward solve: ``(native options, Sides or None)``. ``defaults`` fills torchdiffeq's
    defaults for adaptive keys left out."""
    opts = usable_options(opts, tableau, label, name)
    native: dict = {}
    if "dtype" in opts:
        _check_dtype(opts["dtype"], name)
    span = _Span.of(t)
    times, direction, lo, hi = span.times, span.direction, span.lo, span.hi
    if tableau.adaptive:
        if defaults:
            native.update(ADAPTIVE_DEFAULTS)
        for key in _SCALARS:
            if key in opts:
                native[key] = opts[key]
        for key in ("step_t", "jump_t"):
            if key in opts and opts[key] is not None:
                native[key] = [x for x in _times_list(opts[key], f"{name}['{key}']") if lo <= x <= hi]
        return native, None

    _, perturb, step_size, constructor = _fixed_grid_options(opts, name)
    if step_size is not None:
        native.update(step_size=step_size, grid_constructor=None)
        h = float(step_size.item() if isinstance(step_size, torch.Tensor) else step_size)
        grid = [times[-1]] + fixed_grid(times[-1], times[0], h)
    else:
        if constructor is not None:
            grid = _constructed_grid(constructor, func, y0, t.flip(0), name)
        else:
            grid = times[::-1]  # torchdiffeq's default: one step per output interval
        native.update(step_size=None, grid_constructor=FixedGrid(grid))
    sides = None
    if perturb:
        points = set(grid) | set(times)
        sides = Sides(point_set(points, state_dtype), -direction, end_stages(tableau), lo, hi)
    return native, sides

"""Solver options: one validated record per solve (forward), reused by backward solves."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import torch

from .compiled import compile_setting
from .tableaux import METHODS, AdamsTableau, ButcherTableau, ESDIRKTableau

Tolerance = Union[float, torch.Tensor, Sequence[Any]]

# A solve that needs more steps than this is almost always stagnating (a stiff problem
# under an explicit method, an interval far too long, an event that never comes): it
# stops with a SolveError saying so, rather than running for hours. Backward passes get
# one more step per output time they land on. Raise it with max_num_steps=...
DEFAULT_MAX_NUM_STEPS = 100_000


def resolve_method(method: Union[str, ButcherTableau], name: str = "method") -> ButcherTableau:
    """The tableau for a method name (or a custom tableau passed through)."""
    if isinstance(method, (ButcherTableau, ESDIRKTableau, AdamsTableau)):
        return method
    if not isinstance(method, str):
        raise TypeError(f"{name} must be a method name (str), got {type(method).__name__}; choose from {sorted(METHODS)}")
    if method not in METHODS:
        raise ValueError(f"{name}={method!r} is not a known method; choose from {sorted(METHODS)}")
    return METHODS[method]


def _check_tolerance(value: Tolerance, name: str) -> None:
    leaves = value if isinstance(value, (tuple, list)) else (value.values() if isinstance(value, dict) else [value])
    for v in leaves:
        if isinstance(v, torch.Tensor):
            if not v.is_floating_point():
                raise TypeError(f"{name} must be a float or a floating-point tensor, got dtype {v.dtype}")
            bad = torch.isnan(v).any() or (v < 0).any()
            if bool(bad):
                raise ValueError(f"{name} must be non-negative and not NaN, got {v}")
        elif isinstance(v, numbers.Real) and not isinstance(v, bool):
            if not (v >= 0) or math.isinf(v):
                raise ValueError(f"{name} must be a finite non-negative number, got {v!r}")
        else:
            raise TypeError(f"{name} must be a float, a tensor or one per state tensor, got {type(v).__name__}")


def _positive(value: Any, name: str, allow_none: bool = True, allow_zero: bool = False, allow_inf: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    ok = (value >= 0 if allow_zero else value > 0) and (allow_inf or math.isfinite(value)) and not math.isnan(value)
    if not ok:
        what = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be {what}{'' if allow_inf else ' and finite'}, got {value!r}")
    return value


def _times(value: Any, name: str) -> Tuple[float, ...]:
    if value is None:
        return ()
    if isinstance(value, torch.Tensor):
        if value.dim() > 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(value.shape)}")
        value = value.reshape(-1).tolist()
    try:
        times = tuple(float(x) for x in value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a 1-D tensor or sequence of times, got {type(value).__name__}") from None
    if not all(math.isfinite(x) for x in times):
        raise ValueError(f"{name} must contain finite times, got {times}")
    return times


@dataclass(frozen=True)
class SolverOptions:
    """Everything that configures one integration, validated.

    ``rtol``/``atol``: floats, tensors broadcastable to the state, or one per state tensor.
    ``norm``: maps the scaled error (in the state's own structure) to a scalar tensor.
    ``step_size``/``grid``: for fixed-step methods. ``grid_constructor(y0, t) -> times``.
    ``step_t``/``jump_t``: times every step lands on; at ``jump_t`` ``f`` is discontinuous.
    ``interpolation``: how outputs inside a step are made — ``"dense"`` (the method's continuous
    extension, or cubic Hermite), ``"linear"``, or ``"land"`` (none: every output time is a step
    end, see :meth:`landing_on_outputs`; the default for the adaptive implicit methods).
    """

    method: ButcherTableau
    rtol: Tolerance = 1e-7
    atol: Tolerance = 1e-9
    norm: Optional[Callable] = None
    step_size: Optional[float] = None
    grid_constructor: Optional[Callable] = None
    first_step: Optional[float] = None
    min_step: float = 0.0
    max_step: float = math.inf
    max_num_steps: int = DEFAULT_MAX_NUM_STEPS
    safety: float = 0.9
    ifactor: float = 10.0
    dfactor: float = 0.2
    pcoeff: float = 0.0
    icoeff: float = 1.0
    step_t: Tuple[float, ...] = ()
    jump_t: Tuple[float, ...] = ()
    interpolation: str = "dense"
    compile: Optional[str] = None  # a torch.compile mode, or None: eager (see torchadjoint.compiled)

    @classmethod
    def build(cls, method="dopri5", **kwargs) -> "SolverOptions":
        """Validate and build. Raises ValueError/TypeError naming the argument."""
        tableau = resolve_method(method)
        rtol, atol = kwargs.get("rtol", 1e-7), kwargs.get("atol", 1e-9)
        _check_tolerance(rtol, "rtol")
        _check_tolerance(atol, "atol")
        if _all_zero(rtol) and _all_zero(atol):
            raise ValueError("rtol and atol cannot both be zero: no error would ever be accepted")
        norm = kwargs.get("norm")
        if norm is not None and not callable(norm):
            raise TypeError(f"norm must be a callable (scaled error -> scalar tensor), got {type(norm).__name__}")
        step_size = _positive(kwargs.get("step_size"), "step_size")
        grid_constructor = kwargs.get("grid_constructor")
        if grid_constructor is not None and not callable(grid_constructor):
            raise TypeError(f"grid_constructor must be callable (y0, t) -> grid, got {type(grid_constructor).__name__}")
        if tableau.adaptive and (step_size is not None or grid_constructor is not None):
            raise ValueError(
                f"step_size/grid_constructor apply to fixed-step methods, but method={tableau.name!r} is adaptive; "
                f"use first_step to set its initial step, or choose a fixed-step method"
            )
        if not tableau.adaptive and step_size is None and grid_constructor is None:
            raise ValueError(f"method={tableau.name!r} has a fixed step: pass step_size=... (or a grid_constructor)")
        first_step = _positive(kwargs.get("first_step"), "first_step")
        min_step = _positive(kwargs.get("min_step", 0.0), "min_step", allow_zero=True)
        max_step = _positive(kwargs.get("max_step", math.inf), "max_step", allow_inf=True)
        if min_step > max_step:
            raise ValueError(f"min_step={min_step} is larger than max_step={max_step}")
        max_num_steps = kwargs.get("max_num_steps", DEFAULT_MAX_NUM_STEPS)
        if not isinstance(max_num_steps, numbers.Integral) or isinstance(max_num_steps, bool) or max_num_steps <= 0:
            raise ValueError(f"max_num_steps must be a positive integer, got {max_num_steps!r}")
        safety = _positive(kwargs.get("safety", 0.9), "safety")
        if safety > 1:
            raise ValueError(f"safety must be in (0, 1], got {safety}")
        ifactor = _positive(kwargs.get("ifactor", 10.0), "ifactor")
        if ifactor < 1:
            raise ValueError(f"ifactor (largest step growth) must be >= 1, got {ifactor}")
        dfactor = _positive(kwargs.get("dfactor", 0.2), "dfactor")
        if dfactor >= 1:
            raise ValueError(f"dfactor (largest step shrink) must be in (0, 1), got {dfactor}")
        pcoeff = kwargs.get("pcoeff", 0.0)
        icoeff = kwargs.get("icoeff", 1.0)
        for value, name in ((pcoeff, "pcoeff"), (icoeff, "icoeff")):
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        interpolation = kwargs.get("interpolation")
        if interpolation is None:
            interpolation = default_interpolation(tableau)
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be 'dense', 'linear' or 'land', got {interpolation!r}")
        return cls(
            method=tableau, rtol=rtol, atol=atol, norm=norm, step_size=step_size,
            grid_constructor=grid_constructor, first_step=first_step, min_step=min_step,
            max_step=max_step, max_num_steps=int(max_num_steps), safety=safety, ifactor=ifactor,
            dfactor=dfactor, pcoeff=float(pcoeff), icoeff=float(icoeff),
            step_t=_times(kwargs.get("step_t"), "step_t"), jump_t=_times(kwargs.get("jump_t"), "jump_t"),
            interpolation=interpolation, compile=compile_setting(kwargs.get("compile")),
        )

    def replace(self, **changes) -> "SolverOptions":
        return replace(self, **changes)

    def landing_on_outputs(self, times: Sequence[float]) -> "SolverOptions":
        """These options with every output time inside the interval added to ``step_t`` when
        ``interpolation == "land"``; unchanged otherwise. Landings are the one mechanism every
        gradient method already honours (replays and the backward solves land there too)."""
        if self.interpolation != "land" or len(times) < 3:
            return self
        inner = set(times[1:-1]) - set(self.step_t) - set(self.jump_t)
        return self.replace(step_t=self.step_t + tuple(sorted(inner))) if inner else self


#: The values of ``interpolation``.
INTERPOLATIONS = ("dense", "linear", "land")


def default_interpolation(tableau) -> str:
    """``"land"`` for adaptive implicit methods, ``"dense"`` otherwise.

    Why: an implicit method's long steps over stiff components leave its dense output
    (kvaerno5's order-4 continuous extension, kvaerno3's cubic Hermite) far outside the
    tolerance between step ends — Robertson's y2 at t = 1e4 came out 263 tolerances off with
    kvaerno5's (298 with cubic Hermite) at rtol 1e-6 while the step ends were within 3.
    Landing costs at most one extra step per output time, which is cheap for the few outputs
    stiff problems usually ask for.
    """
    return "land" if getattr(tableau, "implicit", False) and tableau.adaptive else "dense"


def _all_zero(value: Tolerance) -> bool:
    leaves = value if isinstance(value, (tuple, list)) else (value.values() if isinstance(value, dict) else [value])
    return all(bool((v == 0).all()) if isinstance(v, torch.Tensor) else v == 0 for v in leaves)


# The keyword options of a solve: every field of SolverOptions but the method (derived, so
# that a new field is an option everywhere at once: solve, solve_to_event, the gradient
# methods' backward options).
OPTION_NAMES = tuple(f.name for f in fields(SolverOptions) if f.name != "method")

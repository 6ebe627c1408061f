"""Step-size control by error: error norms, tolerances, and the PI rule.

:class:`PIController` is the rule an adaptive solve's steps are judged by; the loop
reaches it through :class:`~torchadjoint.step_size.AdaptiveSteps`, one implementation of
the loop's step-size controller protocol (:class:`~torchadjoint.step_size.StepSizeController`,
the fixed grid being the other). What ``AdaptiveSteps`` asks of the rule:

- ``limit_to_precision(dtype)``, once per solve;
- ``init(f, t0, y0, f0, direction, order) -> (h0, state)``: the signed first step;
- ``error_ratio(err, y0, y1) -> float``: the step's error against the tolerance (≤ 1 accepts);
- ``adapt(h, error_ratio, state, order) -> (accept, h_next, state)``: the decision.

``state`` is a float (the previous accepted error ratio). Step sizes and error ratios
live on the host as Python floats: the only host–device synchronisation per step is
reading the error ratio, which the accept/reject decision needs.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Callable, Optional, Tuple

import torch

from .errors import ToleranceWarning, user_stacklevel

Norm = Callable[[torch.Tensor], torch.Tensor]


def rtol_floor(dtype: torch.dtype) -> float:
    """The smallest meaningful relative tolerance in ``dtype``: its unit roundoff
    (half the spacing of floats at 1; 5.96e-8 in float32, 1.11e-16 in float64). Every
    stored state is rounded by that much, so a tighter rtol makes the controller chase
    rounding noise with ever smaller steps: millions of steps, no more accuracy."""
    return torch.finfo(dtype).eps / 2


def clamp_rtol(rtol, dtype: torch.dtype, where: str = ""):
    """``rtol`` (a float or a tensor) with every entry in (0, floor) raised to the
    :func:`rtol_floor` of ``dtype``, warning once (:class:`ToleranceWarning`) saying what
    was used. Zero stays zero (pure absolute control is the caller's choice)."""
    floor = rtol_floor(dtype)
    if isinstance(rtol, torch.Tensor):
        low = (rtol > 0) & (rtol < floor)
        if not bool(low.any()):
            return rtol
        smallest = float(rtol[low].min())
        rtol = torch.where(low, torch.full_like(rtol, floor), rtol)
    else:
        if not 0 < rtol < floor:
            return rtol
        smallest, rtol = float(rtol), floor
    name = str(dtype).replace("torch.", "")
    warnings.warn(
        f"rtol={smallest:.3g}{where} is below what {name} resolves (its unit roundoff, {floor:.3g}): the solver "
        f"would chase rounding noise with ever smaller steps. Using rtol={floor:.3g} instead"
        + ("." if dtype == torch.float64 else "; for tighter tolerances solve in float64."),
        ToleranceWarning,
        stacklevel=user_stacklevel(),
    )
    return rtol


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """Root-mean-square of a flat (n,) tensor: a 0-dim tensor."""
    return torch.linalg.vector_norm(x) / math.sqrt(x.numel())


def norm_value(value, name: str = "norm") -> torch.Tensor:
    """A user norm's result as a 0-dim tensor; anything but one number is refused with an
    error naming the norm (``name``: where it was given)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.reshape(())
    # Python and NumPy numbers, and one-element NumPy arrays.
    if (isinstance(value, numbers.Real) or getattr(value, "size", None) == 1) and not isinstance(value, bool):
        try:
            return torch.tensor(float(value.item() if hasattr(value, "item") else value))
        except (TypeError, ValueError):
            pass
    if isinstance(value, torch.Tensor):
        got = f"a tensor of shape {tuple(value.shape)}"
    else:
        got = "None" if value is None else f"a value of type {type(value).__name__}"
    raise TypeError(
        f"{name} returned {got}; an error norm must return one number (a 0-dim tensor or a float) "
        f"for the scaled error it is given, e.g. lambda x: x.abs().max()"
    )


class SemiNorm:
    """RMS norm over the first ``measured`` entries of a flat state only.

    Used by the adjoints' backward solves: the parameter adjoint never feeds back into the
    dynamics, so its error need not limit the step (Kidger, Chen & Lyons 2021).
    """

    def __init__(self, measured: int):
        self.measured = measured

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x[: self.measured])


def seminorm(measured: int) -> Norm:
    """The :class:`SemiNorm` over the first ``measured`` entries."""
    return SemiNorm(measured)


class PIController:
    """Proportional–integral step-size controller.

    ``h_next = h · clip(safety · r_n^(-(icoeff + pcoeff)/k) · r_(n-1)^(pcoeff/k), dfactor, ifactor)``
    with ``r`` the error ratio (≤ 1 accepts) and ``k`` the method's order. ``pcoeff = 0`` is
    integral-only control (the classical controller, the default).

    Args:
        rtol, atol: relative/absolute tolerances; floats or flat (n,) tensors.
        norm: maps the scaled error, a flat (n,) tensor, to a 0-dim tensor.
        safety, ifactor, dfactor: safety factor and growth/shrink limits per step.
        pcoeff, icoeff: PI coefficients.
        first_step: initial step size (absolute value); ``None`` selects it automatically.
        min_step, max_step: bounds on ``|h|``. A step at ``min_step`` is accepted whatever its error.
    """

    def __init__(
        self,
        rtol,
        atol,
        norm: Norm = rms_norm,
        *,
        safety: float = 0.9,
        ifactor: float = 10.0,
        dfactor: float = 0.2,
        pcoeff: float = 0.0,
        icoeff: float = 1.0,
        first_step: Optional[float] = None,
        min_step: float = 0.0,
        max_step: float = math.inf,
    ):
        self.rtol = rtol
        self.atol = atol
        self.norm = norm
        self.safety = safety
        self.ifactor = ifactor
        self.dfactor = dfactor
        self.pcoeff = pcoeff
        self.icoeff = icoeff
        self.first_step = first_step
        self.min_step = min_step
        self.max_step = max_step
        self._precision: Optional[torch.dtype] = None
        # The built-in norms take a shorter path in error_ratio (and inside a compiled step,
        # compiled.py): how many leading entries the RMS is over (-1: all); None for a user's norm.
        if norm is rms_norm:
            self.rms_entries: Optional[int] = -1
        elif isinstance(norm, SemiNorm):
            self.rms_entries = norm.measured
        else:
            self.rms_entries = None

    def limit_to_precision(self, dtype: torch.dtype) -> None:
        """Raise an rtol below ``dtype``'s resolution to it, with a warning (once per
        controller and dtype; see :func:`clamp_rtol`). Called by the loop before a solve."""
        if self._precision != dtype:
            self._precision = dtype
            self.rtol = clamp_rtol(self.rtol, dtype)

    def scale(self, y0: torch.Tensor, y1: torch.Tensor) -> torch.Tensor:
        """Per-component tolerance ``atol + rtol · max(|y0|, |y1|)``, shape (n,)."""
        return torch.maximum(y0.abs(), y1.abs()).mul_(self.rtol).add_(self.atol)

    def error_ratio(self, err: torch.Tensor, y0: torch.Tensor, y1: torch.Tensor) -> float:
        """Norm of the error estimate relative to the tolerance, on the host (the one
        host–device synchronisation of a step): ≤ 1 accepts. Tensors (n,), no graph."""
        scaled = err / self.scale(y0, y1)
        if self.rms_entries is None:
            return float(self.norm(scaled))
        # The RMS (or seminorm) with the division by sqrt(entries) done on the host: every
        # tensor operation costs dispatch time, and this runs once per step.
        if 0 <= self.rms_entries < scaled.shape[0]:
            scaled = scaled[: self.rms_entries]
        return float(torch.linalg.vector_norm(scaled)) / math.sqrt(max(scaled.shape[0], 1))

    def clamp(self, h: float) -> float:
        """Bound ``|h|`` by ``[min_step, max_step]``, keeping its sign."""
        mag = min(max(abs(h), self.min_step), self.max_step)
        return math.copysign(mag, h)

    def init(self, f, t0: float, y0: torch.Tensor, f0: torch.Tensor, direction: float, order: int) -> Tuple[float, float]:
        """First step (signed by ``direction``) and the initial controller state.

        Automatic selection follows Hairer, Nørsett & Wanner, *Solving ODEs I*, §II.4:
        one extra evaluation of ``f``.
        """
        if self.first_step is not None:
            return self.clamp(direction * self.first_step), 1.0
        y0, f0 = y0.detach(), f0.detach()
        scale = self.atol + self.rtol * y0.abs()
        d0 = float(self.norm(y0 / scale))
        d1 = float(self.norm(f0 / scale))
        h0 = 1e-6 if (d0 < 1e-5 or d1 < 1e-5) else 0.01 * d0 / d1
        if not math.isfinite(h0):
            h0 = 1e-6
        y1 = y0 + direction * h0 * f0
        f1 = f(t0 + direction * h0, y1).detach()
        d2 = float(self.norm((f1 - f0) / scale)) / h0
        dmax = max(d1, d2)
        if not math.isfinite(dmax):
            h1 = h0 * 1e-3
        elif dmax <= 1e-15:
            h1 = max(1e-6, h0 * 1e-3)
        else:
            h1 = (0.01 / dmax) ** (1.0 / (order + 1))
        return self.clamp(direction * min(100 * h0, h1)), 1.0

    def adapt(self, h: float, error_ratio: float, state: float, order: int) -> Tuple[bool, float, float]:
        """Accept or reject a step of size ``h`` with the given error ratio.

        Returns ``(accept, h_next, state)``. A non-finite ratio (NaN/inf in the step) rejects
        with the largest allowed shrink.
        """
        if not math.isfinite(error_ratio):
            return False, self.clamp(h * self.dfactor), state
        accept = error_ratio <= 1.0 or abs(h) <= self.min_step
        if error_ratio == 0.0:
            factor = self.ifactor
        else:
            k = float(order)
            factor = self.safety * error_ratio ** (-(self.icoeff + self.pcoeff) / k)
            if self.pcoeff:
                factor *= max(state, 1e-10) ** (self.pcoeff / k)
            factor = min(self.ifactor, max(self.dfactor, factor))
        if not accept:
            factor = min(factor, 1.0)
        return accept, self.clamp(h * factor), (error_ratio if accept else state)

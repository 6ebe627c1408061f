"""The backward solve's settings, shared by the continuous adjoints.

:class:`~torchadjoint.Backsolve`, :class:`~torchadjoint.Checkpointed` and
:class:`~torchadjoint.Quadrature` each integrate the adjoint backwards with a solve of
their own. It is configured like a forward solve, every setting defaulting to the
forward's: ``rtol``, ``atol``, ``method`` and ``norm`` are arguments of their own, the
rest solver ``options`` (a dict). What differs between the methods is declared on each
class (see :class:`ContinuousAdjoint`); the validation, the backward
:class:`~torchadjoint.options.SolverOptions`, the error norm and the step-size controller
are built here, once.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import torch

from ..controller import norm_value, rms_norm, seminorm
from ..options import OPTION_NAMES, SolverOptions, resolve_method
from ..problem import Problem, make_controller
from .base import GradientMethod, backward_tolerance

NormChoice = Union[str, Callable]

# The step-size controller's options: every backward solve takes them.
CONTROLLER_OPTION_NAMES = (
    "first_step", "min_step", "max_step", "max_num_steps", "safety", "ifactor", "dfactor", "pcoeff", "icoeff",
)
# Every solver option but those that are arguments of their own (``method`` is no option).
SOLVER_OPTION_NAMES = tuple(name for name in OPTION_NAMES if name not in ("rtol", "atol", "norm"))


class ContinuousAdjoint(GradientMethod):
    """A gradient method whose backward pass is a solve of the adjoint equations
    (:mod:`torchadjoint.adjoint.vjp`). Subclasses declare:

    - ``norms``: the norm names accepted besides a callable; the first is the default.
      ``"seminorm"`` measures the first ``seminorm_parts`` parts of the backward state,
      ``"full"``/``"rms"`` all of it;
    - ``parts``: the names of the backward state's parts a callable norm receives (as flat
      tensors of the scaled error, in this order), for error messages;
    - ``option_names``: the solver options the backward solve takes;
    - ``own_grid``: whether a fixed-step backward method steps on a grid of its own
      (``step_size``/``grid_constructor``, the forward's by default) or on the forward's
      step points (it needs neither then).
    """

    norms: Tuple[str, ...] = ("seminorm", "full")
    parts: Tuple[str, ...] = ()
    seminorm_parts = 1
    option_names: Tuple[str, ...] = SOLVER_OPTION_NAMES
    own_grid = True

    def _set_backward(self, rtol, atol, method, norm: NormChoice, options: Optional[dict]) -> None:
        """Validate and keep the backward solve's settings (errors name the argument)."""
        owner = type(self).__name__
        if method is not None:
            resolve_method(method, f"{owner}(method=...)")
        if not (norm in self.norms or callable(norm)):
            names = " or ".join(repr(x) for x in self.norms)
            raise ValueError(f"{owner}(norm=...) must be {names} or a callable ({', '.join(self.parts)}) -> scalar, "
                             f"got {norm!r}")
        if options is not None and not isinstance(options, dict):
            raise TypeError(f"{owner}(options=...) must be a dict of solver options, got {type(options).__name__}")
        options = dict(options or {})
        own = sorted(set(options) & {"rtol", "atol", "norm", "method"})
        if own:
            raise ValueError(f"{owner}(options=...) got {own}; pass them as {owner}({own[0]}=...) instead")
        unknown = sorted(set(options) - set(self.option_names))
        if unknown:
            grid = "" if self.own_grid else "; a fixed-step backward method steps on the forward's step points"
            raise ValueError(f"{owner}(options=...) got unknown option(s) {unknown}; the backward solve takes "
                             f"{list(self.option_names)}{grid}")
        self.rtol, self.atol, self.method, self.norm, self.options = rtol, atol, method, norm, options
        if rtol is not None or atol is not None or options:
            # Validated now, not at the first backward pass (the method stands in for any).
            fixed = "step_size" in options or "grid_constructor" in options
            SolverOptions.build(method="rk4" if fixed else "dopri5", **self._overrides())

    def _overrides(self) -> dict:
        fields = dict(self.options)
        if self.rtol is not None:
            fields["rtol"] = self.rtol
        if self.atol is not None:
            fields["atol"] = self.atol
        return fields

    def backward_options(self, forward: SolverOptions) -> SolverOptions:
        """The forward's options overridden by this method's backward settings (validated)."""
        tableau = resolve_method(self.method or forward.method, f"{type(self).__name__}(method=...)")
        fields = dict(
            rtol=forward.rtol, atol=forward.atol,
            max_num_steps=forward.max_num_steps, safety=forward.safety, ifactor=forward.ifactor,
            dfactor=forward.dfactor, pcoeff=forward.pcoeff, icoeff=forward.icoeff,
            min_step=forward.min_step, max_step=forward.max_step,
            step_t=forward.step_t, jump_t=forward.jump_t,
            compile=forward.compile,  # read by the backward pass (torchadjoint.compiled.compile_dynamics)
        )
        if not tableau.adaptive and self.own_grid:
            fields.update(step_size=forward.step_size, grid_constructor=forward.grid_constructor)
        fields.update(self._overrides())
        if fields.get("step_size") is not None:
            fields.pop("grid_constructor", None)
        if tableau.adaptive or self.own_grid:
            return SolverOptions.build(method=tableau, **fields)
        # Stepping on the forward's points, a fixed-step method needs no step_size: validate
        # the rest as for an adaptive one, then put the method in.
        return SolverOptions.build(method="dopri5", **fields).replace(method=tableau)

    def backward_controller(self, problem: Problem, backward: SolverOptions, scale: float, norm: NormChoice,
                            sizes: Sequence[int]):
        """The backward solve's step-size controller (None for a fixed-step method) for a
        state of parts ``sizes`` (``[n, n, p]``: ``[y, a_y, a_θ]``; ``[n, p]``: ``[a_y, a_θ]``;
        a ``p`` of 0 for ``a_θ`` outside the state; ``[n, n]``: ``[y, a_y]``).

        Tolerances: ``y`` keeps the backward ``rtol``/``atol``; the adjoint's ``atol`` is
        multiplied by ``scale``, the size of the incoming gradient, so that ``L → cL``
        changes no step (:func:`~torchadjoint.adjoint.base.adjoint_scale`)."""
        with_y = self.parts[0] == "y"
        p = sizes[-1] if self.parts[-1] == "a_θ" else 0
        return make_controller(
            problem, backward,
            norm=self.error_norm(norm, sizes),
            rtol=backward_tolerance(problem, backward.rtol, "rtol", with_y=with_y, p=p),
            atol=backward_tolerance(problem, backward.atol, "atol", with_y=with_y, p=p, scale=scale),
        )

    def error_norm(self, choice: NormChoice, sizes: Sequence[int]) -> Callable[[torch.Tensor], torch.Tensor]:
        """The norm of the scaled error of a backward state with parts ``sizes``."""
        if choice == "seminorm":
            return seminorm(sum(sizes[: self.seminorm_parts]))
        if isinstance(choice, str):  # "full", "rms": every part
            return rms_norm
        bounds, start = [], 0
        for size in sizes:
            bounds.append((start, start + size))
            start += size
        name = f"{type(self).__name__}(norm=...)"

        def user_norm(x: torch.Tensor) -> torch.Tensor:
            return norm_value(choice(tuple(x[a:b] for a, b in bounds)), name)

        return user_norm

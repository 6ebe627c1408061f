"""Backsolve: the continuous adjoint with ``y`` re-solved backwards beside the adjoint.

Forward: one solve without a graph; only the outputs at ``t`` are kept. Backward: **one**
solve of ``z = [y, a_y, a_θ]`` from the last output time to the first. It lands on every
output time whose incoming gradient is non-zero, adds the jump ``a_y += ∂L/∂y(t_i)`` and
resets ``y`` to the value the forward pass stored there, and carries its step size on (no
restart, no new initial-step selection per interval). Memory does not depend on the
number of steps.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Optional, Union

import torch

from ..controller import rms_norm, seminorm
from ..integrate import Landing, integrate
from ..options import SolverOptions, resolve_method
from ..problem import Problem, flat_tolerance, make_controller, make_flat_func, make_grid, solve_flat
from .base import GradientMethod, refuse_double_backward, split_like
from .vjp import augmented_dynamics

NormChoice = Union[str, Callable]


class ReconstructionWarning(UserWarning):
    """The backward re-solve of ``y`` drifted far from the forward trajectory."""


class Backsolve(GradientMethod):
    """Continuous adjoint, re-solving ``y`` backwards in time (O(1) memory in steps).

    Args:
        rtol, atol: tolerances of the backward solve (default: the forward's).
        method: the backward solver (default: the forward's).
        norm: ``"seminorm"`` (default: error control on ``y`` and ``a_y`` only, since
            ``a_θ`` never feeds back), ``"full"``, or a callable receiving the scaled
            errors ``(y, a_y, a_θ)`` as flat tensors and returning a scalar tensor.
        options: further backward solver options (``first_step``, ``max_num_steps``,
            ``safety``, ``step_size`` for fixed-step methods, ...).
        reconstruction_warning: warn when the re-solved ``y`` at an output time differs
            from the forward's by more than this many times the tolerance (RMS-scaled);
            ``None`` silences the check.
    """

    name = "backsolve"

    def __init__(
        self,
        rtol=None,
        atol=None,
        method: Optional[str] = None,
        norm: NormChoice = "seminorm",
        options: Optional[dict] = None,
        reconstruction_warning: Optional[float] = 100.0,
    ):
        if method is not None:
            resolve_method(method, "Backsolve(method=...)")
        if not (norm in ("seminorm", "full") or callable(norm)):
            raise ValueError(f"Backsolve(norm=...) must be 'seminorm', 'full' or a callable, got {norm!r}")
        if options is not None and not isinstance(options, dict):
            raise TypeError(f"Backsolve(options=...) must be a dict of solver options, got {type(options).__name__}")
        if reconstruction_warning is not None and not reconstruction_warning > 0:
            raise ValueError(f"Backsolve(reconstruction_warning=...) must be positive or None, got {reconstruction_warning!r}")
        self.rtol, self.atol, self.method, self.norm = rtol, atol, method, norm
        self.options = dict(options or {})
        self.reconstruction_warning = reconstruction_warning

    def __repr__(self) -> str:
        return f"Backsolve(method={self.method!r}, norm={self.norm!r})"

    def backward_options(self, forward: SolverOptions) -> SolverOptions:
        """Forward options overridden by this method's backward settings (validated)."""
        fields = dict(
            method=self.method or forward.method,
            rtol=forward.rtol if self.rtol is None else self.rtol,
            atol=forward.atol if self.atol is None else self.atol,
            max_num_steps=forward.max_num_steps, safety=forward.safety, ifactor=forward.ifactor,
            dfactor=forward.dfactor, pcoeff=forward.pcoeff, icoeff=forward.icoeff,
            min_step=forward.min_step, max_step=forward.max_step,
        )
        if not resolve_method(fields["method"]).adaptive:
            fields["step_size"] = forward.step_size
        fields.update(self.options)
        return SolverOptions.build(**fields)

    def run(self, problem: Problem, options: SolverOptions, y0: torch.Tensor, stats: dict) -> torch.Tensor:
        backward = self.backward_options(options)
        return _BacksolveFunction.apply(self, problem, options, backward, stats, y0, *problem.params)


def augmented_tolerance(problem: Problem, value, name: str, n: int, p: int):
    """Tolerance for ``[y, a_y, a_θ]``: y's for both y and a_y; its smallest for a_θ."""
    tol = flat_tolerance(problem, value, name)
    if isinstance(tol, float):
        return tol
    return torch.cat([tol, tol, tol.min().expand(p)])


def augmented_norm(choice: NormChoice, n: int, p: int):
    if choice == "seminorm":
        return seminorm(2 * n)
    if choice == "full":
        return rms_norm

    def user_norm(x: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(choice((x[:n], x[n : 2 * n], x[2 * n :])))

    return user_norm


class _BacksolveFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, method: Backsolve, problem: Problem, options, backward, stats, y0, *params):
        with torch.no_grad():
            result = solve_flat(problem, options, y0)
        stats["forward"] = result.stats
        ctx.method, ctx.problem, ctx.forward_options, ctx.backward, ctx.stats = method, problem, options, backward, stats
        ctx.save_for_backward(result.ys)
        return result.ys

    @staticmethod
    def backward(ctx, grad_ys):
        if torch.is_grad_enabled():
            refuse_double_backward("backsolve")
        (ys,) = ctx.saved_tensors
        problem, method, options = ctx.problem, ctx.method, ctx.backward
        params = problem.params
        times = problem.times
        n, p = ys.shape[1], sum(x.numel() for x in params)
        if len(times) == 1:
            ctx.stats["backward"] = dict(nfe=0, steps=0, accepted=0, rejected=0, reconstruction_error=0.0)
            return (None,) * 5 + (grad_ys[0],) + tuple(torch.zeros_like(x) for x in params)

        flat_func = make_flat_func(problem)
        dynamics = augmented_dynamics(flat_func, n, params)
        controller = make_controller(
            problem, options,
            norm=augmented_norm(method.norm, n, p),
            rtol=augmented_tolerance(problem, options.rtol, "rtol", n, p),
            atol=augmented_tolerance(problem, options.atol, "atol", n, p),
        )
        # The scale to judge the re-solved y by: the forward tolerances.
        rtol_y = flat_tolerance(problem, ctx.forward_options.rtol, "rtol")
        atol_y = flat_tolerance(problem, ctx.forward_options.atol, "atol")
        drift = [0.0]

        def make_jump(i: int):
            def jump(t: float, z: torch.Tensor) -> torch.Tensor:
                y_forward = ys[i]
                scaled = (z[:n] - y_forward) / (atol_y + rtol_y * y_forward.abs())
                drift.append(scaled)
                z = z.clone()
                z[:n] = y_forward  # the forward pass knew y here exactly
                z[n : 2 * n] += grad_ys[i]
                return z

            return jump

        looked_at = grad_ys.any(dim=1).tolist()
        landings = [Landing(times[i], [make_jump(i)]) for i in range(len(times) - 1) if looked_at[i]]
        # Land on t_0 in any case: the re-solved y there is the reconstruction check.
        if not looked_at[0]:
            landings.append(Landing(times[0], [make_jump(0)]))
        z0 = torch.cat([ys[-1], grad_ys[-1], ys.new_zeros(p)])
        result = integrate(
            dynamics, z0, times[-1], times[0], (), options.method,
            controller=controller,
            grid=make_grid(problem, options, ys[-1], times[-1], times[0]),
            landings=landings,
            max_num_steps=options.max_num_steps,
            label="backward",
        )
        z = result.y_end
        errors = [float(rms_norm(d)) for d in drift[1:]]
        reconstruction = max(errors) if errors else 0.0
        ctx.stats["backward"] = dict(result.stats, reconstruction_error=reconstruction)
        threshold = method.reconstruction_warning
        if threshold is not None and not reconstruction <= threshold:
            warnings.warn(
                f"backsolve re-computed y(t) with an error of {reconstruction:.3g}× the tolerance "
                f"(threshold {threshold:g}): the gradient is not to be trusted. The dynamics are probably "
                f"contracting forwards (so expanding backwards); use gradient=Checkpointed() or Direct(), "
                f"or tighten rtol/atol. Silence with Backsolve(reconstruction_warning=None).",
                ReconstructionWarning,
                stacklevel=2,
            )
        grad_y0 = z[n : 2 * n]
        grad_params = split_like(z[2 * n :], params) if params else ()
        return (None,) * 5 + (grad_y0,) + tuple(grad_params)

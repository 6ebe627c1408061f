"""Backsolve: the continuous adjoint with ``y`` re-solved backwards beside the adjoint.

Forward: one solve without a graph; only the outputs at ``t`` are kept (N, n).

Backward: **one** solve of ``z = [y, a_y, a_θ]`` from the last output time whose incoming
gradient is non-zero down to the first output time. It lands on every output time whose
incoming gradient ``g_i = ∂L/∂y(t_i)`` is non-zero, adds the jump ``a_y += g_i`` there and
carries its step size and controller state on: no restart, no new initial-step selection
per interval. Memory does not depend on the number of steps.

The jump costs no evaluation of ``f``: ``F`` is linear in ``a_y``, so the derivative after
the jump is the last stage (FSAL) plus one vector-Jacobian product with ``g_i`` through
that stage's kept graph (see :class:`~torchadjoint.adjoint.vjp.AugmentedDynamics`). When
output times, not accuracy, force the backward steps (a long, densely observed time
series) every step ends on a jump, so this saves one ``f`` call in ``s``.

At those output times the forward pass knew ``y`` exactly. The re-solved ``y`` is compared
with it there (the reconstruction check) and replaced by it only when it has drifted past
the tolerance (``reset_threshold``): a reset moves the state, so it costs the call of ``f``
the jump otherwise saves, and resetting at every output time (as torchdiffeq does) would
spend it on drifts far below the tolerance.

Under the seminorm (the default) ``a_θ`` is accumulated beside the solve with the step's
own Runge–Kutta weights instead of being carried through it: the same numbers, without
moving ``p`` values through every stage combination and error estimate.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Union

import torch

from ..errors import SolveError
from ..compiled import compile_dynamics
from ..controller import norm_value, rms_norm, seminorm
from ..integrate import Landing, integrate
from ..tableaux.base import ButcherTableau
from ..options import OPTION_NAMES, SolverOptions, resolve_method
from ..problem import Problem, flat_tolerance, make_controller, make_flat_func, make_grid, solve_flat
from .base import (GradientMethod, adjoint_scale, backward_tolerance, forward_stats, parameter_tolerance,
                   refuse_double_backward, split_like)
from .trust import (FIXED_STEP_RTOL, ReconstructionWarning, check_threshold, explain_backward_failure, judge_reconstruction,
                    parameter_error_too_large, refuse_nonfinite_gradient, seminorm_fallback_stats)
from .vjp import AugmentedDynamics, DeclaredTensors, checked_first_stage

NormChoice = Union[str, Callable]

_NO_OPTIONS = ("rtol", "atol", "method", "norm")


class Backsolve(GradientMethod):
    """Continuous adjoint, re-solving ``y`` backwards in time (O(1) memory in steps).

    Args:
        rtol, atol: tolerances of the backward solve (default: the forward's). They apply
            to ``y`` and ``a_y`` alike (a float, or one value per state tensor as in solve).
        method: the backward solver (default: the forward's).
        norm: ``"seminorm"`` (default: error control on ``y`` and ``a_y`` only, since
            ``a_θ`` never feeds back into the dynamics), ``"full"`` (RMS over the whole
            augmented state), or a callable ``norm((y, a_y, a_θ)) -> scalar tensor`` on
            the scaled errors as flat tensors (lengths n, n, p).
        options: further backward solver options (``first_step``, ``max_num_steps``,
            ``safety``, ``ifactor``, ``dfactor``, ``pcoeff``, ``icoeff``, ``min_step``,
            ``max_step``; ``step_size`` for a fixed-step backward method).
        reconstruction_warning: warn (:class:`ReconstructionWarning`) when the re-solved
            ``y`` at an output time the backward solve visits (``t_0`` always) differs from
            the forward's by more than this many times the backward tolerance
            (``RMS((y_back - y_fwd) / (atol + rtol·|y_fwd|))``; the backward ``rtol``,
            ``atol`` default to the forward's; a fixed-step method is judged with
            ``rtol = 1e-4``). ``None`` silences the warning. A running cost's integral is
            not judged: it never feeds back into the dynamics.
        reconstruction_error: raise :class:`~torchadjoint.SolveError` (naming Checkpointed
            and Direct) when the drift is this many times ``y`` itself
            (``‖y_back - y_fwd‖ / ‖atol + max_i |y(t_i)|‖``, default 1: no correct digit left),
            or when the drift or the gradient is non-finite. ``None``: warn instead and
            return the number (see :mod:`torchadjoint.adjoint.trust`).
        reset_threshold: at an output time the backward solve lands on, replace the
            re-solved ``y`` by the forward's stored value when they differ by more than this
            many times the backward tolerance (same measure as above). A reset costs one
            evaluation of ``f`` there (the state moved), so by default (1.0) ``y`` is kept
            within tolerance of the forward trajectory at the price of few resets. ``0``
            resets at every landing (as torchdiffeq does); ``None`` never resets.

    After ``backward()``, ``solution.stats["backward"]`` holds ``nfe`` (calls of ``f``),
    ``nvjp`` (``torch.autograd.grad`` calls), ``steps``, ``accepted``, ``rejected``,
    ``resets`` (see ``reset_threshold``), ``reconstruction_error`` (the drift of the
    re-solved ``y(t_0)`` in multiples of the backward tolerance, the measure above) and
    ``reconstruction_error_max`` (largest over the output times visited, before any reset
    there; the warning fires when it exceeds ``reconstruction_warning``, default 100),
    ``parameter_error`` (under the seminorm: a_θ's accumulated error estimate per step in
    tolerance units) and ``seminorm_fallback`` (True when that exceeded
    ``trust.PARAMETER_ERROR_LIMIT`` and the pass was redone under the full norm; ``nfe`` and
    ``nvjp`` then count both passes, ``seminorm_nfe`` the first).
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
        reset_threshold: Optional[float] = 1.0,
        reconstruction_error: Optional[float] = 1.0,
    ):
        if method is not None:
            resolve_method(method, "Backsolve(method=...)")
        if not (norm in ("seminorm", "full") or callable(norm)):
            raise ValueError(f"Backsolve(norm=...) must be 'seminorm', 'full' or a callable, got {norm!r}")
        if options is not None and not isinstance(options, dict):
            raise TypeError(f"Backsolve(options=...) must be a dict of solver options, got {type(options).__name__}")
        clash = sorted(set(options or {}) & set(_NO_OPTIONS))
        if clash:
            raise ValueError(f"Backsolve(options=...) got {clash}; pass them as Backsolve({clash[0]}=...) instead")
        if reconstruction_warning is not None and not (
            isinstance(reconstruction_warning, (int, float)) and reconstruction_warning > 0
        ):
            raise ValueError(f"Backsolve(reconstruction_warning=...) must be a positive number or None, got {reconstruction_warning!r}")
        if reset_threshold is not None and not (
            isinstance(reset_threshold, (int, float)) and not isinstance(reset_threshold, bool) and reset_threshold >= 0
        ):
            raise ValueError(f"Backsolve(reset_threshold=...) must be a non-negative number or None, got {reset_threshold!r}")
        self.rtol, self.atol, self.method, self.norm = rtol, atol, method, norm
        self.options = dict(options or {})
        self.reconstruction_warning = reconstruction_warning
        self.reconstruction_error = check_threshold(reconstruction_error, "Backsolve", "reconstruction_error")
        self.reset_threshold = None if reset_threshold is None else float(reset_threshold)
        unknown = sorted(set(self.options) - set(OPTION_NAMES))
        if unknown:
            raise ValueError(f"Backsolve(options=...) got unknown option(s) {unknown}; valid ones are {sorted(set(OPTION_NAMES) - set(_NO_OPTIONS))}")
        if self.rtol is not None or self.atol is not None or self.options:
            # Validate now, not at the first backward pass.
            fixed = "step_size" in self.options or "grid_constructor" in self.options
            SolverOptions.build(method=method or ("rk4" if fixed else "dopri5"), **self._overrides())

    def __repr__(self) -> str:
        return f"Backsolve(method={self.method!r}, norm={self.norm!r})"

    def reset_measure(self, drift_norm2: torch.Tensor, size: int) -> float:
        """The RMS scaled drift at a landing, from its 2-norm over ``size`` entries: what is
        compared with ``reset_threshold``. Data-parallel training replaces it (on a copy) by
        the RMS over every process's share of the batch, so all processes decide alike."""
        return float(drift_norm2) / math.sqrt(size)

    def _overrides(self) -> dict:
        fields = dict(self.options)
        if self.rtol is not None:
            fields["rtol"] = self.rtol
        if self.atol is not None:
            fields["atol"] = self.atol
        return fields

    def backward_options(self, forward: SolverOptions) -> SolverOptions:
        """Forward options overridden by this method's backward settings (validated)."""
        fields = dict(
            method=self.method or forward.method,
            rtol=forward.rtol, atol=forward.atol,
            max_num_steps=forward.max_num_steps, safety=forward.safety, ifactor=forward.ifactor,
            dfactor=forward.dfactor, pcoeff=forward.pcoeff, icoeff=forward.icoeff,
            min_step=forward.min_step, max_step=forward.max_step, compile=forward.compile,
        )
        if not resolve_method(fields["method"]).adaptive:
            fields["step_size"] = forward.step_size
            fields["grid_constructor"] = forward.grid_constructor
        fields.update(self._overrides())
        if fields.get("step_size") is not None:
            fields.pop("grid_constructor", None)
        return SolverOptions.build(**fields)

    def run(self, problem: Problem, options: SolverOptions, y0: torch.Tensor, stats: dict) -> torch.Tensor:
        backward = self.backward_options(options)
        return _BacksolveFunction.apply(self, problem, options, backward, stats, y0, *problem.params)


def augmented_norm(choice: NormChoice, n: int, p: int):
    if choice == "seminorm":
        return seminorm(2 * n)
    if choice == "full":
        return rms_norm

    def user_norm(x: torch.Tensor) -> torch.Tensor:
        return norm_value(choice((x[:n], x[n : 2 * n], x[2 * n :])), "Backsolve(norm=...)")

    return user_norm


def _zero_stats() -> dict:
    return dict(nfe=0, nvjp=0, steps=0, accepted=0, rejected=0, resets=0, reconstruction_error=0.0, reconstruction_error_max=0.0)


class _BacksolveFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, method: Backsolve, problem: Problem, options, backward, stats, y0, *params):
        flat_func = make_flat_func(problem)
        # Refuses f closing over undeclared tensors; the evaluation is the first stage.
        f0 = checked_first_stage(flat_func, problem, y0, "backsolve")
        with torch.no_grad():
            result = solve_flat(problem, options, y0.detach(), func=flat_func, f0=f0)
        stats["forward"] = forward_stats(result.stats, f0)
        ctx.method, ctx.problem, ctx.forward_options, ctx.backward, ctx.stats = method, problem, options, backward, stats
        ctx.flat_func = flat_func
        ctx.save_for_backward(result.ys)
        return result.ys

    @staticmethod
    def backward(ctx, grad_ys):
        if torch.is_grad_enabled():
            refuse_double_backward("backsolve")
        grads, parameter_error = _BacksolveFunction.solve_backward(ctx, grad_ys, ctx.method.norm)
        ctx.stats["backward"]["seminorm_fallback"] = False
        if not parameter_error_too_large(parameter_error):
            return grads
        # The seminorm's steps left a_θ under-resolved (a_y smooth, ∂f/∂θ fast in t): redo
        # the pass with a_θ under error control (trust.ParameterErrorEstimate).
        first = ctx.stats["backward"]
        grads, _ = _BacksolveFunction.solve_backward(ctx, grad_ys, "full")
        ctx.stats["backward"] = seminorm_fallback_stats(first, ctx.stats["backward"])
        return grads

    @staticmethod
    def solve_backward(ctx, grad_ys, norm: NormChoice):
        """One backward pass under ``norm``: (the gradients autograd wants, the seminorm's
        a_θ error estimate in tolerance units: 0 when not measured)."""
        (ys,) = ctx.saved_tensors
        problem, method, options = ctx.problem, ctx.method, ctx.backward
        times, params = problem.times, problem.params
        # Gradients only for the parameters that want one (saves the a_θ work otherwise).
        wanted = ctx.needs_input_grad[6:]
        active = tuple(x for x, w in zip(params, wanted) if w)
        n, p = ys.shape[1], sum(x.numel() for x in active)
        looked_at = grad_ys.any(dim=1).tolist()
        # The adjoint is zero after the last output the loss looks at: start there.
        k = max((i for i in range(1, len(times)) if looked_at[i]), default=0)
        if k == 0:
            ctx.stats["backward"] = _zero_stats()
            return (None,) * 5 + (grad_ys[0],) + tuple(torch.zeros_like(x) if w else None for x, w in zip(params, wanted)), 0.0

        # Under the seminorm a_θ is not in the integrated state (see AugmentedDynamics),
        # except with an implicit or multistep method, whose evaluations of f are no
        # Runge–Kutta stages to follow.
        outside = norm == "seminorm" and isinstance(options.method, ButcherTableau)
        dynamics = AugmentedDynamics(
            ctx.flat_func, n, active,
            keep_graph_at=() if method.reset_threshold == 0 else [times[i] for i in range(1, k) if looked_at[i]],
            tableau=options.method if outside else None,
            declared=DeclaredTensors(params, "backsolve"),
        )
        compile_stats = compile_dynamics(dynamics, problem, options)
        p = 0 if outside else p
        scale = adjoint_scale(grad_ys, norm)
        controller = make_controller(
            problem, options,
            norm=augmented_norm(norm, n, p),
            rtol=backward_tolerance(problem, options.rtol, "rtol", with_y=True, p=p),
            # The adjoint's atol scales with it: L -> cL changes no step (see adjoint_scale).
            atol=backward_tolerance(problem, options.atol, "atol", with_y=True, p=p, scale=scale),
        )
        # The scale to judge the re-solved y by: the tolerances it was solved with.
        forward = ctx.forward_options
        rtol_y = flat_tolerance(problem, options.rtol, "rtol")
        atol_y = flat_tolerance(problem, options.atol, "atol")
        drift: List[torch.Tensor] = []  # 2-norms of the scaled drift; RMS = 2-norm / sqrt(m)
        relative: List[torch.Tensor] = []  # ‖drift‖ / ‖atol + max_i |y(t_i)|‖
        visited: List[float] = []
        resets = [0]
        threshold_reset = method.reset_threshold
        m = problem.checked_size()  # the reconstruction check's entries (a running cost's integral left out)
        root_m = math.sqrt(m)
        # Per-entry tolerances (tensors) over the checked entries only.
        rtol_m, atol_m = (x if isinstance(x, float) else x[:m] for x in (rtol_y, atol_y))
        if not options.method.adaptive:  # no tolerance: judged on a relative scale (trust.py)
            rtol_m = FIXED_STEP_RTOL
        y_size = torch.linalg.vector_norm(atol_m + ys[:, :m].abs().amax(0))  # one (m,) reduction per backward
        # Per output time, made at its landing only (nothing of size N × n beyond ys and
        # grad_ys themselves: the backward pass's memory must not grow with N either).
        y_rows, g_rows = ys.unbind(0), grad_ys.unbind(0)
        checked_rows = y_rows if m == n else ys[:, :m].unbind(0)

        def drift_norm(i: int, y_back: torch.Tensor) -> torch.Tensor:
            """2-norm of (re-solved − stored y) at times[i] over the tolerance scale there;
            ``y_back`` the re-solved checked entries (m,)."""
            y_forward = checked_rows[i]
            difference = y_back - y_forward
            visited.append(times[i])
            # ‖Δy‖ / ‖atol + max_i |y(t_i)|‖: against the size y reaches over the outputs, so a
            # state passing near 0 at one output time does not read as "every digit lost".
            relative.append(torch.linalg.vector_norm(difference) / y_size)
            return torch.linalg.vector_norm(difference / (atol_m + rtol_m * y_forward.abs()))

        def make_jump(i: int):
            def jump(t: float, z: torch.Tensor):
                error = drift_norm(i, z[:m])
                drift.append(error)
                dz = torch.nn.functional.pad(g_rows[i], (n, p))  # [0, g_i, 0]: a_y += g_i
                # One host sync per landing, only when the reset decision needs the value.
                if threshold_reset is not None and (threshold_reset == 0 or method.reset_measure(error, m) > threshold_reset):
                    # The forward pass knew y here; f must be re-evaluated at the moved state.
                    resets[0] += 1
                    dynamics.forget()
                    z = z + dz
                    z[:n] = y_rows[i]
                    return z
                return dynamics.jump(t, z, dz)

            return jump

        landings = [Landing(times[i], [make_jump(i)]) for i in range(1, k) if looked_at[i]]
        # The backward solve must respect the forward's own landings: kinks (step_t) and
        # discontinuities of f (jump_t), where the FSAL stage belongs to the other side.
        landings += [Landing(t) for t in forward.step_t]
        landings += [Landing(t, [lambda t, z: dynamics.forget()], restart=True) for t in forward.jump_t]
        z0 = torch.cat([ys[k], grad_ys[k], ys.new_zeros(p)])
        try:
            result = integrate(
                dynamics, z0, times[k], times[0], (), options.method,
                controller=controller,
                grid=make_grid(problem, options, ys[k], times[k], times[0]),
                landings=landings,
                max_num_steps=options.max_num_steps,
                on_accept=dynamics.on_accept,
                label="backward",
            )
        except SolveError as error:
            raise explain_backward_failure(error, "Backsolve", dynamics.last, reverses_y=True) from None
        finally:
            dynamics.forget()
        z = result.y_end
        drift.append(drift_norm(0, z[:m]))
        errors = [e / root_m for e in torch.stack(drift).tolist()]
        stats = dict(nfe=dynamics.nfe, nvjp=dynamics.nvjp, **{key: v for key, v in result.stats.items() if key != "nfe"})
        stats.update(resets=resets[0], reconstruction_error=errors[-1], reconstruction_error_max=max(errors), **(compile_stats or {}))
        ctx.stats["backward"] = stats
        relative_errors = torch.stack(relative).tolist()
        judge_reconstruction("Backsolve", visited, errors, relative_errors, method.reconstruction_warning,
                             method.reconstruction_error, options.method.adaptive)
        grad_y0 = z[n : 2 * n] + grad_ys[0]
        parameter_error = 0.0
        if outside:
            found = [torch.zeros_like(x) if a is None else a.to(x.dtype) for a, x in zip(dynamics.a_theta, active)]
            if options.method.adaptive:
                parameter_error = dynamics.a_theta_error.ratio(
                    dynamics.a_theta, parameter_tolerance(problem, options.rtol, "rtol"),
                    parameter_tolerance(problem, options.atol, "atol", scale), sum(x.numel() for x in active),
                    result.stats["accepted"])
        else:
            found = split_like(z[2 * n :], active) if active else ()
        stats["parameter_error"] = parameter_error
        refuse_nonfinite_gradient("Backsolve", [grad_y0, *found], ["y0"] + ["the parameters"] * len(found), times[0],
                                  method.reconstruction_error)
        pieces = iter(found)
        grad_params = tuple(next(pieces) if w else None for w in wanted)
        return (None,) * 5 + (grad_y0,) + grad_params, parameter_error

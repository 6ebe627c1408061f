"""Backsolve: the continuous adjoint with ``y`` re-solved backwards beside the adjoint.

Forward: one solve without a graph; only the outputs at ``t`` are kept (N, n).

Backward: **one** solve of ``z = [y, a_y, a_θ]`` from the last output time whose incoming
gradient is non-zero down to the first output time. It lands on every output time whose
incoming gradient ``g_i = ∂L/∂y(t_i)`` is non-zero, adds the jump ``a_y += g_i`` there and
carries its step size and controller state on: no restart, no new initial-step selection
per interval. Memory does not depend on the number of steps.

The jump costs no evaluation of ``f``: ``F`` is linear in ``a_y``, so the derivative after
the jump is the last stage (FSAL) plus one vector-Jacobian product with ``g_i`` through
that stage's kept graph (see :class:`~torchadjoint.adjoint.vjp.AdjointDynamics`). When
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
from typing import Optional

import torch

from ..compiled import combined_stats, compile_dynamics, compiled_adjoint_steps
from ..errors import SolveError
from ..integrate import Landing, integrate
from ..tableaux.base import ButcherTableau
from ..options import SolverOptions
from ..problem import Problem, make_grid
from .base import AdjointCall, adjoint_function, adjoint_scale, parameter_tolerance, split_like
from .settings import ContinuousAdjoint, NormChoice
from .trust import (ExplosionGuard, ReconstructionCheck, check_threshold, explain_backward_failure, refuse_nonfinite_gradient,
                    with_seminorm_fallback)
from .vjp import AdjointDynamics, DeclaredTensors, solve_without_graph

class Backsolve(ContinuousAdjoint):
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
    parts = ("y", "a_y", "a_θ")
    seminorm_parts = 2  # y and a_y: a_θ never feeds back

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
        self._set_backward(rtol, atol, method, norm, options)
        if reset_threshold is not None and not (
            isinstance(reset_threshold, (int, float)) and not isinstance(reset_threshold, bool) and reset_threshold >= 0
        ):
            raise ValueError(f"Backsolve(reset_threshold=...) must be a non-negative number or None, got {reset_threshold!r}")
        check_threshold(reconstruction_warning, "Backsolve", "reconstruction_warning")
        self.reconstruction_warning = reconstruction_warning
        self.reconstruction_error = check_threshold(reconstruction_error, "Backsolve", "reconstruction_error")
        self.reset_threshold = None if reset_threshold is None else float(reset_threshold)

    def __repr__(self) -> str:
        return f"Backsolve(method={self.method!r}, norm={self.norm!r})"

    def reset_measure(self, drift_norm2: torch.Tensor, size: int) -> float:
        """The RMS scaled drift at a landing, from its 2-norm over ``size`` entries: what is
        compared with ``reset_threshold``. Data-parallel training replaces it (on a copy) by
        the RMS over every process's share of the batch, so all processes decide alike."""
        return float(drift_norm2) / math.sqrt(size)

    def run(self, problem: Problem, options: SolverOptions, y0: torch.Tensor, stats: dict) -> torch.Tensor:
        backward = self.backward_options(options)
        return AdjointCall(self, problem, options, backward, stats).apply(_BacksolveFunction, y0)


def _zero_stats() -> dict:
    return dict(nfe=0, nvjp=0, steps=0, accepted=0, rejected=0, resets=0, reconstruction_error=0.0, reconstruction_error_max=0.0)


def _backward(ctx, grad_ys: torch.Tensor) -> tuple:
    return with_seminorm_fallback(ctx.call.stats, lambda: _backward_pass(ctx, grad_ys, ctx.call.method.norm),
                                  lambda: _backward_pass(ctx, grad_ys, "full"))


def _backward_pass(ctx, grad_ys: torch.Tensor, norm: NormChoice) -> tuple:
    """One backward solve of ``[y, a_y(, a_θ)]`` under ``norm``: (the gradients autograd
    wants, for ``y0`` and each param; the seminorm's a_θ error estimate in tolerance units,
    0 when not measured), ``stats["backward"]`` filled."""
    (ys,) = ctx.saved_tensors
    call = ctx.call
    problem, method, options = call.problem, call.method, call.backward
    times, params = problem.times, problem.params
    # Gradients only for the parameters that want one (saves the a_θ work otherwise).
    wanted = AdjointCall.wanted(ctx)
    active = tuple(x for x, w in zip(params, wanted) if w)
    n, p = ys.shape[1], sum(x.numel() for x in active)
    looked_at = grad_ys.any(dim=1).tolist()
    # The adjoint is zero after the last output the loss looks at: start there.
    k = max((i for i in range(1, len(times)) if looked_at[i]), default=0)
    if k == 0:
        call.stats["backward"] = _zero_stats()
        if getattr(options, "compile", None):  # the keys a compiled backward reports, though nothing ran
            call.stats["backward"].update(combined_stats())
        return AdjointCall.gradients(grad_ys[0], [torch.zeros_like(x) if w else None for x, w in zip(params, wanted)]), 0.0

    # Under the seminorm a_θ is not in the integrated state (see AdjointDynamics), except
    # with an implicit or multistep method, whose evaluations of f are no Runge–Kutta
    # stages to follow.
    outside = norm == "seminorm" and isinstance(options.method, ButcherTableau)
    jumping = [i for i in range(1, k) if looked_at[i]]
    dynamics = AdjointDynamics(
        ctx.flat_func, n, active,
        keep_graph_at=() if method.reset_threshold == 0 else [times[i] for i in jumping],
        accumulate=options.method if outside else None,
        declared=DeclaredTensors(params, "backsolve"),
    )
    compile_stats = compile_dynamics(dynamics, problem, options)  # None unless options.compile asks for it
    p = 0 if outside else p
    scale = adjoint_scale(grad_ys, norm)
    check = ReconstructionCheck("Backsolve", problem, ys, options, method.reconstruction_warning,
                                method.reconstruction_error)
    jumps = _OutputJumps(method, dynamics, check, ys, grad_ys, p)
    landings = [Landing(times[i], [jumps.at(i)]) for i in jumping]
    # The backward solve must respect the forward's own landings: kinks (step_t) and
    # discontinuities of f (jump_t), where the FSAL stage belongs to the other side.
    landings += [Landing(t) for t in call.forward.step_t]
    landings += [Landing(t, [lambda t, z: dynamics.forget()], restart=True) for t in call.forward.jump_t]
    try:
        result = integrate(
            dynamics, torch.cat([ys[k], grad_ys[k], ys.new_zeros(p)]), times[k], times[0], (), options.method,
            controller=method.backward_controller(problem, options, scale, norm, [n, n, p]),
            grid=make_grid(problem, options, ys[k], times[k], times[0]),
            landings=landings,
            max_num_steps=options.max_num_steps,
            on_accept=ExplosionGuard(dynamics.on_accept, ys, n) if method.reconstruction_error is not None
            else dynamics.on_accept,
            label="backward",
            compiled=compiled_adjoint_steps(dynamics, problem),  # None unless compile_dynamics compiled it
        )
    except SolveError as error:
        raise explain_backward_failure(error, "Backsolve", dynamics.last, reverses_y=True) from None
    finally:
        dynamics.forget()
    z = result.y_end
    check.drift(0, z)
    errors = check.errors()
    stats = dict(nfe=dynamics.nfe, nvjp=dynamics.nvjp, **{key: v for key, v in result.stats.items() if key != "nfe"})
    stats.update(resets=jumps.resets, reconstruction_error=errors[-1], reconstruction_error_max=max(errors))
    if compile_stats is not None:  # the evaluations' program and the steps' (in result.stats when compiled)
        stats.update(combined_stats(compile_stats, result.stats if "compiled" in result.stats else None))
    call.stats["backward"] = stats
    check.judge(errors)
    grad_y0 = z[n : 2 * n] + grad_ys[0]
    parameter_error = 0.0
    if outside:
        found = [torch.zeros_like(x) if a is None else a.to(x.dtype) for a, x in zip(dynamics.a_theta, active)]
        if options.method.adaptive:
            parameter_error = dynamics.accumulator.a_theta_error.ratio(
                dynamics.a_theta, parameter_tolerance(problem, options.rtol, "rtol"),
                parameter_tolerance(problem, options.atol, "atol", scale), sum(x.numel() for x in active),
                result.stats["accepted"])
    else:
        found = split_like(z[2 * n :], active) if active else ()
    stats["parameter_error"] = parameter_error
    refuse_nonfinite_gradient("Backsolve", [grad_y0, *found], ["y0"] + ["the parameters"] * len(found), times[0],
                              method.reconstruction_error)
    pieces = iter(found)
    return AdjointCall.gradients(grad_y0, [next(pieces) if w else None for w in wanted]), parameter_error


class _OutputJumps:
    """What happens where the backward solve lands on an output time ``t_i`` whose incoming
    gradient ``g_i`` is non-zero: the reconstruction check of the re-solved ``y``, the jump
    ``a_y += g_i`` (through the kept graph: no call of ``f``), and, past the method's
    ``reset_threshold``, ``y`` put back to the forward's value (``f`` re-evaluated there)."""

    def __init__(self, method: Backsolve, dynamics: AdjointDynamics, check: ReconstructionCheck, ys: torch.Tensor,
                 grad_ys: torch.Tensor, p: int):
        self.method, self.dynamics, self.check = method, dynamics, check
        self.y_rows, self.g_rows = ys.unbind(0), grad_ys.unbind(0)
        self.n, self.p = ys.shape[1], p
        self.resets = 0

    def at(self, i: int):
        """The landing callback for output ``i``."""
        return lambda t, z: self.jump(i, t, z)

    def jump(self, i: int, t: float, z: torch.Tensor):
        n, threshold = self.n, self.method.reset_threshold
        error = self.check.drift(i, z)
        dz = torch.nn.functional.pad(self.g_rows[i], (n, self.p))  # [0, g_i, 0]: a_y += g_i
        # One host sync per landing, only when the reset decision needs the value.
        if threshold is not None and (threshold == 0 or self.method.reset_measure(error, self.check.size) > threshold):
            # The forward pass knew y here; f must be re-evaluated at the moved state.
            self.resets += 1
            self.dynamics.forget()
            z = z + dz
            z[:n] = self.y_rows[i]
            return z
        return self.dynamics.jump(t, z, dz)


_BacksolveFunction = adjoint_function("backsolve", solve_without_graph, _backward)

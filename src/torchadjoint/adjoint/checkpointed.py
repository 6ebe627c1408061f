"""Checkpointed (interpolating) adjoint: ``y`` recovered forwards from checkpoints.

Forward: one solve without a graph that keeps the state, the proposed step and the
controller state at a bounded number of checkpoints (:mod:`.replay`). Backward, segment
by segment from the last to the first: replay the forward's steps from the segment's
checkpoint — exactly the forward's steps, bitwise — keeping them, and integrate only
``(a_y, a_θ)`` backwards across the segment::

    da_y/dt = -a_y · ∂f/∂y (t, y(t)),   da_θ/dt = -a_y · ∂f/∂θ (t, y(t))

with ``y(t)`` the dense output of the replayed steps (the method's own interpolant, or
cubic Hermite; continuous across the step points). The backward solve
lands on every output time whose incoming gradient is non-zero, where it adds the jump
``a_y += ∂L/∂y(t_i)``, and on the segment boundaries. It is one solve carried across
segments and output times: its step size, controller state and FSAL stage go on, no
restarts.

Unlike :class:`~torchadjoint.Backsolve` it never integrates ``y`` backwards in time, so
contracting dynamics (explosive when reversed) do it no harm. Memory: the checkpoints
plus one segment of at most ``checkpoints`` steps, whatever the number of steps (longer
solves add levels of checkpoints, see :mod:`.replay`); cost: one extra forward solve
(per level) and the backward solve of ``(a_y, a_θ)``.
"""
from __future__ import annotations

import bisect
from typing import List, Optional

import torch

from ..compiled import compile_dynamics
from ..errors import SolveError
from ..integrate import Landing, StepInfo, beside, integrate
from ..implicit.substep import ImplicitSubsteps
from ..interpolation import interpolate, needs_f1
from ..options import SolverOptions
from ..problem import Problem, make_flat_func
from .base import AdjointCall, adjoint_function, adjoint_scale, parameter_tolerance, split_like
from .consistency import DiscreteAdjointCheck
from .settings import CONTROLLER_OPTION_NAMES, ContinuousAdjoint, NormChoice
from .replay import ForwardSetup, check_checkpoints, checkpointed_forward
from .trust import ParameterErrorEstimate, check_threshold, explain_backward_failure, with_seminorm_fallback
from .vjp import AdjointDynamics, DeclaredTensors


class Checkpointed(ContinuousAdjoint):
    """Continuous adjoint with ``y`` recovered from checkpoints by re-solving forwards.

    Args:
        checkpoints: the most states kept at once per level, and the most steps held at
            once on the way back (default 32; at least 2). Up to ``checkpoints²`` forward
            steps (for a power of two; about half that otherwise) cost one extra
            forward solve; every further factor of ``checkpoints`` one more.
        rtol, atol: tolerances of the backward solve of ``a_y`` (default: the forward's).
        method: the backward solver (default: the forward's). A fixed-step backward
            method steps on the forward's step points.
        norm: ``"seminorm"`` (default: error control on ``a_y`` alone, since ``a_θ``
            never feeds back; with an implicit backward method, e.g. ``kvaerno5``, the
            full norm instead, see ``_norm_for``), ``"full"`` (``a_y`` and ``a_θ``), or a callable receiving
            the scaled errors ``(a_y, a_θ)`` as flat tensors and returning a scalar tensor.
        options: further backward solver options, a dict with keys among
            ``Checkpointed.option_names`` (``first_step``, ``max_num_steps``, ``safety``, ...;
            ``compile``; no ``step_size``: a fixed-step backward method steps on the forward's
            step points).
        mismatch_warning: with an implicit forward method, the discrete adjoint of the
            replayed forward steps is computed beside the continuous one, and
            :class:`~torchadjoint.AdjointMismatchWarning` raised when the two gradients
            differ by more than this, relative (default 0.02; see
            :mod:`torchadjoint.adjoint.consistency`). The check holds one segment's autograd
            graph at a time, as ``Direct(checkpoints=K)`` does. ``None``: no check, and not its
            cost.

    ``stats["backward"]``: ``nfe`` (all evaluations of ``f`` on the way back: replays
    plus the adjoint solve), ``nvjp`` (vector-Jacobian products: one per evaluation of
    the adjoint dynamics), ``adjoint_nfe``, ``replay_nfe``, ``steps``, ``accepted``,
    ``rejected`` (the adjoint solve), ``checkpoints`` (kept by the forward), ``levels``
    (of checkpoints used), ``replay_error`` (largest difference between a replayed state
    and the forward's; 0 when ``f`` is deterministic), ``parameter_error`` and
    ``seminorm_fallback`` (under the seminorm, a_θ's error estimate and whether the pass was
    redone under the full norm, as for :class:`~torchadjoint.Backsolve`), and with an
    implicit forward method ``adjoint_mismatch`` (the relative gap between this gradient
    and the discrete adjoint's, the larger of ``dL/dy0``'s and ``dL/dθ``'s; the
    check's replays and backpropagations are counted in ``replay_nfe`` and
    ``mismatch_backprops``).
    """

    name = "checkpointed"
    parts = ("a_y", "a_θ")
    option_names = CONTROLLER_OPTION_NAMES + ("compile",)  # compile=False: the backward's evaluations eager
    own_grid = False  # a fixed-step backward method steps on the forward's step points

    def __init__(
        self,
        checkpoints: int = 32,
        rtol=None,
        atol=None,
        method: Optional[str] = None,
        norm: NormChoice = "seminorm",
        options: Optional[dict] = None,
        mismatch_warning: Optional[float] = 0.02,
    ):
        self.checkpoints = check_checkpoints(checkpoints, "Checkpointed")
        self.mismatch_warning = check_threshold(mismatch_warning, "Checkpointed", "mismatch_warning")
        self._set_backward(rtol, atol, method, norm, options)

    def __repr__(self) -> str:
        return f"Checkpointed(checkpoints={self.checkpoints}, method={self.method!r}, norm={self.norm!r})"

    def run(self, problem: Problem, options: SolverOptions, y0: torch.Tensor, stats: dict) -> torch.Tensor:
        backward = self.backward_options(options)
        return AdjointCall(self, problem, options, backward, stats).apply(_CheckpointedFunction, y0)


def _norm_for(choice: NormChoice, tableau) -> NormChoice:
    # An L-stable implicit method steps over a stiff transient of a_y in one step, with a
    # small error on a_y, but not on a_θ = ∫ a_y ∂f/∂θ dt, which depends on the transient's
    # integral: the seminorm's premise (a_θ's error need not limit the step) fails there.
    # Measured on a linear system with eigenvalues to -1e4: dL/dθ off by 9e-4 (relative)
    # under the seminorm, 1.4e-7 under the full norm, at rtol 1e-8.
    if choice == "seminorm" and getattr(tableau, "implicit", False):
        return "full"
    return choice


class DenseTrajectory:
    """``y(t)`` (n,) on a run of accepted forward steps, by the method's dense output.

    ``steps``: the replayed steps in the order taken; ``f1`` is filled in where the
    interpolant needs it and the step did not provide it.
    """

    def __init__(self, steps: List[StepInfo], setup: ForwardSetup, record_graph: bool = False):
        self.steps = steps
        # record_graph: the sub-steps below are taken with autograd on (and not
        # remembered), for the discrete adjoint of the mismatch check.
        self.record_graph = record_graph
        self.direction = setup.direction
        self.coeffs = setup.tableau.as_tensors(steps[0].y0.dtype, steps[0].y0.device)
        if needs_f1(self.coeffs, setup.tableau.stages):
            for i, step in enumerate(steps):
                if step.f1 is None:
                    following = steps[i + 1] if i + 1 < len(steps) else None
                    # The next step's first stage is f(t1, y1), unless f jumps at t1.
                    if following is not None and step.t1 not in setup.jump_times:
                        step.f1 = following.stages[0]
                    else:
                        step.f1 = setup.f(setup.end_time_side(step.t0, step.t1), step.y1)
        self.keys = [self.direction * s.t0 for s in steps]
        self.setup = setup
        # Inside an implicit step y(t) comes from a shorter implicit step from its start, not
        # from the dense output (then cubic Hermite; far off over long stiff steps: Van der Pol μ=1000,
        # the gradient 20× off; see implicit.substep). Stage times outside the replayed steps
        # (Kvaerno5's c₃ = 1.23 reaches past a segment's start) still use the interpolant.
        implicit = getattr(setup.tableau, "implicit", False)
        self.substeps = ImplicitSubsteps(
            setup.tableau, setup.controller, setup.f, self.coeffs, record_graph=record_graph,
            advice="the checkpointed backward pass needs y(t) there; use gradient=Direct()") if implicit else None
        self._recent: dict = {}

    def __call__(self, t: float) -> torch.Tensor:
        i = min(max(bisect.bisect_right(self.keys, self.direction * t) - 1, 0), len(self.steps) - 1)
        step = self.steps[i]
        if t == step.t0:
            return step.y0
        if t == step.t1:
            return step.y1
        h = step.h if step.h is not None else step.t1 - step.t0  # exact: at a large |t| t1 - t0 rounds
        if self.substeps is not None and 0 < (t - step.t0) / h < 1:
            return self._substep(step, t)
        return interpolate(self.coeffs, step.y0, step.y1, step.stages, step.f1, h, [(t - step.t0) / h])[0]

    def _substep(self, step: StepInfo, t: float) -> torch.Tensor:
        """``y(t)`` (n,) for ``t`` strictly inside ``step``, by implicit steps from its start
        (remembered for the backward's retries at the same time)."""
        if self.record_graph:
            return self.substeps(step.t0, step.y0, step.stages[0], t)
        if t not in self._recent:
            if len(self._recent) > 64:
                self._recent.clear()
            self._recent[t] = self.substeps(step.t0, step.y0, step.stages[0], t)
        return self._recent[t]


def segmented_forward(ctx, call: AdjointCall, y0: torch.Tensor, label: str) -> torch.Tensor:
    """The forward of the methods that replay the forward segment by segment on the way back
    (Checkpointed, ``Direct(checkpoints=K)``): a solve without a graph keeping checkpoints
    (:func:`.replay.checkpointed_forward`), kept on ``ctx`` with ``call``; returns ``ys`` (N, n)."""
    setup, result, checkpoints, end, call.stats["forward"] = checkpointed_forward(
        call.problem, call.forward, y0, call.method.checkpoints, label)
    ctx.call = call
    ctx.setup, ctx.checkpoints, ctx.end = setup, checkpoints, end
    return result.ys


def _backward(ctx, grad_ys: torch.Tensor) -> tuple:
    # Redone under the full norm (the checkpoints replayed again) when the seminorm's steps
    # left a_θ under-resolved (trust.ParameterErrorEstimate).
    grads = with_seminorm_fallback(ctx.call.stats, lambda: _backward_pass(ctx, grad_ys, ctx.call.method.norm),
                                   lambda: _backward_pass(ctx, grad_ys, "full"))
    # Judged on the pass kept: a seminorm pass redone for an under-resolved a_θ would
    # otherwise warn about what the redo mended.
    if ctx.mismatch_check is not None:
        ctx.mismatch_check.judge(grads[1], grads[2:], ctx.needs_input_grad[1], AdjointCall.wanted(ctx),
                                 ctx.call.stats["backward"])
    return grads


def _backward_pass(ctx, grad_ys: torch.Tensor, norm: NormChoice) -> tuple:
    """The backward pass under ``norm``, segment by segment from the last to the first: (the
    gradients autograd wants, the seminorm's a_θ error estimate in tolerance units: 0 when
    not measured), ``stats["backward"]`` filled."""
    call, setup = ctx.call, ctx.setup
    params, times = call.problem.params, call.problem.times
    stats = dict(nfe=0, nvjp=0, adjoint_nfe=0, replay_nfe=0, steps=0, accepted=0, rejected=0,
                 checkpoints=len(ctx.checkpoints), levels=0, replay_error=0.0, parameter_error=0.0)
    check = ctx.mismatch_check = None
    if call.method.mismatch_warning is not None and getattr(setup.tableau, "implicit", False):
        check = ctx.mismatch_check = DiscreteAdjointCheck(call.problem, grad_ys, call.method.mismatch_warning,
                                                             call.backward.atol)
        stats.update(adjoint_mismatch=0.0, mismatch_backprops=0)
    call.stats["backward"] = stats
    if len(times) == 1:
        return AdjointCall.gradients(grad_ys[0], [torch.zeros_like(x) for x in params]), 0.0
    setup.nfe = 0
    solve = _AcrossSegments(call, setup, grad_ys, norm, check)
    for start, end, depth in setup.segments(ctx.checkpoints, ctx.end, call.method.checkpoints, solve.needed):
        stats["levels"] = max(stats["levels"], depth)
        solve.across(start, end, stats)
    z, n, nfe = solve.z, solve.n, solve.nfe
    stats.update(nfe=nfe + setup.nfe, nvjp=nfe, adjoint_nfe=nfe, replay_nfe=setup.nfe, replay_error=setup.replay_error,
                 **(solve.compile_stats or {}))
    if solve.estimate is not None:
        options, problem = call.backward, call.problem
        stats["parameter_error"] = solve.estimate.ratio(
            [z[n:]], parameter_tolerance(problem, options.rtol, "rtol"),
            parameter_tolerance(problem, options.atol, "atol", solve.scale), len(z) - n, stats["accepted"])
    grad_params = split_like(z[n:], params) if params else ()
    if check is not None:
        stats["mismatch_backprops"] = check.backprops
    return AdjointCall.gradients(z[:n], grad_params), stats["parameter_error"]


class _AcrossSegments:
    """One backward solve of ``[a_y, a_θ]`` carried across the segments from the last to the
    first: its state, step size, controller state and FSAL stage go on, no restarts. Each
    segment's forward steps are replayed and ``y(t)`` read from their dense output."""

    def __init__(self, call: AdjointCall, setup: ForwardSetup, grad_ys: torch.Tensor, norm: NormChoice,
                 check: Optional[DiscreteAdjointCheck] = None):
        problem, options, params = call.problem, call.backward, call.problem.params
        self.setup, self.options, self.grad_ys, self.norm = setup, options, grad_ys, norm
        self.times = problem.times
        self.n = n = grad_ys.shape[1]
        p = sum(x.numel() for x in params)
        self.tableau = options.method
        effective = _norm_for(norm, self.tableau)
        self.scale = adjoint_scale(grad_ys, norm)
        self.controller = call.method.backward_controller(problem, options, self.scale, effective, [n, p])
        # Under the seminorm, a_θ's embedded error estimate, accumulated over accepted steps.
        self.estimate = None
        if effective == "seminorm" and self.tableau.adaptive and self.tableau.b_error is not None and p:
            self.estimate = ParameterErrorEstimate()
            self.error_weights = self.tableau.as_tensors(grad_ys.dtype, grad_ys.device).b_error
        self.dynamics = AdjointDynamics(make_flat_func(problem), n, params, along_trajectory=True,
                                        declared=DeclaredTensors(params, "checkpointed"))
        self.compile_stats = compile_dynamics(self.dynamics, problem, options)  # None unless options.compile
        looked_at = grad_ys.any(dim=1).tolist()
        self.jumping = [i for i in range(len(self.times) - 1) if looked_at[i]]  # the last one is the start value
        self.z = torch.cat([grad_ys[-1], grad_ys.new_zeros(p)])
        self.h: Optional[float] = None
        self.controller_state, self.f0 = 1.0, None
        self.nfe = 0  # evaluations of the adjoint dynamics
        self.check = check
        if check is not None:
            check.start(self.jumping)

    def jumps_in(self, start, end) -> List[int]:
        direction, times = self.setup.direction, self.times
        return [i for i in self.jumping if direction * (times[i] - start.t) >= 0 and direction * (times[i] - end.t) < 0]

    def needed(self, start, end) -> bool:
        # Past the last output the loss looks at, a_y is zero and stays zero.
        return bool(self.z[: self.n].any()) or bool(self.jumps_in(start, end))

    def jump(self, i: int):
        """The landing callback at output ``i``: ``a_y += g_i``."""

        def jump(t: float, z: torch.Tensor) -> torch.Tensor:
            z = z.clone()
            z[: self.n] += self.grad_ys[i]
            return z

        return jump

    def across(self, start, end, stats: dict) -> None:
        """Integrate the adjoint from the segment's ``end`` back to its ``start``."""
        setup, tableau, dynamics = self.setup, self.tableau, self.dynamics
        t_a, t_b = start.t, end.t
        if self.check is not None:  # replayed with a graph, for the discrete adjoint
            steps = self.check.replay(setup, start, end, lambda kept: DenseTrajectory(kept, setup, record_graph=True))
        else:
            steps = []
            with torch.no_grad():
                setup.replay(start, end, steps.append)
        with torch.no_grad():
            dynamics.y_of_t = DenseTrajectory(steps, setup)
        if t_b in setup.jump_times and t_b != setup.t_end:
            # f jumps at t_b: this segment starts from f on its own side.
            self.f0 = dynamics(beside(t_b, t_a, self.z.dtype), self.z)
            self.nfe += 1
        try:
            result = integrate(
                dynamics, self.z, t_b, t_a, (), tableau,
                controller=self.controller, grid=None if tableau.adaptive else [s.t0 for s in reversed(steps)],
                landings=self.landings(steps, self.jumps_in(start, end), t_a, t_b),
                max_num_steps=self.options.max_num_steps,
                first_step=self.h, controller_state=self.controller_state, f0=self.f0,
                on_accept=None if self.estimate is None else self.on_accept,
                label="backward",
            )
        except SolveError as error:
            raise explain_backward_failure(error, "Checkpointed", dynamics.last, reverses_y=False) from None
        self.z, self.h, self.controller_state, self.f0 = result.y_end, result.h_next, result.controller_state, result.f_end
        for key in ("steps", "accepted", "rejected"):
            stats[key] += result.stats[key]
        self.nfe += result.stats["nfe"]
        if self.check is not None:
            self.check.step_back(start, end, self.z[: self.n])
        dynamics.y_of_t = None  # the segment's steps are freed

    def on_accept(self, info: StepInfo) -> None:
        """Add an accepted step's share of a_θ's embedded error estimate."""
        h = info.h if info.h is not None else info.t1 - info.t0
        stages = info.stages[:, self.n :]
        self.estimate.add(h, [1.0], [[torch.mv(stages.T, self.error_weights.to(stages.dtype))]])

    def landings(self, steps: List[StepInfo], jumps: List[int], t_a: float, t_b: float) -> List[Landing]:
        # The backward steps need not land on the forward's step points: y(t) is
        # continuous there and the error estimate sees the rest; landing on them as well
        # as on the output times would cost slivers of steps. Only f's own
        # discontinuities (jump_t) are landed on, the segment's start included (there
        # the backward solve ends, its last stages evaluated on this segment's side).
        landings = [Landing(s.t0, restart=True) for s in steps if s.t0 in self.setup.jump_times]
        landings += [Landing(self.times[i], [self.jump(i)]) for i in jumps]
        if self.norm != "full" and self.tableau.adaptive:
            # ...but the forward's step points are landed on too, unless the full norm
            # is asked for (a callable norm, e.g. distributed training's global seminorm,
            # may leave a_θ out as well): under the seminorm nothing controls the error of
            # a_θ = ∫ a_y ∂f/∂θ dt, and a_y can be smooth (∂f/∂y small) while ∂f/∂θ
            # varies fast in t (a forced system y' = -a y + θ u(t)): steps sized for a_y
            # alone would integrate it coarsely (15 % off, silently). Never stepping
            # across a forward step keeps the integrand resolved as well as y was.
            landed = {landing.t for landing in landings}
            landings += [Landing(s.t0) for s in steps if s.t0 not in landed and s.t0 != t_a and s.t0 != t_b]
        return landings


_CheckpointedFunction = adjoint_function(
    "checkpointed", lambda ctx, call, y0: segmented_forward(ctx, call, y0, "checkpointed"), _backward)

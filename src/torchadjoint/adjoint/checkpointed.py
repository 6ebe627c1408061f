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
import math
from typing import Callable, List, Optional, Sequence, Union

import torch

from ..controller import norm_value, rms_norm, seminorm
from ..errors import SolveError
from ..integrate import Landing, StepInfo, integrate
from ..interpolation import interpolate, needs_f1
from ..options import SolverOptions, resolve_method
from ..problem import Problem, make_controller, make_flat_func
from .base import GradientMethod, adjoint_scale, backward_tolerance, parameter_tolerance, refuse_double_backward, split_like
from .replay import ForwardSetup, check_checkpoints, checkpointed_forward
from .trust import ParameterErrorEstimate, explain_backward_failure, parameter_error_too_large, seminorm_fallback_stats
from .vjp import DeclaredTensors, flat_param_grads

NormChoice = Union[str, Callable]
FlatFunc = Callable[[float, torch.Tensor], torch.Tensor]

# Solver options that make sense for the backward solve of (a_y, a_θ). Its grid, if the
# backward method has a fixed step, is the forward's step points, so no step_size.
BACKWARD_OPTION_NAMES = (
    "first_step", "min_step", "max_step", "max_num_steps", "safety", "ifactor", "dfactor", "pcoeff", "icoeff",
)


class Checkpointed(GradientMethod):
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
            ``BACKWARD_OPTION_NAMES`` (``first_step``, ``max_num_steps``, ``safety``, ...).

    ``stats["backward"]``: ``nfe`` (all evaluations of ``f`` on the way back: replays
    plus the adjoint solve), ``nvjp`` (vector-Jacobian products: one per evaluation of
    the adjoint dynamics), ``adjoint_nfe``, ``replay_nfe``, ``steps``, ``accepted``,
    ``rejected`` (the adjoint solve), ``checkpoints`` (kept by the forward), ``levels``
    (of checkpoints used), ``replay_error`` (largest difference between a replayed state
    and the forward's; 0 when ``f`` is deterministic), ``parameter_error`` and
    ``seminorm_fallback`` (under the seminorm, a_θ's error estimate and whether the pass was
    redone under the full norm, as for :class:`~torchadjoint.Backsolve`).
    """

    name = "checkpointed"

    def __init__(
        self,
        checkpoints: int = 32,
        rtol=None,
        atol=None,
        method: Optional[str] = None,
        norm: NormChoice = "seminorm",
        options: Optional[dict] = None,
    ):
        self.checkpoints = check_checkpoints(checkpoints, "Checkpointed")
        if method is not None:
            resolve_method(method, "Checkpointed(method=...)")
        if not (norm in ("seminorm", "full") or callable(norm)):
            raise ValueError(f"Checkpointed(norm=...) must be 'seminorm', 'full' or a callable, got {norm!r}")
        if options is not None and not isinstance(options, dict):
            raise TypeError(f"Checkpointed(options=...) must be a dict of solver options, got {type(options).__name__}")
        unknown = sorted(set(options or {}) - set(BACKWARD_OPTION_NAMES))
        if unknown:
            raise ValueError(
                f"Checkpointed(options=...) got {unknown}; the backward solve takes {list(BACKWARD_OPTION_NAMES)} "
                f"(rtol, atol, method and norm are arguments of their own; a fixed-step backward method steps on the "
                f"forward's step points)"
            )
        self.rtol, self.atol, self.method, self.norm = rtol, atol, method, norm
        self.options = dict(options or {})

    def __repr__(self) -> str:
        return f"Checkpointed(checkpoints={self.checkpoints}, method={self.method!r}, norm={self.norm!r})"

    def backward_options(self, forward: SolverOptions) -> SolverOptions:
        """Forward options overridden by this method's backward settings (validated)."""
        fields = dict(
            rtol=forward.rtol if self.rtol is None else self.rtol,
            atol=forward.atol if self.atol is None else self.atol,
            max_num_steps=forward.max_num_steps, safety=forward.safety, ifactor=forward.ifactor,
            dfactor=forward.dfactor, pcoeff=forward.pcoeff, icoeff=forward.icoeff,
            min_step=forward.min_step, max_step=forward.max_step,
        )
        fields.update(self.options)
        tableau = resolve_method(self.method or forward.method, "Checkpointed(method=...)")
        if tableau.adaptive:
            return SolverOptions.build(method=tableau, **fields)
        # A fixed-step method needs no step_size here (it steps on the forward's points):
        # validate the rest as for an adaptive one, then put the method in.
        return SolverOptions.build(method="dopri5", **fields).replace(method=tableau)

    def run(self, problem: Problem, options: SolverOptions, y0: torch.Tensor, stats: dict) -> torch.Tensor:
        backward = self.backward_options(options)
        return _CheckpointedFunction.apply(self, problem, options, backward, stats, y0, *problem.params)


def adjoint_norm(choice: NormChoice, n: int):
    if choice == "seminorm":
        return seminorm(n)
    if choice == "full":
        return rms_norm

    def user_norm(x: torch.Tensor) -> torch.Tensor:
        return norm_value(choice((x[:n], x[n:])), "Checkpointed(norm=...)")

    return user_norm


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

    def __init__(self, steps: List[StepInfo], setup: ForwardSetup):
        self.steps = steps
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
        # An implicit method's steps are long across stiff transients, where the cubic
        # Hermite dense output is far off (Van der Pol μ=1000: up to 240× the tolerance
        # from the step's own solution; the gradient 20× off). Inside such a step y(t) is
        # recovered instead by one implicit step of the same method from the step's start
        # to t (within the accepted step's error: shorter, from the same state; the step's
        # Jacobian is reused). Stage times outside the replayed steps (Kvaerno5's c₃ = 1.23
        # reaches past a segment's start) still use the interpolant, extrapolated.
        implicit = getattr(setup.tableau, "implicit", False)
        self.substepper = setup.tableau.make_stepper(setup.controller, setup.f) if implicit else None
        self._recent: dict = {}

    def __call__(self, t: float) -> torch.Tensor:
        i = min(max(bisect.bisect_right(self.keys, self.direction * t) - 1, 0), len(self.steps) - 1)
        step = self.steps[i]
        if t == step.t0:
            return step.y0
        if t == step.t1:
            return step.y1
        h = step.t1 - step.t0
        if self.substepper is not None and 0 < (t - step.t0) / h < 1:
            return self._substep(step, t)
        return interpolate(self.coeffs, step.y0, step.y1, step.stages, step.f1, h, [(t - step.t0) / h])[0]

    def _substep(self, step: StepInfo, t: float) -> torch.Tensor:
        """``y(t)`` (n,) for ``t`` strictly inside ``step``, by implicit steps from its start
        (remembered for the backward's retries at the same time)."""
        if t not in self._recent:
            if len(self._recent) > 64:
                self._recent.clear()
            self._recent[t] = self._implicit_steps(step.t0, step.y0, step.stages[0], t, depth=0)
        return self._recent[t]

    def _implicit_steps(self, t0: float, y0: torch.Tensor, f0: torch.Tensor, t: float, depth: int) -> torch.Tensor:
        # One step t0 → t; where Newton does not converge, two halves, recursively.
        setup = self.setup
        with torch.no_grad():
            result = self.substepper(setup.f, t0, y0, f0, t - t0, t, setup.tableau, self.coeffs)
        if result.y1 is not y0:  # the stepper hands y0 back when Newton failed
            return result.y1
        if depth >= 8:
            raise SolveError(t, "the checkpointed backward pass could not recover y(t) inside a forward step (Newton's "
                             "iteration did not converge even on 1/256 of the step); use gradient=Direct()")
        middle = t0 + (t - t0) / 2
        y_mid = self._implicit_steps(t0, y0, f0, middle, depth + 1)
        return self._implicit_steps(middle, y_mid, setup.f(middle, y_mid), t, depth + 1)


def adjoint_dynamics(flat_func: FlatFunc, n: int, params: Sequence[torch.Tensor], y_of_t,
                     declared: Optional[DeclaredTensors] = None) -> FlatFunc:
    """``F(t, z) -> dz/dt`` for ``z = [a_y, a_θ]`` (n + p,) along ``y_of_t(t)``: one call of
    ``f`` and one vector-Jacobian product per evaluation (each evaluation's graph checked by
    ``declared`` for tensors ``f`` uses but the adjoint does not know)."""
    params = tuple(params)
    active = tuple(p for p in params if p.requires_grad)

    def dynamics(t: float, z: torch.Tensor) -> torch.Tensor:
        a = z[:n]
        with torch.enable_grad():
            y = y_of_t(t).detach().requires_grad_(True)
            fy = flat_func(t, y)
            if declared is not None:
                declared.check(fy, (y,), t)
            if fy.requires_grad:
                grads = torch.autograd.grad(fy, (y,) + active, a, allow_unused=True)
            else:  # f depends on neither y nor the parameters
                grads = (None,) * (1 + len(active))
        vjp_y = grads[0] if grads[0] is not None else torch.zeros_like(a)
        dynamics.last = (t, fy, a, vjp_y, grads[1:])  # for error reports (trust.explain_backward_failure)
        if not params:
            return vjp_y.neg()
        by_param = dict(zip(map(id, active), grads[1:]))
        vjp_p = flat_param_grads([by_param.get(id(p)) for p in params], params)
        return torch.cat([vjp_y.neg(), vjp_p.neg().to(z.dtype)])

    dynamics.feedback_size = n  # a_θ never feeds back (an implicit method's Jacobian skips it)
    dynamics.last = None
    return dynamics


class _CheckpointedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, method: Checkpointed, problem: Problem, options, backward, stats, y0, *params):
        setup, result, checkpoints, end, stats["forward"] = checkpointed_forward(
            problem, options, y0, method.checkpoints, "checkpointed")
        ctx.method, ctx.problem, ctx.backward, ctx.stats = method, problem, backward, stats
        ctx.setup, ctx.checkpoints, ctx.end = setup, checkpoints, end
        return result.ys

    @staticmethod
    def backward(ctx, grad_ys):
        if torch.is_grad_enabled():
            refuse_double_backward("checkpointed")
        grads, parameter_error = _CheckpointedFunction.solve_backward(ctx, grad_ys, ctx.method.norm)
        ctx.stats["backward"]["seminorm_fallback"] = False
        if not parameter_error_too_large(parameter_error):
            return grads
        # The seminorm's steps left a_θ under-resolved: redo with it error-controlled
        # (trust.ParameterErrorEstimate); the checkpoints are replayed again.
        first = ctx.stats["backward"]
        grads, _ = _CheckpointedFunction.solve_backward(ctx, grad_ys, "full")
        ctx.stats["backward"] = seminorm_fallback_stats(first, ctx.stats["backward"])
        return grads

    @staticmethod
    def solve_backward(ctx, grad_ys, norm: NormChoice):
        """One backward pass under ``norm``: (the gradients, the seminorm's a_θ error
        estimate in tolerance units: 0 when not measured)."""
        problem, setup, options = ctx.problem, ctx.setup, ctx.backward
        params, times = problem.params, problem.times
        n, p = grad_ys.shape[1], sum(x.numel() for x in params)
        zero_grads = tuple(torch.zeros_like(x) for x in params)
        stats = dict(nfe=0, nvjp=0, adjoint_nfe=0, replay_nfe=0, steps=0, accepted=0, rejected=0,
                     checkpoints=len(ctx.checkpoints), levels=0, replay_error=0.0, parameter_error=0.0)
        ctx.stats["backward"] = stats
        if len(times) == 1:
            return (None,) * 5 + (grad_ys[0],) + zero_grads, 0.0

        setup.nfe = 0
        direction = setup.direction
        flat_func = make_flat_func(problem)
        tableau = options.method
        scale = adjoint_scale(grad_ys, norm)
        controller = make_controller(
            problem, options, norm=adjoint_norm(_norm_for(norm, tableau), n),
            rtol=backward_tolerance(problem, options.rtol, "rtol", with_y=False, p=p),
            # Scale-aware: the adjoint alone is integrated here, and an atol meant for y
            # would let a small adjoint (a mean-reduced loss) take huge steps (adjoint_scale).
            atol=backward_tolerance(problem, options.atol, "atol", with_y=False, p=p, scale=scale),
        )
        # Under the seminorm, a_θ's embedded error estimate, accumulated over accepted steps.
        estimate = None
        if _norm_for(norm, tableau) == "seminorm" and tableau.adaptive and tableau.b_error is not None and p:
            estimate = ParameterErrorEstimate()
            error_weights = tableau.as_tensors(grad_ys.dtype, grad_ys.device).b_error

            def on_accept(info: StepInfo) -> None:
                h = info.h if info.h is not None else info.t1 - info.t0
                estimate.add(h, [1.0], [[torch.mv(info.stages[:, n:].T, error_weights.to(info.stages.dtype))]])
        declared = DeclaredTensors(params, "checkpointed")
        looked_at = grad_ys.any(dim=1).tolist()
        jumping = [i for i in range(len(times) - 1) if looked_at[i]]  # the last one is the start value

        def make_jump(i: int):
            def jump(t: float, z: torch.Tensor) -> torch.Tensor:
                z = z.clone()
                z[:n] += grad_ys[i]
                return z

            return jump

        z = torch.cat([grad_ys[-1], grad_ys.new_zeros(p)])
        # The backward solve's state carried from segment to segment (no restarts).
        h: Optional[float] = None
        controller_state, f0 = 1.0, None
        adjoint_nfe = 0

        def jumps_in(start, end) -> List[int]:
            return [i for i in jumping if direction * (times[i] - start.t) >= 0 and direction * (times[i] - end.t) < 0]

        def needed(start, end) -> bool:
            # Past the last output the loss looks at, a_y is zero and stays zero.
            return bool(z[:n].any()) or bool(jumps_in(start, end))

        for start, end, depth in setup.segments(ctx.checkpoints, ctx.end, ctx.method.checkpoints, needed):
            stats["levels"] = max(stats["levels"], depth)
            t_a, t_b = start.t, end.t
            jumps = jumps_in(start, end)
            steps: List[StepInfo] = []
            with torch.no_grad():
                setup.replay(start, end, steps.append)
            trajectory = DenseTrajectory(steps, setup)
            dynamics = adjoint_dynamics(flat_func, n, params, trajectory, declared)
            # The backward steps need not land on the forward's step points: y(t) is
            # continuous there and the error estimate sees the rest; landing on them as well
            # as on the output times would cost slivers of steps. Only f's own
            # discontinuities (jump_t) are landed on, the segment's start included (there
            # the backward solve ends, its last stages evaluated on this segment's side).
            landings = [Landing(s.t0, restart=True) for s in steps if s.t0 in setup.jump_times]
            landings += [Landing(times[i], [make_jump(i)]) for i in jumps]
            if norm != "full" and tableau.adaptive:
                # ...but the forward's step points are landed on too, unless the full norm
                # is asked for (a callable norm, e.g. distributed training's global seminorm,
                # may leave a_θ out as well): under the seminorm nothing controls the error of
                # a_θ = ∫ a_y ∂f/∂θ dt, and a_y can be smooth (∂f/∂y small) while ∂f/∂θ
                # varies fast in t (a forced system y' = -a y + θ u(t)): steps sized for a_y
                # alone would integrate it coarsely (15 % off, silently). Never stepping
                # across a forward step keeps the integrand resolved as well as y was.
                landed = {landing.t for landing in landings}
                landings += [Landing(s.t0) for s in steps if s.t0 not in landed and s.t0 != t_a and s.t0 != t_b]
            grid = None if tableau.adaptive else [s.t0 for s in reversed(steps)]
            if t_b in setup.jump_times and t_b != setup.t_end:
                # f jumps at t_b: this segment starts from f on its own side.
                f0 = dynamics(math.nextafter(t_b, t_a), z)
                adjoint_nfe += 1
            try:
                result = integrate(
                    dynamics, z, t_b, t_a, (), tableau,
                    controller=controller, grid=grid, landings=landings,
                    max_num_steps=options.max_num_steps,
                    first_step=h, controller_state=controller_state, f0=f0,
                    on_accept=None if estimate is None else on_accept,
                    label="backward",
                )
            except SolveError as error:
                raise explain_backward_failure(error, "Checkpointed", dynamics.last, reverses_y=False) from None
            z, h, controller_state, f0 = result.y_end, result.h_next, result.controller_state, result.f_end
            for key in ("steps", "accepted", "rejected"):
                stats[key] += result.stats[key]
            adjoint_nfe += result.stats["nfe"]
            del steps, trajectory, dynamics

        stats.update(nfe=adjoint_nfe + setup.nfe, nvjp=adjoint_nfe, adjoint_nfe=adjoint_nfe, replay_nfe=setup.nfe,
                     replay_error=setup.replay_error)
        if estimate is not None:
            stats["parameter_error"] = estimate.ratio([z[n:]], parameter_tolerance(problem, options.rtol, "rtol"),
                                                      parameter_tolerance(problem, options.atol, "atol", scale), p,
                                                      stats["accepted"])
        grad_params = split_like(z[n:], params) if params else ()
        return (None,) * 5 + (z[:n],) + tuple(grad_params), stats["parameter_error"]

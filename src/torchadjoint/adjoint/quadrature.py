"""Quadrature (Gauss) adjoint: only ``a_y`` is integrated backwards; ``dL/dθ`` by quadrature.

The parameter adjoint never feeds back into the dynamics, so it need not be a state of
the backward solve at all::

    dL/dθ = ∫_{t_0}^{t_N} a_y(t) · ∂f/∂θ (t, y(t)) dt

Backward: one solve of ``z = [y, a_y]`` (2n) from the last output time to the first, ``y``
re-solved backwards as in :class:`~torchadjoint.Backsolve`, with the same jumps at the
output times (``a_y += ∂L/∂y(t_i)``, ``y`` reset to the stored forward value). Each stage
is one call of ``f`` and one vector-Jacobian product **with respect to y alone**: no
weight gradients per stage, and no ``p``-long vector in the stage combinations, the error
estimate or the dense output. After each accepted step the dense output gives ``y`` and
``a_y`` at the ``K`` Gauss–Legendre nodes of the step, and the step's share of the integral
is **one** ``torch.autograd.grad`` call: the graphs of ``f`` at the K nodes, differentiated
with respect to the parameters with the weighted adjoints as output gradients.

Per backward step this costs, against backsolve: ``K`` extra calls of ``f`` and one
parameter VJP instead of one parameter VJP per stage (7 per dopri5 step) and ``p``-long
stage arithmetic. It wins when the parameters are many (the VJP and the ``p``-long
arithmetic dominate); with few parameters the extra calls of ``f`` make it slower.

Accuracy: ``a_θ`` is not error-controlled step by step (the seminorm argument made
exact); it is as accurate as the quadrature on the steps chosen for ``(y, a_y)``. A rule of
``K`` nodes integrates polynomials of degree ``2K - 1`` exactly; the default
``K = ceil((order + 1) / 2)`` (3 for dopri5) keeps the rule's error below the method's.
The interpolant is the solver's dense output (its own continuous extension, or cubic
Hermite), so the quadrature's accuracy is bounded by the dense output's order.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..controller import rms_norm
from ..integrate import Landing, StepInfo, integrate
from ..interpolation import dense_weights, needs_f1
from ..options import SolverOptions, resolve_method
from ..problem import Problem, flat_tolerance, make_controller, make_flat_func, make_grid
from .backsolve import ReconstructionWarning
from .base import GradientMethod, refuse_double_backward

NormChoice = Union[str, Callable]
FlatFunc = Callable[[float, torch.Tensor], torch.Tensor]


class Quadrature(GradientMethod):
    """Continuous adjoint with ``a_θ`` by Gauss–Legendre quadrature on each backward step.

    Args:
        rtol, atol: tolerances of the backward solve of ``(y, a_y)`` (default: the forward's).
        method: the backward solver (default: the forward's).
        nodes: Gauss–Legendre nodes per backward step (default ``ceil((order + 1) / 2)``
            of the backward method, at most 4).
        norm: ``"rms"`` (default; error control on ``y`` and ``a_y`` together) or a callable
            receiving the scaled errors ``(y, a_y)`` as flat (n,) tensors and returning a
            scalar tensor.
        options: further backward solver options (``first_step``, ``max_num_steps``,
            ``safety``, ``step_size`` for fixed-step methods, ...).
        reconstruction_warning: warn when the re-solved ``y`` at an output time differs
            from the forward's by more than this many times the tolerance (RMS-scaled);
            ``None`` silences the check.

    ``stats["backward"]`` holds backsolve's keys (``nfe`` counts evaluations of the
    ``(y, a_y)`` dynamics, each one call of ``f`` and one VJP with respect to ``y``) plus
    ``quadrature_nfe`` (calls of ``f`` at the Gauss nodes), ``quadrature_vjps`` (parameter
    VJP calls, one per backward step) and ``nodes``.
    """

    name = "quadrature"

    def __init__(
        self,
        rtol=None,
        atol=None,
        method: Optional[str] = None,
        nodes: Optional[int] = None,
        norm: NormChoice = "rms",
        options: Optional[dict] = None,
        reconstruction_warning: Optional[float] = 100.0,
    ):
        if method is not None:
            resolve_method(method, "Quadrature(method=...)")
        if nodes is not None and (not isinstance(nodes, int) or isinstance(nodes, bool) or not 1 <= nodes <= 16):
            raise ValueError(f"Quadrature(nodes=...) must be an integer from 1 to 16 (Gauss nodes per step), got {nodes!r}")
        if not (norm == "rms" or callable(norm)):
            raise ValueError(f"Quadrature(norm=...) must be 'rms' or a callable (y_err, a_err) -> scalar, got {norm!r}")
        if options is not None and not isinstance(options, dict):
            raise TypeError(f"Quadrature(options=...) must be a dict of solver options, got {type(options).__name__}")
        if reconstruction_warning is not None and not reconstruction_warning > 0:
            raise ValueError(f"Quadrature(reconstruction_warning=...) must be positive or None, got {reconstruction_warning!r}")
        self.rtol, self.atol, self.method, self.nodes, self.norm = rtol, atol, method, nodes, norm
        self.options = dict(options or {})
        self.reconstruction_warning = reconstruction_warning

    def __repr__(self) -> str:
        return f"Quadrature(method={self.method!r}, nodes={self.nodes!r})"

    def backward_options(self, forward: SolverOptions) -> SolverOptions:
        """Forward options overridden by this method's backward settings (validated)."""
        fields = dict(
            method=self.method or forward.method,
            rtol=forward.rtol if self.rtol is None else self.rtol,
            atol=forward.atol if self.atol is None else self.atol,
            max_num_steps=forward.max_num_steps, safety=forward.safety, ifactor=forward.ifactor,
            dfactor=forward.dfactor, pcoeff=forward.pcoeff, icoeff=forward.icoeff,
            min_step=forward.min_step, max_step=forward.max_step,
            step_t=forward.step_t, jump_t=forward.jump_t,
        )
        if not resolve_method(fields["method"]).adaptive:
            fields["step_size"] = forward.step_size
        fields.update(self.options)
        return SolverOptions.build(**fields)

    def node_count(self, backward: SolverOptions) -> int:
        if self.nodes is not None:
            return self.nodes
        return max(1, min(4, math.ceil((backward.method.order + 1) / 2)))

    def run(self, problem: Problem, options: SolverOptions, y0: torch.Tensor, stats: dict) -> torch.Tensor:
        backward = self.backward_options(options)
        return _QuadratureFunction.apply(self, problem, options, backward, stats, y0, *problem.params)


def gauss_legendre(k: int) -> Tuple[List[float], List[float]]:
    """Nodes (fractions in (0, 1)) and weights (summing to 1) of the k-point rule on [0, 1]."""
    x, w = np.polynomial.legendre.leggauss(k)
    return [float(v) for v in (x + 1) / 2], [float(v) for v in w / 2]


def adjoint_dynamics(flat_func: FlatFunc, n: int) -> FlatFunc:
    """``F(t, z) -> dz/dt`` for ``z = [y, a_y]`` (2n,): ``[f, -a_y · ∂f/∂y]``, one VJP in ``y`` only."""

    def dynamics(t: float, z: torch.Tensor) -> torch.Tensor:
        a = z[n:]
        with torch.enable_grad():
            y = z[:n].detach().requires_grad_(True)
            fy = flat_func(t, y)
            # Only y is an input: autograd skips every weight-gradient kernel.
            (vjp,) = torch.autograd.grad(fy, (y,), a, allow_unused=True) if fy.requires_grad else (None,)
        if vjp is None:
            vjp = torch.zeros_like(a)
        return torch.cat([fy.detach(), vjp.neg()])

    return dynamics


class ParameterQuadrature:
    """Accumulates ``∫ a_y · ∂f/∂θ dt`` step by step from the backward solve's accepted steps.

    For a step from ``τ0`` to ``τ0 + h`` (``h < 0`` for a solve running back in time) the
    share of ``a_θ(t_0) = -∫_{t_N}^{t_0} a_y ∂f/∂θ dt`` is ``-h Σ_k w_k a_y(τ_k) ∂f/∂θ(τ_k, y(τ_k))``.
    Non-FSAL methods without their own dense output need ``f`` at the step's end for the
    Hermite interpolant: it is the next step's first stage, so the step waits for it
    (:meth:`flush` evaluates it where the state is about to jump, or at the very end).
    """

    def __init__(self, flat_func: FlatFunc, dynamics: FlatFunc, params: Sequence[torch.Tensor], n: int, tableau, k: int, dtype, device):
        self.flat_func, self.dynamics, self.params, self.n = flat_func, dynamics, tuple(params), n
        self.coeffs = tableau.as_tensors(dtype, device)
        self.wants_f1 = needs_f1(self.coeffs, tableau.stages)
        fractions, weights = gauss_legendre(k)
        self.fractions = fractions
        self.weights = torch.tensor(weights, dtype=dtype, device=device)
        self.theta_weights = dense_weights(self.coeffs, torch.tensor(fractions, dtype=dtype, device=device))
        self.grads = [torch.zeros_like(p) for p in self.params]
        self.pending: Optional[StepInfo] = None
        self.nfe = 0  # calls of f at the nodes
        self.vjps = 0
        self.extra_dynamics = 0  # evaluations of the (y, a_y) dynamics made only for Hermite f1

    def on_accept(self, step: StepInfo) -> None:
        if self.pending is not None:
            # The pending step's end state is this step's start state (no jump between):
            # f there is this step's first stage.
            self._integrate(self.pending, step.stages[0])
            self.pending = None
        if step.f1 is None and self.wants_f1:
            self.pending = step
        else:
            self._integrate(step, step.f1)

    def flush(self, t: float = None, z: torch.Tensor = None) -> None:
        """Finish a waiting step now (before a jump changes the state at its end)."""
        if self.pending is not None:
            step = self.pending
            self.pending = None
            f1 = self.dynamics(step.t1, step.y1)
            self.extra_dynamics += 1
            self._integrate(step, f1)

    def _integrate(self, step: StepInfo, f1: Optional[torch.Tensor]) -> None:
        h = step.t1 - step.t0
        stages = step.stages
        k = stages if self.theta_weights.shape[1] == stages.shape[0] else torch.cat([stages, f1[None, :]])
        z_nodes = torch.addmm(step.y0[None, :], self.theta_weights, k, alpha=h)  # (K, 2n)
        n = self.n
        outputs, cotangents = [], []
        with torch.enable_grad():
            for j, frac in enumerate(self.fractions):
                outputs.append(self.flat_func(step.t0 + frac * h, z_nodes[j, :n].detach()))
        self.nfe += len(self.fractions)
        # One VJP for all nodes: output gradients -h w_k a_y(τ_k).
        cotangents = list((z_nodes[:, n:] * (self.weights * -h)[:, None]).unbind(0))
        live = [(o, c) for o, c in zip(outputs, cotangents) if o.requires_grad]
        if not live:
            return
        grads = torch.autograd.grad([o for o, _ in live], self.params, [c for _, c in live], allow_unused=True)
        self.vjps += 1
        for acc, g in zip(self.grads, grads):
            if g is not None:
                acc.add_(g)


class _QuadratureFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, method: Quadrature, problem: Problem, options, backward, stats, y0, *params):
        from ..problem import solve_flat

        with torch.no_grad():
            result = solve_flat(problem, options, y0)
        stats["forward"] = result.stats
        ctx.method, ctx.problem, ctx.forward_options, ctx.backward, ctx.stats = method, problem, options, backward, stats
        ctx.save_for_backward(result.ys)
        return result.ys

    @staticmethod
    def backward(ctx, grad_ys):
        if torch.is_grad_enabled():
            refuse_double_backward("quadrature")
        (ys,) = ctx.saved_tensors
        problem, method, options = ctx.problem, ctx.method, ctx.backward
        params = problem.params
        times = problem.times
        n = ys.shape[1]
        k = method.node_count(options)
        if len(times) == 1:
            ctx.stats["backward"] = dict(nfe=0, steps=0, accepted=0, rejected=0, reconstruction_error=0.0,
                                         quadrature_nfe=0, quadrature_vjps=0, nodes=k)
            return (None,) * 5 + (grad_ys[0],) + tuple(torch.zeros_like(x) for x in params)

        # Only the parameters autograd asks for are integrated.
        wanted = [i for i, p in enumerate(params) if ctx.needs_input_grad[6 + i]]
        flat_func = make_flat_func(problem)
        dynamics = adjoint_dynamics(flat_func, n)
        quad = ParameterQuadrature(flat_func, dynamics, [params[i] for i in wanted], n, options.method, k, ys.dtype, ys.device)
        controller = make_controller(
            problem, options,
            norm=_adjoint_norm(method.norm, n),
            rtol=_doubled_tolerance(problem, options.rtol, "rtol"),
            atol=_doubled_tolerance(problem, options.atol, "atol"),
        )
        rtol_y = flat_tolerance(problem, ctx.forward_options.rtol, "rtol")
        atol_y = flat_tolerance(problem, ctx.forward_options.atol, "atol")
        drift: List[torch.Tensor] = []

        def make_jump(i: int):
            def jump(t: float, z: torch.Tensor) -> torch.Tensor:
                quad.flush()  # the waiting step's end state is the one before the jump
                y_forward = ys[i]
                drift.append((z[:n] - y_forward) / (atol_y + rtol_y * y_forward.abs()))
                z = z.clone()
                z[:n] = y_forward  # the forward pass knew y here exactly
                z[n:] += grad_ys[i]
                return z

            return jump

        def flush_at_discontinuity(t: float, z: torch.Tensor) -> None:
            quad.flush()
            return None

        looked_at = grad_ys.any(dim=1).tolist()
        landings = [Landing(times[i], [make_jump(i)]) for i in range(len(times) - 1) if looked_at[i]]
        if not looked_at[0]:
            landings.append(Landing(times[0], [make_jump(0)]))
        # The forward's step and jump times: a backward step must not straddle a kink of f.
        landings += [Landing(t) for t in options.step_t]
        landings += [Landing(t, [flush_at_discontinuity], restart=True) for t in options.jump_t]
        z0 = torch.cat([ys[-1], grad_ys[-1]])
        on_accept = quad.on_accept if wanted else None
        result = integrate(
            dynamics, z0, times[-1], times[0], (), options.method,
            controller=controller,
            grid=make_grid(problem, options, ys[-1], times[-1], times[0]),
            landings=landings,
            max_num_steps=options.max_num_steps,
            on_accept=on_accept,
            label="backward",
        )
        quad.flush()
        z = result.y_end
        errors = [float(rms_norm(d)) for d in drift]
        reconstruction = max(errors) if errors else 0.0
        stats = dict(result.stats, reconstruction_error=reconstruction, quadrature_nfe=quad.nfe,
                     quadrature_vjps=quad.vjps, nodes=k)
        stats["nfe"] += quad.extra_dynamics
        ctx.stats["backward"] = stats
        threshold = method.reconstruction_warning
        if threshold is not None and not reconstruction <= threshold:
            warnings.warn(
                f"the quadrature adjoint re-computed y(t) with an error of {reconstruction:.3g}× the tolerance "
                f"(threshold {threshold:g}): the gradient is not to be trusted. The dynamics are probably "
                f"contracting forwards (so expanding backwards); use gradient=Direct() or a checkpointed adjoint, "
                f"or tighten rtol/atol. Silence with Quadrature(reconstruction_warning=None).",
                ReconstructionWarning,
                stacklevel=2,
            )
        grad_params: List[Optional[torch.Tensor]] = [None] * len(params)
        for i, g in zip(wanted, quad.grads):
            grad_params[i] = g
        return (None,) * 5 + (z[n:],) + tuple(grad_params)


def _doubled_tolerance(problem: Problem, value, name: str):
    """Tolerance for ``[y, a_y]``: y's for both."""
    tol = flat_tolerance(problem, value, name)
    return tol if isinstance(tol, float) else torch.cat([tol, tol])


def _adjoint_norm(choice: NormChoice, n: int):
    if choice == "rms":
        return rms_norm

    def user_norm(x: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(choice((x[:n], x[n:])))

    return user_norm

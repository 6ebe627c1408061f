"""Quadrature (Gauss) adjoint: only ``a_y`` is integrated backwards; ``dL/dθ`` by quadrature.

The parameter adjoint never feeds back into the dynamics, so it need not be a state of
the backward solve at all::

    dL/dθ = ∫_{t_0}^{t_N} a_y(t) · ∂f/∂θ (t, y(t)) dt

Backward: one solve of ``z = [y, a_y]`` (2n) from the last output time to the first, ``y``
re-solved backwards as in :class:`~torchadjoint.Backsolve`, with the same jumps at the
output times (``a_y += ∂L/∂y(t_i)``, ``y`` reset to the stored forward value). Each stage
is one call of ``f`` and one vector-Jacobian product **with respect to y alone**: no
weight-gradient kernels per stage, and no ``p``-long vector in the stage arithmetic.
After each accepted step the dense output gives ``y`` and ``a_y`` at the ``K``
Gauss–Legendre nodes of the step; the nodes wait in a buffer, and the buffered nodes of
many steps are evaluated together: one call of ``f`` batched over the nodes
(``torch.func.vmap`` over ``(t, y)``, so time-dependent ``f`` is fine) and **one**
``torch.autograd.grad`` with respect to the parameters, the weighted adjoints as output
gradients. A linear layer's weight gradient for all those nodes is then one matrix
product instead of one per stage.

Cost per backward step against backsolve (dopri5: 6 new stages per step): backsolve
computes 6 weight gradients; the quadrature adjoint computes none per stage, and pays
``K = 3`` node evaluations of ``f`` (and one for a_θ's error estimate) and their share of a
batched parameter VJP. It wins
when parameter gradients dominate the cost of a VJP (many parameters, small batches);
with few parameters the extra calls of ``f`` make it slower.

``batching`` says how the nodes are evaluated: ``"vmap"`` (default; falls back to
``"loop"`` when ``f`` cannot be vmapped, e.g. Python control flow on tensor values),
``"stack"`` (the nodes' states concatenated along the first dimension in a plain call of
``f``: for autonomous ``f`` acting row by row, checked once per backward pass) or
``"loop"`` (one call of ``f`` per node and one VJP per step).

Accuracy: ``a_θ`` is not error-controlled step by step (the seminorm argument made
exact); it is as accurate as the quadrature on the steps chosen for ``(y, a_y)``. Its error
is estimated (a lower rule that uses one more node per step, not shared with the Gauss rule,
:func:`estimate_rule`; one more batched parameter VJP, :meth:`ParameterQuadrature._accumulate`
and :meth:`ParameterQuadrature.gauss_error_estimate`); when too large, the pass is redone as
``Backsolve(norm="full")`` (``stats["backward"]["seminorm_fallback"]``, see
:mod:`torchadjoint.adjoint.trust`). A rule of
``K`` nodes integrates polynomials of degree ``2K - 1`` exactly; the default
``K = ceil((order + 1) / 2)`` (3 for dopri5) keeps the rule's error below the method's.
The interpolant is the solver's dense output (its own continuous extension, or cubic
Hermite), so the quadrature's accuracy is bounded by the dense output's order.
"""
from __future__ import annotations

import math
import warnings
from types import SimpleNamespace
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import SolveError
from ..integrate import Landing, StepInfo, beside, integrate
from ..interpolation import dense_weights, needs_f1
from ..options import SolverOptions
from ..problem import Problem, make_flat_func, make_grid
from ..step import FlatFunc
from .backsolve import Backsolve
from .backsolve import _backward_pass as backsolve_pass
from .base import AdjointCall, adjoint_function, adjoint_scale, parameter_tolerance
from .settings import ContinuousAdjoint, NormChoice
from .trust import (ExplosionGuard, ParameterErrorEstimate, ReconstructionCheck, check_threshold, explain_backward_failure,
                    refuse_nonfinite_gradient, with_seminorm_fallback)
from .vjp import AdjointDynamics, DeclaredTensors, solve_without_graph

BATCHING = ("vmap", "stack", "loop")
# Default chunk: nodes per batched call so that their stacked states hold about this many numbers.
CHUNK_NUMBERS = 65536


class Quadrature(ContinuousAdjoint):
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
            from the forward's by more than this many times the tolerance (RMS-scaled; a
            fixed-step method is judged with ``rtol = 1e-4``); ``None`` silences the warning.
        reconstruction_error: raise :class:`~torchadjoint.SolveError` when the drift is this
            many times ``y`` itself (default 1), or the drift or the gradient is non-finite;
            ``None`` warns instead (see :mod:`torchadjoint.adjoint.trust`).
        batching: how ``f`` is evaluated at the buffered Gauss nodes of many steps:
            ``"vmap"`` (default) one ``torch.func.vmap`` call over the nodes' ``(t, y)``,
            falling back to ``"loop"`` if ``f`` cannot be vmapped (a RuntimeWarning, once per
            Quadrature object, and ``vmap_fallback`` in the stats); ``"stack"`` one plain
            call on the nodes' states concatenated along the first dimension (an (M·B, ...)
            tensor for a (B, ...) state), only right for ``f`` that treats the first
            dimension as a batch and does not depend on ``t`` (checked at the first step;
            ValueError otherwise); ``"loop"`` one call per node, one VJP per step.
        chunk: the most nodes evaluated in one call (default: as many as keep the
            stacked states under 65536 numbers, between K and 64). Memory: the graph of
            ``f`` for that many nodes at once.

    After ``backward()``, ``solution.stats["backward"]`` holds ``nfe`` (evaluations of ``f``:
    one per stage of the ``(y, a_y)`` solve, plus those at the Gauss nodes), ``nvjp``
    (``torch.autograd.grad`` calls: one per stage, with respect to ``y`` only, plus one per
    batched call of the nodes for the parameters), ``steps``, ``accepted``, ``rejected``,
    ``reconstruction_error`` (the drift of the re-solved ``y(t_0)`` in multiples of the
    backward tolerance, the forward's by default: RMS of ``(y_back - y_fwd) / (atol + rtol·|y_fwd|)``),
    ``reconstruction_error_max`` (largest over the output times visited; the warning
    fires when it exceeds ``reconstruction_warning``, default 100), and
    ``quadrature_nfe`` (evaluations of ``f`` at the nodes: K per step, plus one per step for
    the error estimate of ``a_θ`` where it is made, also when stacked into fewer calls),
    ``quadrature_vjps`` (parameter VJPs), ``estimate_vjps`` (parameter VJPs for the error
    estimate, one per batched call), ``nodes`` (K), ``parameter_error`` and
    ``seminorm_fallback`` (see :mod:`torchadjoint.adjoint.trust`), and ``vmap_fallback`` (1
    when ``batching="vmap"`` could not batch ``f`` and looped instead).
    """

    name = "quadrature"
    norms = ("rms",)
    parts = ("y", "a_y")

    def __init__(
        self,
        rtol=None,
        atol=None,
        method: Optional[str] = None,
        nodes: Optional[int] = None,
        norm: NormChoice = "rms",
        options: Optional[dict] = None,
        reconstruction_warning: Optional[float] = 100.0,
        batching: str = "vmap",
        chunk: Optional[int] = None,
        reconstruction_error: Optional[float] = 1.0,
    ):
        self._set_backward(rtol, atol, method, norm, options)
        if nodes is not None and (not isinstance(nodes, int) or isinstance(nodes, bool) or not 1 <= nodes <= 16):
            raise ValueError(f"Quadrature(nodes=...) must be an integer from 1 to 16 (Gauss nodes per step), got {nodes!r}")
        if batching not in BATCHING:
            raise ValueError(f"Quadrature(batching=...) must be one of {BATCHING}, got {batching!r}")
        if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
            raise ValueError(f"Quadrature(chunk=...) must be a positive integer (nodes per call) or None, got {chunk!r}")
        check_threshold(reconstruction_warning, "Quadrature", "reconstruction_warning")
        self.nodes, self.batching, self.chunk = nodes, batching, chunk
        self._vmap_fallback_told = False
        self.reconstruction_warning = reconstruction_warning
        self.reconstruction_error = check_threshold(reconstruction_error, "Quadrature", "reconstruction_error")

    def __repr__(self) -> str:
        return f"Quadrature(method={self.method!r}, nodes={self.nodes!r}, batching={self.batching!r})"

    def tell_vmap_fallback(self, error: BaseException) -> None:
        """Once per method object: ``batching="vmap"`` could not batch ``f`` and evaluated the
        nodes one call per node instead (``stats["backward"]["vmap_fallback"]`` says so each time)."""
        if self._vmap_fallback_told:
            return
        self._vmap_fallback_told = True
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        warnings.warn(
            f"Quadrature(batching='vmap'): torch.func.vmap cannot batch f ({type(error).__name__}: {reason[:200]}); its "
            f"Gauss nodes are evaluated one call per node instead (same gradient, slower). Pass "
            f"Quadrature(batching='loop') to choose that and silence this warning",
            RuntimeWarning, stacklevel=4,
        )

    def node_count(self, backward: SolverOptions) -> int:
        if self.nodes is not None:
            return self.nodes
        return max(1, min(4, math.ceil((backward.method.order + 1) / 2)))

    def run(self, problem: Problem, options: SolverOptions, y0: torch.Tensor, stats: dict) -> torch.Tensor:
        if self.batching == "stack" and not (problem.flattener.is_tensor and len(problem.flattener.shapes[0]) >= 1):
            raise ValueError(
                f"Quadrature(batching='stack') needs a tensor state with a batch dimension first; the state has "
                f"shapes {problem.flattener.shapes}. Use Quadrature(batching='vmap')"
            )
        backward = self.backward_options(options)
        return AdjointCall(self, problem, options, backward, stats).apply(_QuadratureFunction, y0)


def gauss_legendre(k: int) -> Tuple[List[float], List[float]]:
    """Nodes (fractions in (0, 1)) and weights (summing to 1) of the k-point rule on [0, 1]."""
    x, w = np.polynomial.legendre.leggauss(k)
    return [float(v) for v in (x + 1) / 2], [float(v) for v in w / 2]


# The error estimate's own node, as a fraction of the step: golden section, so that it shares no
# rational spacing with any Gauss rule's nodes (a sinusoid cannot look alike at all of them).
ESTIMATE_FRACTION = (3.0 - math.sqrt(5.0)) / 2.0


def estimate_rule(fractions: Sequence[float], weights: Sequence[float],
                  extra: float = ESTIMATE_FRACTION) -> Tuple[List[float], List[float]]:
    """The error estimate of the k-point Gauss rule ``(fractions, weights)`` on [0, 1]:
    ``(nodes, null_weights)`` with ``nodes`` the Gauss nodes and one more, ``extra``, and
    ``null_weights`` (k + 1) the Gauss weights (0 at ``extra``) minus those of the
    interpolatory rule on ``extra`` and all Gauss nodes but the last (k nodes, exact to degree
    k - 1). Their sum with the integrand's values estimates that lower rule's error, an upper
    estimate of the Gauss rule's. The lower rule must use a node the Gauss rule does not:
    on the Gauss nodes alone it agrees with the Gauss rule on every integrand whose samples
    at those nodes look like a low-degree polynomial, an aliased oscillation among them."""
    k = len(fractions)
    lower_nodes = np.array(list(fractions[:-1]) + [extra])
    moments = np.array([1.0 / (j + 1) for j in range(k)])  # ∫_0^1 t^j dt
    lower = np.linalg.solve(np.vander(lower_nodes, increasing=True).T, moments)
    # Nodes in the order [Gauss..., extra]: the lower rule's weight for the last Gauss node is 0.
    lower_on_nodes = list(lower[:-1]) + [0.0, lower[-1]]
    return list(fractions) + [extra], [float(w - v) for w, v in zip(list(weights) + [0.0], lower_on_nodes)]


def step_sign(index: int) -> float:
    """A fixed pseudo-random sign per accepted step (SplitMix64's hash of its index), the same
    on every run and every process: the error estimate's second probe (see
    :meth:`ParameterQuadrature._accumulate`). A hash, not a pattern: an integrand whose steps'
    errors alternate with some period must not line up with the signs."""
    mask = (1 << 64) - 1
    x = (index * 0x9E3779B97F4A7C15) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return 1.0 - 2.0 * ((x ^ (x >> 31)) >> 63)  # the top bit: the best mixed


class ParameterQuadrature:
    """Accumulates ``∫ a_y · ∂f/∂θ dt`` step by step from the backward solve's accepted steps.

    For a step from ``τ0`` to ``τ0 + h`` (``h < 0`` for a solve running back in time) the
    share of ``a_θ(t_0) = -∫_{t_N}^{t_0} a_y ∂f/∂θ dt`` is ``-h Σ_k w_k a_y(τ_k) ∂f/∂θ(τ_k, y(τ_k))``.
    Non-FSAL methods without their own dense output need ``f`` at the step's end for the
    Hermite interpolant: it is the next step's first stage, so the step waits for it
    (:meth:`flush` evaluates it where the state is about to jump, or at the very end).

    The nodes ``(τ_k, y(τ_k), -h w_k a_y(τ_k))`` then wait in a buffer until ``chunk``
    nodes are ready (or :meth:`evaluate_buffer` at the end), and are evaluated together
    as ``batching`` says (see :class:`Quadrature`).

    With ``estimate``, each step adds one node of its own (:func:`estimate_rule`) and its
    error cotangents ``-h ν_k a_y(τ_k)`` ride along; see :meth:`_accumulate` and
    :meth:`gauss_error_estimate` for how they become ``a_θ``'s error estimate.

    Args:
        node_func: ``node_func(t: 0-dim tensor, y: (n,)) -> (n,)``, vmappable (no checks).
        stack: ``(func, time_tensor, shape)`` for ``batching="stack"``.
    """

    def __init__(self, flat_func: FlatFunc, dynamics: FlatFunc, params: Sequence[torch.Tensor], n: int, tableau, k: int,
                 dtype, device, *, batching: str = "loop", node_func=None, stack=None, chunk: Optional[int] = None,
                 estimate: bool = False):
        self.flat_func, self.dynamics, self.params, self.n = flat_func, dynamics, tuple(params), n
        self.coeffs = tableau.as_tensors(dtype, device)
        self.wants_f1 = needs_f1(self.coeffs, tableau.stages)
        fractions, weights = gauss_legendre(k)
        # a_θ's error estimate (trust.ParameterErrorEstimate): one more node per step, and one
        # more parameter VJP per batch (_accumulate).
        if estimate:
            fractions, errors = estimate_rule(fractions, weights)
            weights = weights + [0.0]  # the estimate's node adds nothing to the gradient
        self.fractions = fractions  # the nodes of one step: [Gauss..., the estimate's]
        self.weights = torch.tensor(weights, dtype=dtype, device=device)
        self.theta_weights = dense_weights(self.coeffs, torch.tensor(fractions, dtype=dtype, device=device))
        self.error_weights = torch.tensor(errors, dtype=dtype, device=device) if estimate else None
        self.estimate = ParameterErrorEstimate()
        self.batch_grad_norms: Optional[torch.Tensor] = None  # Σ over batches of ‖the batch's share of a_θ‖
        self.steps = 0  # steps integrated (the index of step_sign)
        self.grads = [torch.zeros_like(p) for p in self.params]
        self.pending: Optional[StepInfo] = None
        self.batching, self.node_func, self.stack = batching, node_func, stack
        self.dtype, self.device = dtype, device
        per_step = len(fractions)
        self.chunk = chunk if chunk is not None else max(per_step, min(64, CHUNK_NUMBERS // max(n, 1)))
        self.buffer: List[Tuple[List[float], torch.Tensor, torch.Tensor]] = []
        self.buffered = 0
        self.checked = False
        self.nfe = 0  # evaluations of f at the nodes
        self.vjps = 0  # parameter VJPs for the gradient
        self.estimate_vjps = 0  # parameter VJPs for its error estimate
        self.vmap_error: Optional[BaseException] = None  # why batching="vmap" fell back to "loop"

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

    def flush(self, own_side: bool = False) -> None:
        """Finish a waiting step now (before a jump changes the state at its end).

        ``own_side``: the step ends on a discontinuity of ``f`` (``jump_t``); its end slope
        is taken just before it, on the step's side, as the solver's own stages are."""
        if self.pending is not None:
            step = self.pending
            self.pending = None
            t1 = beside(step.t1, step.t0, step.y1.dtype) if own_side else step.t1
            self._integrate(step, self.dynamics(t1, step.y1))

    def _integrate(self, step: StepInfo, f1: Optional[torch.Tensor]) -> None:
        h = step.h if step.h is not None else step.t1 - step.t0  # exact: at a large |t| t1 - t0 rounds
        stages = step.stages
        k = stages if self.theta_weights.shape[1] == stages.shape[0] else torch.cat([stages, f1[None, :]])
        z_nodes = torch.addmm(step.y0[None, :], self.theta_weights, k, alpha=h)  # (K, 2n)
        n = self.n
        times = [step.t0 + frac * h for frac in self.fractions]
        y_nodes = z_nodes[:, :n].detach()
        # Output gradients of the nodes' f: -h w_k a_y(τ_k).
        cotangent = z_nodes[:, n:] * (self.weights * -h)[:, None]
        if self.error_weights is not None:  # the error estimate's cotangent rides along, weighted per step
            weight = 1.0 + 0.5 * step_sign(self.steps)
            cotangent = torch.cat([cotangent, z_nodes[:, n:] * (self.error_weights * (-h * weight))[:, None]], dim=1)
        self.steps += 1
        self.nfe += len(times)
        if self.batching == "stack" and not self.checked:
            self.checked = True
            self._check_stacking(times, y_nodes)
        self.buffer.append((times, y_nodes, cotangent))
        self.buffered += len(times)
        if self.buffered >= self.chunk:
            self.evaluate_buffer()

    def evaluate_buffer(self) -> None:
        """Evaluate the buffered nodes and add their share to the gradients."""
        if not self.buffer:
            return
        times = [t for ts, _, _ in self.buffer for t in ts]
        y_nodes = torch.cat([y for _, y, _ in self.buffer])
        cotangent = torch.cat([c for _, _, c in self.buffer])
        self.buffer, self.buffered = [], 0
        if self.batching == "vmap":
            t_nodes = torch.tensor(times, dtype=self.dtype, device=self.device)
            try:
                with torch.enable_grad():
                    values = torch.func.vmap(self.node_func)(t_nodes, y_nodes)
            except (RuntimeError, NotImplementedError) as error:
                # What vmap raises for an f it cannot batch: Python control flow on a tensor's
                # value, .item(), in-place writes into captured tensors, NumPy, an operation
                # without a batching rule. One call per node from here on; a genuine error of
                # f raises again there (the loop calls f as the solve did), so none is hidden.
                self.batching, self.vmap_error = "loop", error
            else:
                return self._accumulate(values, cotangent)
        if self.batching == "stack":
            with torch.enable_grad():
                values = self._stacked_call(y_nodes, self.stack_time)
            return self._accumulate(values, cotangent)
        # One call per node; one VJP per step (the unit the buffer was filled in).
        k = len(self.fractions)
        for i in range(0, len(times), k):
            with torch.enable_grad():
                values = torch.stack([self.flat_func(t, y) for t, y in zip(times[i : i + k], y_nodes[i : i + k])])
            self._accumulate(values, cotangent[i : i + k])

    def _accumulate(self, values: torch.Tensor, cotangent: torch.Tensor) -> None:
        """Add the gradient of the nodes' ``f`` (m, n) under ``cotangent`` (m, n), or (m, 2n)
        with the error estimate's cotangent, to :attr:`grads`.

        One parameter VJP gives the sum over the batch's steps, in which per-step error
        estimates of alternating sign cancel: an integrand oscillating many times per step
        (aliased) gives each step an error as large as its integral, with a sign that varies
        from step to step, and their plain sum came out 35x smaller than the sum of their
        norms (an aliased gradient 2500x off passed that way). So each step's error enters
        with a weight ``1 ± 1/2``, the sign a fixed pseudo-random one per step
        (:func:`step_sign`): the sum is ``A + B/2``, ``A`` the plain sum (errors of one sign,
        the smooth case: at least half of it survives) and ``B`` a randomly signed one, about
        ``sqrt(Σ_s ‖e_s‖²)`` whatever the signs of the steps' errors. Both are small together
        only by coincidence, and it costs one VJP, not two."""
        if not values.requires_grad:  # f does not depend on the parameters
            return
        # No undeclared-tensor check here: the nodes lie inside steps whose every stage
        # AdjointDynamics checked, and f may make its own leaves from the detached node states.
        estimating = self.error_weights is not None
        n = self.n
        grads = torch.autograd.grad(values, self.params, cotangent[:, :n], allow_unused=True, retain_graph=estimating)
        self.vjps += 1
        for acc, g in zip(self.grads, grads):
            if g is not None:
                acc.add_(g)
        if not estimating:
            return
        errors = torch.autograd.grad(values, self.params, cotangent[:, n:], allow_unused=True)
        self.estimate_vjps += 1
        self.estimate.add_norm(_norm(errors, values))
        share = _norm(grads, values)
        self.batch_grad_norms = share if self.batch_grad_norms is None else self.batch_grad_norms + share

    def gauss_error_estimate(self, atol: float) -> None:
        """Turn the accumulated lower rule's error estimate ``E`` into one for the Gauss rule.

        The lower rule (degree k - 1) errs by about ``G (h/ℓ)^k`` for an integrand that varies
        on a scale ``ℓ``, the Gauss rule by ``G (h/ℓ)^(2k)``: so ``r = E / G`` (capped at 1)
        gives ``E_gauss ≈ E r`` (QUADPACK scales its estimate alike). ``G`` is the sum over the
        batches of the norm of each batch's share of ``a_θ``, the same sum ``E`` is taken
        over, so that ``r`` measures how well the steps resolve the integrand, also where
        the steps' shares (an aliased integrand's, of random sign) cancel in the total.
        Where the integrand is under-resolved, ``r`` is near 1 and the estimate stays ``E``.
        One norm over the parameters, not per entry: a single entry near 0 says nothing about
        how well the steps resolve the integrand."""
        if self.estimate.total is None or self.batch_grad_norms is None:
            return
        r = float(self.estimate.total / (self.batch_grad_norms + atol))
        self.estimate.rescale(min(r, 1.0) if math.isfinite(r) else 1.0)

    def _stacked_call(self, y_nodes: torch.Tensor, t: float) -> torch.Tensor:
        """``f`` on the states ``y_nodes`` (m, n) stacked along the first dimension: (m, n)."""
        func, time_tensor, shape = self.stack
        m = y_nodes.shape[0]
        stacked_shape = (m * shape[0], *shape[1:])
        try:
            out = func(time_tensor(t), y_nodes.reshape(stacked_shape))
        except RuntimeError as error:
            raise ValueError(
                f"Quadrature(batching='stack'): f failed on a stacked state of shape {stacked_shape} ({error}); f must "
                f"act row by row on the first dimension. Use Quadrature(batching='vmap')"
            ) from error
        if not isinstance(out, torch.Tensor) or out.shape != stacked_shape:
            raise ValueError(
                f"Quadrature(batching='stack'): f on a stacked state of shape {stacked_shape} returned "
                f"{type(out).__name__ if not isinstance(out, torch.Tensor) else tuple(out.shape)}; f must act row by "
                f"row on the first dimension. Use Quadrature(batching='vmap')"
            )
        return out.reshape(m, -1)

    def _check_stacking(self, times: List[float], y_nodes: torch.Tensor) -> None:
        """Once per backward pass: the stacked call must give what one call per node gives."""
        self.stack_time = 0.5 * (times[0] + times[-1])
        with torch.no_grad():
            single = torch.stack([self.flat_func(t, y) for t, y in zip(times, y_nodes)])
            stacked = self._stacked_call(y_nodes, self.stack_time)
        self.nfe += 2 * len(times)
        eps = torch.finfo(single.dtype).eps
        scale = single.abs().max().clamp_min(1.0)
        if not bool(((stacked - single).abs() <= 1e3 * eps * scale).all()):
            raise ValueError(
                "Quadrature(batching='stack'): f evaluated on the Gauss nodes stacked along the first dimension "
                "differs from f evaluated at each node: f depends on t, or mixes the rows of its state. Use "
                "Quadrature(batching='vmap')"
            )


def _norm(parts: Sequence[Optional[torch.Tensor]], like: torch.Tensor) -> torch.Tensor:
    """The 2-norm over all parameter parts (None: zero) as a 0-dim tensor (no host sync);
    ``like`` gives the dtype and device of a zero."""
    norms = [torch.linalg.vector_norm(p) for p in parts if p is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else like.new_zeros(())


def vmappable_func(problem: Problem) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(t: 0-dim tensor, y: (n,)) -> (n,)``: the user's ``func`` on flat states, without
    the per-call checks of :func:`make_flat_func` (the forward solve made them)."""
    func, flattener = problem.func, problem.flattener
    if flattener.is_tensor:
        shape = torch.Size(flattener.shapes[0])
        return lambda t, y: func(t, y.view(shape)).reshape(-1)

    def tree_func(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # Flattener.flatten takes a dict's entries by key, as the forward solve did.
        return flattener.flatten(func(t, flattener.unflatten(y)))

    return tree_func


def _backward(ctx, grad_ys: torch.Tensor) -> tuple:
    # When the steps sized for (y, a_y) left the quadrature of a_θ under-resolved (a_y smooth,
    # ∂f/∂θ fast in t), the pass is redone as Backsolve under the full norm, which carries
    # a_θ in the error-controlled state (trust.ParameterErrorEstimate). Both Functions take
    # (call, y0, *params) and save ys: Backsolve's pass runs on this ctx with its own call.
    call = ctx.call

    def as_backsolve():
        method = Backsolve(norm="full", reconstruction_warning=call.method.reconstruction_warning,
                           reconstruction_error=call.method.reconstruction_error)
        redo = SimpleNamespace(saved_tensors=ctx.saved_tensors, needs_input_grad=ctx.needs_input_grad,
                               flat_func=make_flat_func(call.problem),
                               call=AdjointCall(method, call.problem, call.forward, call.backward, call.stats))
        return backsolve_pass(redo, grad_ys, "full")

    return with_seminorm_fallback(call.stats, lambda: _backward_pass(ctx, grad_ys, call.method.norm), as_backsolve)


def _backward_pass(ctx, grad_ys: torch.Tensor, norm: NormChoice) -> tuple:
    """One backward solve of ``[y, a_y]`` under ``norm``, ``a_θ`` by quadrature along its
    accepted steps: (the gradients autograd wants, the a_θ error estimate in tolerance
    units), ``stats["backward"]`` filled."""
    (ys,) = ctx.saved_tensors
    call = ctx.call
    problem, method, options = call.problem, call.method, call.backward
    params, times = problem.params, problem.times
    n = ys.shape[1]
    k = method.node_count(options)
    # Only the parameters autograd asks for are integrated.
    wanted = [i for i, w in enumerate(AdjointCall.wanted(ctx)) if w]
    looked_at = grad_ys.any(dim=1).tolist()
    # The adjoint is zero after the last output the loss looks at: start there.
    last = max((i for i in range(1, len(times)) if looked_at[i]), default=0)
    if last == 0:
        call.stats["backward"] = dict(nfe=0, nvjp=0, steps=0, accepted=0, rejected=0, reconstruction_error=0.0,
                                      reconstruction_error_max=0.0, quadrature_nfe=0, quadrature_vjps=0, estimate_vjps=0,
                                      nodes=k, parameter_error=0.0, vmap_fallback=0)
        return AdjointCall.gradients(grad_ys[0], [torch.zeros_like(x) if i in wanted else None for i, x in enumerate(params)]), 0.0

    flat_func = make_flat_func(problem)
    dynamics = AdjointDynamics(flat_func, n, declared=DeclaredTensors(params, "quadrature"))  # [y, a_y]: no ∂f/∂θ per stage
    quad = ParameterQuadrature(
        flat_func, dynamics, [params[i] for i in wanted], n, options.method, k, ys.dtype, ys.device,
        batching=method.batching, node_func=vmappable_func(problem), chunk=method.chunk,
        stack=(problem.func, problem.time_tensor, tuple(problem.flattener.shapes[0])) if method.batching == "stack" else None,
        estimate=options.method.adaptive and norm == "rms",
    )
    scale = adjoint_scale(grad_ys, norm)
    check = ReconstructionCheck("Quadrature", problem, ys, options, method.reconstruction_warning,
                                method.reconstruction_error)
    try:
        result = integrate(
            dynamics, torch.cat([ys[last], grad_ys[last]]), times[last], times[0], (), options.method,
            controller=method.backward_controller(problem, options, scale, norm, [n, n]),
            grid=make_grid(problem, options, ys[last], times[last], times[0]),
            landings=_landings(quad, check, ys, grad_ys, looked_at, last, options),
            max_num_steps=options.max_num_steps,
            on_accept=ExplosionGuard(quad.on_accept if wanted else None, ys, n)
            if method.reconstruction_error is not None else (quad.on_accept if wanted else None),
            label="backward",
        )
    except SolveError as error:
        raise explain_backward_failure(error, "Quadrature", dynamics.last, reverses_y=True) from None
    quad.flush()
    quad.evaluate_buffer()
    z = result.y_end
    errors = check.errors()  # the last is t_0's: the jump there runs last
    quad.gauss_error_estimate(parameter_tolerance(problem, options.atol, "atol", scale))
    parameter_error = quad.estimate.ratio(quad.grads, parameter_tolerance(problem, options.rtol, "rtol"),
                                          parameter_tolerance(problem, options.atol, "atol", scale),
                                          sum(x.numel() for x in quad.grads), result.stats["accepted"])
    call.stats["backward"] = dict(result.stats, nfe=dynamics.nfe + quad.nfe, nvjp=dynamics.nvjp + quad.vjps + quad.estimate_vjps,
                                  parameter_error=parameter_error,
                                  reconstruction_error=errors[-1], reconstruction_error_max=max(errors),
                                  quadrature_nfe=quad.nfe, quadrature_vjps=quad.vjps, estimate_vjps=quad.estimate_vjps,
                                  nodes=k, vmap_fallback=int(quad.vmap_error is not None))
    if quad.vmap_error is not None:
        method.tell_vmap_fallback(quad.vmap_error)
    check.judge(errors)
    refuse_nonfinite_gradient("Quadrature", [z[n:], *quad.grads], ["y0"] + ["the parameters"] * len(quad.grads),
                              times[0], method.reconstruction_error)
    grad_params: List[Optional[torch.Tensor]] = [None] * len(params)
    for i, g in zip(wanted, quad.grads):
        grad_params[i] = g
    return AdjointCall.gradients(z[n:], grad_params), parameter_error


def _landings(quad: ParameterQuadrature, check: ReconstructionCheck, ys: torch.Tensor, grad_ys: torch.Tensor,
              looked_at: List[bool], last: int, options: SolverOptions) -> List[Landing]:
    """The backward solve's landings: the output times the loss looks at (the reconstruction
    check, ``y`` put back to the forward's value, the jump ``a_y += g_i``), ``t_0`` in any
    case (its re-solved ``y`` is the reconstruction check), and the forward's step and jump
    times (a backward step must not straddle a kink of ``f``)."""
    n, times = ys.shape[1], check.times
    discontinuities = set(options.jump_t)

    def make_jump(i: int):
        def jump(t: float, z: torch.Tensor) -> torch.Tensor:
            quad.flush(own_side=t in discontinuities)  # the waiting step ends in the state before the jump
            check.drift(i, z)
            z = z.clone()
            z[:n] = ys[i]  # the forward pass knew y here exactly
            z[n:] += grad_ys[i]
            return z

        return jump

    def flush_at_discontinuity(t: float, z: torch.Tensor) -> None:
        quad.flush(own_side=True)
        return None

    landings = [Landing(times[i], [make_jump(i)]) for i in range(1, last) if looked_at[i]]
    landings.append(Landing(times[0], [make_jump(0)]))
    landings += [Landing(t) for t in options.step_t]
    landings += [Landing(t, [flush_at_discontinuity], restart=True) for t in options.jump_t]
    return landings


_QuadratureFunction = adjoint_function("quadrature", solve_without_graph, _backward)

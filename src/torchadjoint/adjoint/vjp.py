"""The adjoint equations, stated once, and the backward solve's dynamics built from them.

With ``g_i = ∂L/∂y(t_i)`` and the adjoint running backwards in time from ``t_N`` to ``t_0``
(DESIGN.md §2, Theorem 5.2; row vectors, each product one vector-Jacobian product)::

    dy/dt = f(t, y)
    a_y(t_N) = g_N,   da_y/dt = -a_y · ∂f/∂y (t, y(t))
    a_θ(t_N) = 0,     da_θ/dt = -a_y · ∂f/∂θ (t, y(t))
    jumps at the output times:   a_y(t_i⁻) = a_y(t_i⁺) + g_i
    dL/dy0 = a_y(t_0),   dL/dθ = a_θ(t_0)
    time gradients:  dL/dt_i = g_i · f(t_i, y(t_i)) (i ≥ 1),  dL/dt_0 = -a_y(t_0⁺) · f(t_0, y0)

:class:`AdjointDynamics` evaluates the right-hand side (one call of ``f`` and one
``torch.autograd.grad`` call, no Jacobian); the gradient methods differ only in the layout
of the state their backward solve integrates (the *strategy*, chosen by its arguments):

- ``[y, a_y, a_θ]`` (2n + p): :class:`~torchadjoint.Backsolve` (full norm, or an implicit
  or multistep backward method);
- ``[y, a_y]`` (2n), ``a_θ`` accumulated beside the solve with the step's own Runge–Kutta
  weights (:class:`StageAccumulator`): Backsolve under the seminorm;
- ``[y, a_y]`` (2n), no parameters: :class:`~torchadjoint.Quadrature`, whose ``a_θ`` is a
  Gauss quadrature along the accepted steps (:class:`~.quadrature.ParameterQuadrature`);
- ``[a_y, a_θ]`` (n + p) along a stored trajectory ``y(t)``:
  :class:`~torchadjoint.Checkpointed`.

The time gradients are :func:`output_time_gradient` and :func:`start_time_gradient`
(applied around every method by :mod:`torchadjoint.time_gradients`).

Also here: :class:`DeclaredTensors` and :func:`check_params_declared`, which catch a
function that uses tensors requiring grad that the adjoint does not know about (their
gradient would be silently lost, since the adjoint only differentiates with respect to
declared params), at the start and at every evaluation of the backward pass.
"""
from __future__ import annotations

from collections import deque
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from ..problem import make_flat_func, solve_flat
from ..step import FlatFunc
from .base import AdjointCall, forward_stats
from .trust import ParameterErrorEstimate


def output_time_gradient(g: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``dL/dt_i = g_i · f(t_i, y(t_i))`` for an output time after the start (0-dim)."""
    return (g * f).sum()


def start_time_gradient(a_y: torch.Tensor, f0: torch.Tensor) -> torch.Tensor:
    """``dL/dt_0 = -a_y(t_0⁺) · f(t_0, y0)`` (0-dim): ``a_y(t_0⁺)`` the adjoint arriving at
    ``t_0`` from the later outputs only (moving ``t_0`` moves the trajectory, not ``y0``)."""
    return -(a_y * f0).sum()


class AdjointDynamics:
    """``F(t, z) -> dz/dt`` for the backward solve of the adjoint equations above, with
    honest counters: ``nfe`` counts calls of ``f`` and ``nvjp`` calls of ``torch.autograd.grad``.

    Args:
        flat_func: ``f(t, y)`` on flat states (n,).
        params: the parameters whose adjoint ``a_θ`` (p entries, all of them, in order) is
            wanted; only those requiring grad are differentiated (the others' entries stay
            0). Empty: ``∂f/∂θ`` is not computed at all (autograd then skips every
            weight-gradient kernel).
        along_trajectory: the state is ``[a_y, a_θ]`` and ``y(t)`` (n,) is read from
            :attr:`y_of_t` (a stored trajectory, set by the caller, one segment at a time).
            False: ``y`` is re-solved backwards in the state, ``[y, a_y(, a_θ)]``.
        accumulate: a Runge–Kutta tableau: ``a_θ`` is left out of the state and
            accumulated by :meth:`on_accept` with the step's own weights
            (:class:`StageAccumulator`; read it from :attr:`a_theta`). ``a_θ`` feeds back
            into nothing, so this is the same computation as carrying it in the state
            under the seminorm, without moving ``p`` numbers through every stage
            combination, error estimate and stage copy (memory traffic that evicts the
            network's own data from the cache).
        keep_graph_at: times (the output times where the adjoint jumps) at which the
            graph of the last evaluation is kept for :meth:`jump`.
        declared: checks each evaluation's graph for undeclared tensors.

    Jumps without re-evaluation: ``F`` is linear in ``a_y``, ``F(z + [0, g, 0]) = F(z) +
    [0, -g·∂f/∂y, -g·∂f/∂θ]``, so :meth:`jump` obtains the derivative after the jump
    ``a_y += g`` from the kept stage by one more backward pass through its graph, without
    calling ``f`` again.
    """

    def __init__(self, flat_func: FlatFunc, n: int, params: Sequence[torch.Tensor] = (), *,
                 along_trajectory: bool = False, accumulate=None,
                 keep_graph_at: Sequence[float] = (), declared: Optional["DeclaredTensors"] = None):
        self.flat_func = flat_func
        self.declared = declared
        self.n = n
        self.params = tuple(params)
        self.differentiated = tuple(x for x in self.params if x.requires_grad)
        self.along = along_trajectory
        self.y_of_t: Optional[Callable[[float], torch.Tensor]] = None
        self.keep_graph_at = frozenset(keep_graph_at)
        self.nfe = 0
        self.nvjp = 0
        # (t, z, f(y) with its graph, the y leaf, F(t, z)) of the last evaluation at a kept time.
        self._kept: Optional[tuple] = None
        self.last: Optional[tuple] = None  # (t, f, a_y, vjp_y, vjp_p) of the last evaluation, for error reports
        self._zeros: Optional[List[torch.Tensor]] = None  # stand-ins for unused inputs' products
        # f and its VJP as one compiled graph (torchadjoint.compiled.compile_dynamics sets it:
        # Backsolve's y re-solved in the state, Checkpointed's y read along the trajectory).
        self.compiled_vjp = None
        self.accumulator = None if accumulate is None else StageAccumulator(accumulate, len(self.params))
        self.theta_in_state = self.accumulator is None
        p = sum(x.numel() for x in self.params) if self.theta_in_state else 0
        # z's parts [y, a_y(, a_θ)] or [a_y, a_θ], split by one call per evaluation.
        self._sizes = [n, p] if along_trajectory else [n, n, p]
        # Along a trajectory only a_y feeds back into F (an implicit method's Jacobian skips a_θ).
        self.feedback_size = n if along_trajectory else None

    @property
    def a_theta(self) -> List[Optional[torch.Tensor]]:
        """The accumulated ``a_θ``, one tensor per parameter (None for unused ones)."""
        return self.accumulator.a_theta

    def _vjp(self, fy: torch.Tensor, y: torch.Tensor, cotangent: torch.Tensor, keep: bool) -> tuple:
        """``(-c·∂f/∂y (n,), (-c·∂f/∂θ_j or None, ...))`` for ``c = cotangent``, one backward pass."""
        if fy.requires_grad:
            # The negated cotangent gives the negated products directly (no extra pass over them).
            grads = torch.autograd.grad(fy, (y,) + self.differentiated, cotangent.neg(), allow_unused=True,
                                        retain_graph=keep)
            self.nvjp += 1
        else:  # f depends on neither y nor the parameters
            grads = (None,) * (1 + len(self.differentiated))
        vjp_y = grads[0] if grads[0] is not None else torch.zeros_like(cotangent)
        vjp_p = grads[1:]
        if len(self.differentiated) != len(self.params):  # frozen parameters: no product, zeros
            found = iter(vjp_p)
            vjp_p = tuple(next(found) if x.requires_grad else None for x in self.params)
        return vjp_y, vjp_p

    def _flat_params(self, grads: tuple, like: torch.Tensor) -> List[torch.Tensor]:
        if self._zeros is None:
            self._zeros = [torch.zeros(x.numel(), dtype=like.dtype, device=like.device) for x in self.params]
        return [z if g is None else g.reshape(-1).to(like.dtype) for g, z in zip(grads, self._zeros)]

    def __call__(self, t: float, z: torch.Tensor) -> torch.Tensor:
        keep = t in self.keep_graph_at
        parts = z.split(self._sizes)
        along = self.along
        a_part = parts[0] if along else parts[1]
        if self.compiled_vjp is not None:
            fy, vjp_y, vjp_p = self.compiled_vjp(t, self.y_of_t(t) if along else parts[0], a_part)
            self.nfe += 1
            self.nvjp += 1
        else:
            with torch.enable_grad():
                y = (self.y_of_t(t) if along else parts[0]).detach().requires_grad_(True)
                fy = self.flat_func(t, y)
                self.nfe += 1
                if self.declared is not None:
                    self.declared.check(fy, (y,), t)
                vjp_y, vjp_p = self._vjp(fy, y, a_part, keep)
        self.last = (t, fy, a_part, vjp_y, vjp_p)
        head = [vjp_y] if along else [fy.detach(), vjp_y]
        if self.theta_in_state:
            out = torch.cat(head + self._flat_params(vjp_p, vjp_y)) if self.params else torch.cat(head)
        else:
            out = torch.cat(head)
            self.accumulator.record(t, vjp_p)
        if keep:
            self._kept = (t, z, fy, y, out)
        return out

    def jump(self, t: float, z: torch.Tensor, dz: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(z + dz, F there)`` for a jump ``dz = [0, g, 0]`` (``a_y += g``) of the state
        ``[y, a_y, ...]``; ``F`` is None when no graph was kept at ``(t, z)`` (a method whose
        last stage is not at the step's end), and must be re-evaluated."""
        n = self.n
        z_new = z + dz
        kept, self._kept = self._kept, None
        if kept is None or kept[0] != t or kept[1] is not z:
            self.forget()
            return z_new, None
        _, _, fy, y, out = kept
        with torch.enable_grad():
            vjp_y, vjp_p = self._vjp(fy, y, dz[n : 2 * n], keep=False)
        # F(z + dz) = F(z) + [0, -g·∂f/∂y, -g·∂f/∂θ]
        if self.theta_in_state:
            change = torch.cat([torch.zeros_like(vjp_y), vjp_y] + self._flat_params(vjp_p, vjp_y))
        else:
            change = torch.nn.functional.pad(vjp_y, (n, 0))
            self.accumulator.jumped(vjp_p)
        return z_new, out + change

    def forget(self) -> None:
        """The state was replaced (a reset, a discontinuity of f): drop a kept graph; the
        next evaluation is the first stage of the next step."""
        self._kept = None
        if self.accumulator is not None:
            self.accumulator.forget()

    def on_accept(self, info) -> None:
        """For the integration loop: an accepted step (a :class:`StepInfo`)."""
        if self.accumulator is not None:
            self.accumulator.on_accept(info)


class StageAccumulator:
    """``a_θ += h Σ_i b_i k_i^θ`` over each accepted step's stages: ``a_θ`` integrated beside
    the backward solve with the Runge–Kutta weights of ``tableau`` (explicit methods only:
    their evaluations of ``f`` are the stages).

    :meth:`record` is told the parameter part ``k^θ`` of every evaluation, :meth:`on_accept`
    adds the accepted step's share. The last ``s - 1`` evaluations are the stages 1 … s-1
    of a step when it is accepted (integrate evaluates nothing else between a step's stages
    and its acceptance). A compiled step instead integrates its own parts (from
    :meth:`first_stage`, the parts of its stage 0) and reports the sums by :meth:`took_step`.
    """

    def __init__(self, tableau, count: int):
        self._c = [float(c) for c in tableau.c]
        self._b = [float(b) for b in tableau.b]
        self._fsal = tableau.fsal
        self._recent: deque = deque(maxlen=len(self._c) - 1)  # (t, parts) of the latest evaluations
        self._theta0: Optional[tuple] = None  # (t, parts) of the current step's first stage
        self.a_theta: List[Optional[torch.Tensor]] = [None] * count
        # a_θ's embedded error estimate, accumulated alongside (see trust.ParameterErrorEstimate).
        self._e = None if tableau.b_error is None else [float(e) for e in tableau.b_error]
        self.a_theta_error = ParameterErrorEstimate()
        # (t0, t1, last stage's (t, parts), sums, error norm) of a compiled step not yet accepted.
        self._taken: Optional[tuple] = None

    def record(self, t: float, parts: tuple) -> None:
        self._taken = None  # an evaluation outside a compiled step: a step taken before it is stale
        self._recent.append((t, parts))
        if self._theta0 is None:  # the evaluation that starts a step: f at a new state
            self._theta0 = (t, parts)

    def first_stage(self) -> Optional[tuple]:
        """The parts ``k_0^θ`` of the next step's first stage, or None where some are unknown
        or there are none (no parameter wants a gradient: nothing to accumulate)."""
        if self._theta0 is None or not self._theta0[1] or any(part is None for part in self._theta0[1]):
            return None
        return self._theta0[1]

    def took_step(self, t0: float, t1: float, last: tuple, gained: tuple, error_norm: Optional[torch.Tensor]) -> None:
        """A compiled step from :meth:`first_stage`'s parts: ``gained`` its ``h Σ_i b_i k_i^θ``
        per part, ``error_norm`` its ``‖h Σ_i e_i k_i^θ‖``, ``last`` ``(t, parts)`` of its last
        stage. Added by :meth:`on_accept` if it is accepted."""
        self._taken = (t0, t1, last, gained, error_norm)

    def jumped(self, change: tuple) -> None:
        """The step's first stage changed by ``change`` (a jump of ``a_y`` at its start)."""
        t0, parts = self._theta0
        parts = [a if b is None else b if a is None else a + b for a, b in zip(parts, change)]
        self._theta0 = (t0, tuple(parts))

    def forget(self) -> None:
        self._theta0 = None

    def on_accept(self, info) -> None:
        """``a_θ += h Σ_i b_i k_i^θ`` for an accepted step (a :class:`StepInfo`)."""
        # The exact length: at a large |t| the difference of the public times is rounded.
        h = info.h if info.h is not None else info.t1 - info.t0
        taken, self._taken = self._taken, None
        if taken is not None:
            self._add_taken(info, taken)
            return
        stages = [self._theta0] + list(self._recent)[len(self._recent) - (len(self._c) - 1):]
        # Each stage must come from where this step evaluated it: guards the bookkeeping.
        # (A stage at a jump_t is evaluated one number of the state's dtype to its side.)
        slack = self._slack(info)
        for (ts, _), c in zip(stages, self._c):
            if len(stages) != len(self._c) or abs(ts - (info.t1 if c == 1 else info.t0 + c * h)) > slack:
                self._lost_track(info)
        for b, (_, parts) in zip(self._b, stages):
            if b == 0:
                continue
            for j, g in enumerate(parts):
                if g is not None:
                    if self.a_theta[j] is None:
                        # Summed at the state's precision at least, as in the state under the full
                        # norm: a float32 parameter's sums over thousands of steps of a float64
                        # state lost 40x its own rounding when summed in float32.
                        self.a_theta[j] = torch.zeros_like(g, dtype=torch.promote_types(g.dtype, info.y1.dtype))
                    self.a_theta[j].add_(g, alpha=h * b)
        if self._e is not None:
            self.a_theta_error.add(h, self._e, [parts for _, parts in stages])
        self._theta0 = self._recent[-1] if self._fsal else None

    def _add_taken(self, info, taken: tuple) -> None:
        """:meth:`on_accept` for a step a compiled program integrated (see :meth:`took_step`)."""
        t0, t1, last, gained, error_norm = taken
        slack = self._slack(info)
        if self._theta0 is None or max(abs(self._theta0[0] - info.t0), abs(t0 - info.t0), abs(t1 - info.t1)) > slack:
            self._lost_track(info)
        for j, g in enumerate(gained):
            if self.a_theta[j] is None:
                self.a_theta[j] = g.clone()  # the sum of its own: a graph's output buffer may be reused
            else:
                self.a_theta[j].add_(g)
        if error_norm is not None:
            self.a_theta_error.add_norm(error_norm)
        self._theta0 = last if self._fsal else None

    @staticmethod
    def _slack(info) -> float:
        return max(1e-9, 4 * torch.finfo(info.y1.dtype).eps) * max(1.0, abs(info.t0), abs(info.t1))

    @staticmethod
    def _lost_track(info):
        raise RuntimeError(f"internal error: the parameter adjoint lost track of the stages of the step "
                           f"{info.t0!r} -> {info.t1!r}; please report this")


class DeclaredTensors:
    """The tensors an adjoint differentiates with respect to, and the check that ``f`` uses
    no other tensor requiring grad.

    An adjoint differentiates ``f`` only with respect to ``y`` and the declared params, so
    any other tensor requiring grad that ``f`` uses would silently get no gradient. The
    forward pass checks ``f`` once, at ``t_0`` (:func:`check_params_declared`); the backward
    pass checks the graph of every evaluation it builds for its vector-Jacobian products
    anyway (:meth:`check`), so a tensor ``f`` uses only later (a branch on ``t``, on ``y``)
    is refused too. Cost: a walk over the graph of each evaluation (one visit per autograd
    node; measured in the closing note of the harness, a few per cent of a backward pass).
    """

    def __init__(self, params: Sequence[torch.Tensor], method_name: str):
        self.method_name = method_name
        self.ids = {id(x) for x in params}
        self.stop = {x.grad_fn for x in params if x.grad_fn is not None}

    def undeclared(self, outputs, extra: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Tensors requiring grad in the graph of ``outputs`` (a tensor or a list of them,
        walked once together) that are neither params nor ``extra``."""
        ids = self.ids | {id(x) for x in extra} if extra else self.ids
        stop = self.stop
        found: List[torch.Tensor] = []
        seen = set()
        stack = [x.grad_fn for x in ([outputs] if isinstance(outputs, torch.Tensor) else outputs)]
        while stack:
            node = stack.pop()
            if node is None or node in seen or node in stop:
                continue
            seen.add(node)
            variable = getattr(node, "variable", None)
            if variable is not None:
                if id(variable) not in ids:
                    found.append(variable)
                continue
            stack.extend(next_node for next_node, _ in node.next_functions)
        return found

    def check(self, output, extra: Sequence[torch.Tensor], t: Optional[float]) -> None:
        """Raise ValueError if ``output`` (f's value with its graph, or a list of tensors)
        depends on an undeclared tensor requiring grad; ``extra``: inputs that are fine too
        (the state leaf)."""
        if isinstance(output, torch.Tensor) and not output.requires_grad:
            return
        missing = self.undeclared(output, extra)
        if missing:
            raise undeclared_error(missing, self.method_name, t)


def undeclared_error(missing: Sequence[torch.Tensor], method_name: str, t: Optional[float]) -> ValueError:
    shapes = ", ".join(f"tensor of shape {tuple(x.shape)}" for x in missing[:5])
    where = "" if t is None else f" (f used it at t={t:.10g})"
    return ValueError(
        f"func uses {len(missing)} tensor(s) requiring grad that are not among its params ({shapes}){where}; the "
        f"{method_name} adjoint differentiates only with respect to params, so they would silently get no "
        f"gradient. Pass them explicitly, solve(..., params=[...]) listing every tensor func depends on "
        f"(for an nn.Module, its parameters too), or detach them if they need no gradient"
    )


def check_params_declared(flat_func: FlatFunc, t: float, y: torch.Tensor, params: Sequence[torch.Tensor], method_name: str) -> torch.Tensor:
    """Evaluate ``f(t, y)`` once with a graph and raise if it depends on tensors requiring
    grad that are not in ``params``; returns ``f(t, y)`` (n,), detached, for reuse.

    Cost: one evaluation of ``f`` (use the result as the solve's first stage) and a walk
    over its graph. The backward pass checks every later evaluation (:class:`DeclaredTensors`).
    """
    with torch.enable_grad():
        y_leaf = y.detach().requires_grad_(True)
        out = flat_func(t, y_leaf)
        DeclaredTensors(params, method_name).check(out, (y_leaf,), t)
    return out.detach()


def checked_first_stage(flat_func: FlatFunc, problem, y0: torch.Tensor, method_name: str) -> Optional[torch.Tensor]:
    """:func:`check_params_declared` at the start of an adjoint's forward solve: returns
    ``f(t_0, y0)`` (n,) to serve as the solve's first stage, or None when there is nothing
    to solve (a single output time)."""
    if len(problem.times) < 2:
        return None
    return check_params_declared(flat_func, problem.times[0], y0, problem.params, method_name)


def solve_without_graph(ctx, call: AdjointCall, y0: torch.Tensor) -> torch.Tensor:
    """The forward of an adjoint that re-solves ``y`` backwards: one solve without a graph.

    Returns ``ys`` (N, n), saved on ``ctx`` with ``call`` and the flat function
    (``ctx.flat_func``); fills ``call.stats["forward"]``. ``f`` is checked for tensors
    requiring grad that are not among the params (that evaluation is the first stage)."""
    problem = call.problem
    flat_func = make_flat_func(problem)
    f0 = checked_first_stage(flat_func, problem, y0, call.method.name)
    with torch.no_grad():
        result = solve_flat(problem, call.forward, y0.detach(), func=flat_func, f0=f0)
    call.stats["forward"] = forward_stats(result.stats, f0)
    ctx.call, ctx.flat_func = call, flat_func
    ctx.save_for_backward(result.ys)
    return result.ys

"""The compiled path's adaptive loop: many steps of a forward solve in one graph.

Called step by step, a compiled solve pays the host for every step: the call of the step's
graph and the check of its guards, reading the error ratio, the controller, the bookkeeping.
On a small problem that is most of the solve (benchmark problem 1: 23 steps of 44 µs of
kernels took 170 µs each). Here the accept/reject loop itself runs inside one graph, a
``torch.while_loop`` around the step program of :mod:`~torchadjoint.compiled` with the PI
rule of :class:`~torchadjoint.controller.PIController` and the landing on the end of
:class:`~torchadjoint.step_size.AdaptiveSteps` written in tensors (float64 times, step sizes
and ratios, as the host computes them in Python floats).

The first graph call of a solve also selects the first step (Hairer, Nørsett & Wanner's
heuristic, as :meth:`~torchadjoint.controller.PIController.init`). The graph takes only
ordinary decisions: accept, or reject with a finite error. Before any other (a non-finite
error, a step-size underflow, a step stuck at ``min_step``) it stops and the host loop takes
that step itself, with its own checks and messages; it also stops when the step budget is
spent and at the step budget's pace checks, which the host makes. So every error a solve can
raise is raised by the same code, with the same message, as without it.

Dense output: the graph records each accepted step's start, state and stages in buffers; the
loop's :class:`~torchadjoint.integrate._Outputs` computes the outputs of a call's steps from
them in one batched product (:meth:`~torchadjoint.integrate._Outputs.fill_steps`: the same
products as step by step, up to rounding). ``while_loop`` carries its buffers functionally
(each iteration writes a new copy), so a graph call takes at most as many steps as fit in
:data:`RECORDED_NUMBERS` numbers; a solve whose outputs are only at its start and end records
nothing and takes up to :data:`UNRECORDED_STEPS` steps per call. Compiled ``Direct`` keeps the
recorded steps for its backward pass (:class:`RecordedSteps`,
:mod:`~torchadjoint.adjoint.direct_compiled`).

Used where the loop has nothing else to do between steps: a forward solve without a graph
(``torch.no_grad``, the adjoints' forward, compiled ``Direct``'s), an explicit adaptive FSAL
method (dopri5, tsit5, bosh3, ...) under the built-in RMS norm, no landings before the end
(``step_t``, ``jump_t``, events), no per-step callback, the clock on public times (not an
interval tiny against its offset: :class:`~torchadjoint.integrate.TimeFrame`), on the CPU
(untested on a GPU, where every iteration's condition would be a device-to-host read).
Elsewhere the steps are taken one by one, as before. Where the loop itself does not compile
(the step program may still), the steps are taken one by one with no warning, and
``stats["graph_loop"]`` says why (known: f reading a tensor that is not its module's parameter
or buffer through an attribute, ``y @ A.T`` over a global ``A``: dynamo lifts each read into the
loop body as an input of its own, and ``while_loop`` refuses inputs aliasing each other); where
f cannot be compiled now (its global module hooks changed, its recompile limit), the one
CompileWarning is given and f's programs run eagerly, as for any program. ``stats["graph_loop_steps"]``: accepted steps taken inside loop graphs.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from . import compiled
from .controller import PIController, rms_norm
from .interpolation import host_weight_polynomials
from .step import StepResult
from .tableaux.base import ButcherTableau

#: Numbers (states' entries) a call's buffers hold at most: the step starts' states and stages.
RECORDED_NUMBERS = 1 << 13
#: Steps one call takes at most when nothing is recorded.
UNRECORDED_STEPS = 256
#: Numbers (output times × state entries) up to which the outputs are computed inside the graph.
OUTPUT_NUMBERS = 1 << 16

_POLYNOMIALS: dict = {}  # tableau -> its dense output's weight polynomials (P, s'), float64

# Why the graph stopped: ended on the stop; left the next decision to the host; its buffers or
# budgets are spent (the host makes its checks, then calls again).
_LANDED, _HOST, _FULL = 1, 2, 3


def while_loop(cond, body, carried: tuple, extra: tuple) -> tuple:
    """``torch.while_loop`` with ``extra`` tensors (f's parameters and buffers) passed to
    ``cond(*carried, *extra)`` and ``body(*carried, *extra) -> carried`` as inputs of their own.
    Closed over instead, dynamo lifts a module's tensors into the loop one attribute access
    at a time (``self.a`` and ``self.a.T`` as two inputs aliasing each other), which
    ``while_loop`` refuses; passed in, every view of them is taken inside the body."""
    from torch._higher_order_ops.while_loop import while_loop_op

    return while_loop_op(cond, body, tuple(carried), tuple(extra))


def _own_views(operands: tuple) -> list:
    """The tensors ``operands`` of a ``torch.cond`` branch as views made inside the
    branch (no copy). Dynamo traces a cond's branches with its operands as the outer graph's
    tensors, and an attribute read from one of them (f's ``self.w.T``) becomes a node of the
    outer graph at each read, lifted into the branch as an input of its own: two reads (or
    ``w`` and ``w.T``) are two inputs aliasing each other, which inductor refuses ("cond_true might
    be aliasing the input or the output"), turning the whole loop graph off. A view made in the
    branch is the branch's own tensor: its attributes are read there, and ``w`` is lifted once.
    (``while_loop``'s body gets its inputs as placeholders of its own: no such problem there.)"""
    return [x.view_as(x) for x in operands]


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """``math.ulp`` of a non-negative float64 tensor: the spacing of floats at ``x``."""
    return torch.nextafter(x, torch.full_like(x, math.inf)) - x


def _build_loop(tableau: ButcherTableau, field_of, rms_entries: Optional[int], record: bool, outputs: bool):
    """The loop program: ``(func, tensors, control, limits, y, f0, rtol, atol, starts, states, stages, last,
    so_far) -> (report, y, f0, starts, states, stages, last[, ys])``. (No defaults: the solver runs
    dynamo's code for it in a function of its own, without them.) ``tensors``: f's parameters and buffers, passed
    in by name (see :func:`~torchadjoint.compiled._parametrised_field_of`).

    ``control`` (14,) float64: s, h (the proposed step), controller state, direction, stop, span
    (see AdaptiveSteps), safety, ifactor, dfactor, pcoeff, icoeff, min_step, max_step, and 1 where
    the graph selects the first step itself (h is then ignored); ``limits`` (2,) int64: the most
    accepted steps and attempts. ``starts`` (cap + 1,) float64 receives the accepted
    steps' clock times, from s; ``states`` (cap, n) and ``stages`` (cap, s, n) their start states
    and stages when ``record`` (else (1,) placeholders); ``last`` (s, n) receives the last accepted
    step's stages when not ``record`` (else a (1,) placeholder: they are in ``stages``).
    ``report`` (6 + cap + 1,) float64: s, h, state, accepted, attempts, why it stopped, then
    ``starts``. ``y``/``f0``: the state and f at the end.

    With ``outputs`` (and ``record``), ``so_far`` = (output times (R,) float64 on the clock,
    padded with times no step reaches, the outputs so far (R, n), the dense output's weight
    polynomials (P, s') float64), else (); the outputs with those inside the call's steps filled
    in are then returned last (see :func:`_outputs_of_steps`)."""
    step = compiled._build_step(tableau, field_of, rms_entries)
    first_step = _build_first_step(field_of, tableau.order)
    order = float(tableau.order)

    def loop(func, tensors, control, limits, y, f0, rtol, atol, starts, states, stages, last, so_far):
        f64 = torch.float64
        zero = torch.zeros((), dtype=torch.int64, device=y.device)
        # The first step selected here where control[13] says so (one graph call less per solve).
        def selected(*operands):
            c, y, f0, *ts = _own_views(operands)
            return first_step(func, tuple(ts), c, y, f0, rtol, atol)

        h = torch.cond(control[13] > 0, selected, lambda c, *_: c[1].clone(), (control, y, f0, *tensors))

        def cond(s, h, state, y, f0, accepted, attempts, why, starts, states, stages, last, *tensors):
            return why == 0

        def body(s, h, state, y, f0, accepted, attempts, why, starts, states, stages, last, *tensors):
            # (Read from the whole tensors here: while_loop refuses views of one tensor as separate inputs.)
            direction, stop, span = control[3], control[4], control[5]
            safety, ifactor, dfactor, pcoeff, icoeff = control[6], control[7], control[8], control[9], control[10]
            min_step, max_step = control[11], control[12]
            # AdaptiveSteps.end_of_step: land on the stop, also when rounding leaves a hair before it.
            s1 = s + h
            slack = 64 * _ulp(torch.maximum(s.abs(), stop.abs()))
            landed = direction * (s1 - stop) >= -slack
            s1 = torch.where(landed, stop, s1)
            underflow = ~landed & (h.abs() <= 16 * _ulp(torch.maximum(torch.maximum(s.abs(), s1.abs()), span)))
            hs = s1 - s
            y1, f1, _, ratio, ks, _, _, _ = step(func, tensors, torch.stack([s, hs, s1]), y, f0, rtol, atol)
            ratio = ratio.to(f64)
            finite = torch.isfinite(ratio)
            # PIController.adapt (a non-finite ratio goes to the host).
            accept = (ratio <= 1.0) | (hs.abs() <= min_step)
            factor = safety * ratio ** (-(icoeff + pcoeff) / order) * state.clamp_min(1e-10) ** (pcoeff / order)
            factor = torch.minimum(ifactor, torch.maximum(dfactor, factor))
            factor = torch.where(ratio == 0, ifactor, factor)
            factor = torch.where(accept, factor, factor.clamp_max(1.0))
            h_next = torch.copysign(torch.minimum(torch.maximum((hs * factor).abs(), min_step), max_step), hs * factor)
            # AdaptiveSteps.judge: a retry that would be this very step is accepted (with a finite
            # error; a non-finite one, stuck or not, and an underflow are the host's to judge).
            stuck = h_next.abs() >= hs.abs() - 64 * _ulp(torch.maximum(s.abs(), s1.abs()))
            accept = accept | (finite & stuck)
            host = underflow | ~finite
            h_next = torch.where(accept & landed & (h.abs() > h_next.abs()), h, h_next)
            taken = ~host & accept
            # Written at every attempt, read only for accepted steps (a rejection's is overwritten).
            at = accepted.reshape(1)
            starts = starts.index_copy(0, at + 1, s1.reshape(1))
            if record:
                states = states.index_copy(0, at, y[None])
                stages = stages.index_copy(0, at, ks[None])
                last = last.clone()  # unused (1,): returned as it came, it would alias the input
            else:  # states and stages are unused (1,) placeholders, cloned for the reason above
                states, stages = states.clone(), stages.clone()
                last = torch.where(taken, ks, last)
            accepted = accepted + taken.to(torch.int64)
            attempts = attempts + (~host).to(torch.int64)
            s = torch.where(taken, s1, s)
            full = (accepted >= limits[0]) | (attempts >= limits[1])
            why = torch.where(host, _HOST, torch.where(taken & landed, _LANDED, torch.where(full, _FULL, 0)))
            return (s, torch.where(host, h, h_next), torch.where(taken, ratio, state), torch.where(taken, y1, y),
                    torch.where(taken, f1, f0), accepted, attempts, why.to(torch.int64), starts, states, stages, last)

        starts = starts.index_copy(0, zero.reshape(1), control[:1])
        out = while_loop(cond, body, (control[0].clone(), h, control[2].clone(), y, f0, zero, zero.clone(),
                                      zero.clone(), starts, states, stages, last), tensors)
        s, h, state, y, f0, accepted, attempts, why, starts, states, stages, last = out
        report = torch.cat([torch.stack([s, h, state, accepted.to(f64), attempts.to(f64), why.to(f64)]), starts])
        if not outputs:
            return report, y, f0, starts, states, stages, last
        ys = _outputs_of_steps(*so_far, control[3], starts, accepted, states, stages, y)
        return report, y, f0, starts, states, stages, last, ys

    return loop


def _outputs_of_steps(out_s, ys, polynomials, direction, starts, accepted, states, stages, y_end):
    """The outputs (N, n) with those in the ``accepted`` steps just taken filled in, inside the
    graph (the host's :meth:`~torchadjoint.integrate._Outputs.fill_steps` computes the same with a
    dozen numpy and torch calls): each output time ``out_s`` (N,) is placed in its step by a
    search over the steps' ends (``starts`` (cap + 1,)), its fraction ``θ`` of the step gives the
    dense output's weights ``[θ, θ², …] @ polynomials`` (running products, as on the host) times
    ``h``, and its state is ``y_i + Σ_j w_j K_ij``; an output on a step's end takes the end state
    itself. Other rows keep ``ys``."""
    cap, s = stages.shape[0], stages.shape[1]
    place = torch.arange(cap, device=starts.device)
    ends = torch.where(place < accepted, direction * starts[1:], math.inf)
    keys = direction * out_s
    which = torch.searchsorted(ends, keys)  # the first step whose end is not before the output
    inside = (keys > direction * starts[0]) & (which < accepted)
    which = which.clamp(max=cap - 1)
    begin, end = starts.index_select(0, which), starts.index_select(0, which + 1)
    theta = (out_s - begin) / (end - begin)
    powers = torch.cumprod(theta[:, None].expand(-1, polynomials.shape[0]), dim=1)
    weights = (powers @ polynomials) * (end - begin)[:, None]  # (N, s'), float64
    if weights.shape[1] > s:  # a column for f at the step's end: FSAL, the last stage
        weights = torch.cat([weights[:, : s - 1], weights[:, s - 1 :].sum(1, keepdim=True)], dim=1)
    interior = states.index_select(0, which) + (weights.to(stages.dtype)[:, :, None]
                                                * stages.index_select(0, which)).sum(1)
    following = (which + 1).clamp(max=cap - 1)
    end_state = torch.where((which + 1 < accepted)[:, None], states.index_select(0, following), y_end)
    value = torch.where((theta == 1)[:, None], end_state, interior)
    return torch.where(inside[:, None], value, ys)


def _build_first_step(field_of, order: int):
    """``(func, tensors, control, y0, f0, rtol, atol) -> h`` (0-dim float64): the signed first step of
    :meth:`~torchadjoint.controller.PIController.init` (Hairer, Nørsett & Wanner's heuristic
    under the RMS norm, one evaluation of f), from :func:`_build_loop`'s ``control`` (t0 its s:
    the clock is the public time here). Python's ``max``/``min`` of floats are written as they
    treat NaN (the first argument unless the second is larger/smaller)."""

    def first_step(func, tensors, control, y0, f0, rtol, atol):
        f64 = torch.float64
        t0, direction, min_step, max_step = control[0], control[3], control[11], control[12]
        field = field_of(func, tensors)
        scale = atol + rtol * y0.abs()
        rms = lambda x: (torch.linalg.vector_norm(x) / math.sqrt(x.numel())).to(f64)  # noqa: E731  (rms_norm)
        d0, d1 = rms(y0 / scale), rms(f0 / scale)
        h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / d1)
        h0 = torch.where(torch.isfinite(h0), h0, 1e-6)
        y1 = y0 + (direction * h0).to(y0.dtype) * f0
        f1, _ = field(t0 + direction * h0, y1)
        d2 = rms((f1 - f0) / scale) / h0
        dmax = torch.where(d2 > d1, d2, d1)
        h1 = torch.where(dmax <= 1e-15, torch.where(h0 * 1e-3 > 1e-6, h0 * 1e-3, 1e-6),
                         (0.01 / dmax) ** (1.0 / (order + 1)))
        h1 = torch.where(torch.isfinite(dmax), h1, h0 * 1e-3)
        h = direction * torch.where(h1 < 100 * h0, h1, 100 * h0)
        return torch.copysign(torch.minimum(torch.maximum(h.abs(), min_step), max_step), h)

    return first_step


class RecordedSteps:
    """A solve's accepted steps as its loop graphs recorded them, kept for a backward pass
    (compiled ``Direct``): ``chunks``, one per graph call, in order, each (clock times as floats
    (c + 1,), the same as a float64 tensor (cap + 1,), start states (cap, n), stages (cap, s, n)):
    ``c`` steps, in the first rows of buffers of ``cap``. ``complete`` is False once any
    accepted step was taken elsewhere (by the host, or with no loop graph at all): then the
    chunks are not the solve."""

    def __init__(self):
        self.chunks: list = []
        self.complete = True


class GraphLoop:
    """Takes a forward solve's ordinary steps in loop graphs (see the module docstring), for
    :func:`~torchadjoint.integrate.integrate`. Build with :func:`graph_loop`."""

    def __init__(self, func, tensors: tuple, program, pi: PIController, tableau: ButcherTableau, record: bool,
                 capacity: int, n: int, keep: Optional[RecordedSteps] = None, outputs: bool = False, rows: int = 0):
        self.func, self.tensors, self.program, self.pi, self.tableau = func, tensors, program, pi, tableau
        self.keep, self.outputs = keep, outputs
        self._out: Optional[tuple] = None  # the output times and weight polynomials, as tensors
        self._ys: Optional[torch.Tensor] = None  # the last graph call's outputs, (rows, n)
        self.rows = rows
        self._deferred: Optional[tuple] = None  # the first step's arguments, while the graph is to select it
        self.record, self.capacity = record, capacity
        self.stats = dict(compile_seconds=0.0, graphs_compiled=0, graph_loop_steps=0)
        self._n = n
        self._tolerances: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self.off: Optional[str] = program.failed

    def _buffers(self, y: torch.Tensor):
        """The loop program's ``starts``, ``states``, ``stages`` and ``last`` for one call (what
        is not recorded is a (1,) placeholder)."""
        s, n = self.tableau.stages, self._n
        empty = lambda *shape, dtype=y.dtype: torch.empty(shape, dtype=dtype, device=y.device)  # noqa: E731
        starts = empty(self.capacity + 1, dtype=torch.float64)
        if self.record:
            return starts, empty(self.capacity, n), empty(self.capacity, s, n), empty(1)
        return starts, empty(1), empty(1), torch.zeros(s, n, dtype=y.dtype, device=y.device)

    def advance(self, f, s: float, y: torch.Tensor, f0: torch.Tensor, stop: float, sizes, budget, outputs,
                public) -> Optional[Tuple[float, torch.Tensor, torch.Tensor, bool]]:
        """Take steps from clock time ``s`` (state ``y``, f there ``f0``) towards ``stop`` (the
        end, on the clock) in one graph call, as many as it may (see :func:`_build_loop`);
        ``sizes`` (the AdaptiveSteps), ``budget`` and ``outputs`` are brought up to date as if
        the host had taken them. Returns ``(s, y, f0, host)`` (``host``: the next step is the
        host's to take), or None where the graph could not run (it is then off for this solve)."""
        attempts = budget.attempts_left()
        pi, deferred = self.pi, self._deferred
        self._deferred = None
        if attempts <= 0 or self.off is not None:
            if deferred is not None:  # the host selects it after all
                sizes.h, sizes.state = pi.init(*deferred)
            return None
        control = torch.tensor(
            (s, sizes.h, sizes.state, sizes.direction, stop, sizes.span, pi.safety, pi.ifactor, pi.dfactor,
             pi.pcoeff, pi.icoeff, pi.min_step, pi.max_step, deferred is not None),
            dtype=torch.float64, device=y.device)
        limits = torch.tensor((min(self.capacity, budget.accepts_before_check()), attempts), dtype=torch.int64,
                              device=y.device)
        rtol, atol = self._tolerances or compiled.tolerance_tensors(self.pi.rtol, self.pi.atol, y)
        self._tolerances = (rtol, atol)
        so_far = ()
        if self.outputs:
            times, polynomials = self._out or self._output_tensors(outputs, y)
            so_far = (times, self._padded_ys(outputs), polynomials)
        out = self._call(control, limits, y, f0, rtol, atol, *self._buffers(y), so_far)
        if out is None:
            if deferred is not None:  # the host selects it after all
                sizes.h, sizes.state = pi.init(*deferred)
            return None
        f.calls += deferred is not None
        report, y1, f1, times, states, stages, last = out[:7]
        values = report.tolist()  # the call's one host-device synchronisation
        s1, h, state, accepted, tried, why = values[:6]
        accepted, tried = int(accepted), int(tried)
        starts = values[6 : 6 + accepted + 1]
        f.calls += (tried + (why == _HOST)) * (self.tableau.stages - 1)
        sizes.took(h, state if accepted else None)
        if accepted:
            if self.record:
                last = stages[accepted - 1]
            self.stats["graph_loop_steps"] += accepted
            hs = [b - a for a, b in zip(starts, starts[1:])]
            budget.took(tried)
            budget.accept_many(hs, last, y1, public(s1), stop - s1)
            self._fill(outputs, f, starts, states, stages, last, y, y1, f1, out[7] if self.outputs else None)
            if self.keep is not None:
                self.keep.chunks.append((starts, times, states, stages))
        else:
            budget.took(tried)
        return s1, y1, f1, why == _HOST

    def _fill(self, outputs, f, starts: Sequence[float], states, stages, last, y, y_end, f_end, ys) -> None:
        """The outputs in the steps just taken (as the host loop would fill them step by step);
        ``ys``: the graph's outputs, where it computed them."""
        if ys is not None:
            self._ys = ys
            outputs.took(ys[: len(outputs.out_s)], starts[-1])
        elif self.record:
            outputs.fill_steps(starts, states, stages, y_end)
        else:  # no output inside a step: only the last step's end can be one (y0 is not read)
            outputs.fill(StepResult(y_end, f_end, None, last), starts[-2], starts[-1], y, f, starts[-1])

    def _output_tensors(self, outputs, like: torch.Tensor) -> tuple:
        """The output times on the clock, padded to :attr:`rows` with times no step reaches
        (rows, float64), and the weight polynomials (P, s') float64 (made once per method)."""
        polynomials = _POLYNOMIALS.get(self.tableau)
        if polynomials is None:
            polynomials = _POLYNOMIALS[self.tableau] = torch.from_numpy(host_weight_polynomials(self.tableau).T.copy())
        times = np.full(self.rows, outputs.direction * math.inf)
        times[: len(outputs.out_s)] = outputs.out_s_array
        self._out = (torch.from_numpy(times), polynomials)
        return self._out

    def _padded_ys(self, outputs) -> torch.Tensor:
        """The outputs so far as (rows, n): the last graph's own (whose first N rows are the
        outputs' buffer, where the host may have filled rows since), or at the first call a
        copy padded with zeros."""
        ys = outputs.ys  # (N, n): any pending host-filled rows written first
        if self._ys is not None and ys.data_ptr() == self._ys.data_ptr():
            return self._ys
        return torch.cat([ys, ys.new_zeros(self.rows - ys.shape[0], ys.shape[1])])

    def first_step(self, f, t0: float, y0: torch.Tensor, f0: torch.Tensor, direction: float,
                   order: int) -> Tuple[float, float]:
        """For ``AdaptiveSteps.start``: the first step of :meth:`PIController.init
        <torchadjoint.controller.PIController.init>`, selected inside the first loop graph (its
        eager form is a few dozen operations and a call of f): NaN until :meth:`advance` sets it."""
        pi = self.pi
        if pi.first_step is not None or pi.norm is not rms_norm or self.off is not None:
            return pi.init(f, t0, y0, f0, direction, order)
        self._deferred = (f, t0, y0, f0, direction, order)
        return math.nan, 1.0

    def merged_stats(self, stats: dict) -> dict:
        """The solve's ``stats`` with the loop graphs' compile time, graphs and steps added."""
        mine = self.stats
        merged = dict(stats, graph_loop_steps=mine["graph_loop_steps"])
        merged["compile_seconds"] = stats.get("compile_seconds", 0.0) + mine["compile_seconds"]
        merged["graphs_compiled"] = stats.get("graphs_compiled", 0) + mine["graphs_compiled"]
        if self.off is not None:
            merged["graph_loop"] = f"off: {self.off}"
        return merged

    def _call(self, *args):
        program, stats = self.program, self.stats
        start = compiled.time.perf_counter()
        try:
            out, new = program.call(self.func, self.tensors, *args)
        except Exception as error:
            program.failed = self.off = compiled._reason(error)
            if self.off.startswith(("GlobalModuleHooksChanged", "FailOnRecompileLimitHit")):
                # About f, not the loop: said once, and f's other programs go eager too (as any program's).
                compiled._warn(program, "the loop of steps")
            # Otherwise the loop itself does not compile (said in stats): the steps are taken one by one.
            return None
        if new:
            stats["compile_seconds"] += compiled.time.perf_counter() - start
            stats["graphs_compiled"] += new
        return out


def graph_loop(steps, tableau, controller, y0: torch.Tensor, out_s: Sequence[float], s_start: float, s_end: float,
               stops: int, origin: float, on_accept, keep: Optional[RecordedSteps] = None) -> Optional[GraphLoop]:
    """The loop graphs for one call of :func:`~torchadjoint.integrate.integrate`, or None where
    they do not apply (see the module docstring). ``steps``: the solve's
    :class:`~torchadjoint.compiled.CompiledSteps` (None: not compiled); ``stops``: how many
    landings the solve has (the end counts one); ``origin``: its TimeFrame's; ``keep``: where
    to keep the steps (they are then recorded, outputs inside steps or not)."""
    if (steps is None or not isinstance(steps, compiled.CompiledSteps) or not isinstance(tableau, ButcherTableau)
            or not tableau.adaptive or not tableau.fsal or getattr(tableau, "implicit", False)
            or not isinstance(controller, PIController) or controller.rms_entries is None
            or stops != 1 or on_accept is not None or origin != 0.0 or y0.device.type != "cpu"
            or torch.is_grad_enabled() or s_start == s_end):
        return None
    n = y0.shape[0]
    record = keep is not None or any(s not in (s_start, s_end) for s in out_s)
    capacity = max(1, RECORDED_NUMBERS // ((tableau.stages + 1) * max(n, 1))) if record else UNRECORDED_STEPS
    # Outputs inside steps computed in the graph, where all of them are few numbers: every call
    # places and computes all N (the host's batch only its own steps' rows). N is padded to a
    # power of two (at least 64), each its own program: a graph's shapes are fixed, and a new
    # one per number of outputs (series of varying lengths) would soon reach dynamo's limit.
    rows = max(64, 1 << (len(out_s) - 1).bit_length())
    outputs = record and rows * n <= OUTPUT_NUMBERS
    func = steps.func
    field = compiled._field_key(func)
    entries = controller.rms_entries
    tensors = (*func.parameters(), *func.buffers()) if isinstance(func, torch.nn.Module) else ()
    names = compiled.tensor_paths(func, tensors) if tensors else ()
    key = ("loop", tableau, field, steps.flattener.spec, steps.dtype, entries, steps.mode, record, capacity, names,
           rows if outputs else 0)
    field_of = compiled._parametrised_field_of(steps.flattener, steps.dtype, names)
    program = compiled._program(key, lambda: _build_loop(tableau, field_of, entries, record, outputs), steps.mode,
                                (field, steps.mode), steps.device)
    return GraphLoop(func, tensors, program, controller, tableau, record, capacity, n, keep, outputs, rows)

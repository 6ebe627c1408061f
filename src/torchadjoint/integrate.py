"""The integration loop: steps, outputs, landings, statistics.

Everything here works on a flat state (n,) and host-side float times. The loop knows
nothing about gradients: the forward solve, every adjoint's backward solve and the
re-solves of the checkpointed adjoint all run through :func:`integrate`. Where each
step ends and whether it is kept is the step-size controller's business
(:mod:`torchadjoint.step_size`); the step budget and its diagnosis are
:mod:`torchadjoint.step_budget`'s.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Callable, List, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch

from .compiled_loop import RecordedSteps, graph_loop
from .controller import PIController
from .errors import SolveError
from .interpolation import DenseOutput, place_outputs
from .options import DEFAULT_MAX_NUM_STEPS
from .step import FlatFunc, StepResult, rk_step
from .step_budget import StepBudget
from .step_size import AdaptiveSteps, GridSteps, StepSizeController
from .tableaux.base import ButcherTableau

LandingCallback = Callable[[float, torch.Tensor], Optional[torch.Tensor]]


@dataclass
class Landing:
    """A time every step sequence must land on exactly.

    ``callbacks`` run there in order, each ``(t, y) -> new y or None``; a new state (the
    adjoint's jump at an output time) makes the loop re-evaluate ``f``, unless the callback
    returns ``(new y, f(t, new y))`` (f there without a call, e.g. by linearity). ``restart=True``
    marks a discontinuity of ``f``: ``f`` is re-evaluated just past ``t`` (the FSAL stage
    from before the jump belongs to the other side).
    """

    t: float
    callbacks: List[LandingCallback] = field(default_factory=list)
    restart: bool = False


@dataclass
class StepInfo:
    """An accepted step, as passed to ``on_accept``: from ``(t0, y0)`` to ``(t1, y1)``;
    ``stages`` (s, n); ``h_next`` the step the controller proposes next."""

    t0: float
    t1: float
    y0: torch.Tensor
    y1: torch.Tensor
    stages: torch.Tensor
    f1: Optional[torch.Tensor]
    h_next: float
    controller_state: float
    h: Optional[float] = None  # the step's length, exact (t1 - t0 rounds at large |t|)


@dataclass
class IntegrateResult:
    """``ys`` (N, n) states at the requested output times; ``y_end`` (n,) the state at the
    end (after any landing callback there); ``f_end`` f at the end when it was computed;
    ``h_next`` and ``controller_state`` to continue the solve seamlessly; ``stats``."""

    ys: torch.Tensor
    y_end: torch.Tensor
    f_end: Optional[torch.Tensor]
    t_end: float
    h_next: float
    controller_state: float
    stats: dict


def merge_landings(landings: Sequence[Landing], direction: float) -> List[Landing]:
    """Sort landings along the direction of integration and merge equal times."""
    merged: dict = {}
    for landing in landings:
        entry = merged.setdefault(landing.t, Landing(landing.t))
        entry.callbacks.extend(landing.callbacks)
        entry.restart = entry.restart or landing.restart
    return sorted(merged.values(), key=lambda l: direction * l.t)


class TimeFrame:
    """The loop's clock. Usually the public times themselves; for an interval that is
    short against its distance from 0, offsets ``s = t - origin`` from the endpoint
    nearest 0.

    Step sizes, landings and the underflow test are judged on the clock, whose floats
    must resolve the interval: at ``t0 = 1e12`` an interval of 0.005 is only 40 float64
    spacings of ``t`` wide, but it is resolved to 1e-18 in ``s``. ``f`` is still called
    at public times (``origin + s``, exact at the start, the end and every landing, which
    are remembered), since that is all the caller's time can express.

    The offset clock is used only where public times cannot resolve the interval into
    ``2^26`` steps (an offset above ~1e7 times the interval's length), so ordinary solves
    keep public times bit for bit, and a solve restarted from one of its own accepted
    times (the checkpointed gradients' replays) retakes the same steps. (With the offset
    clock a restart from a public time rounds the clock: such replays are not bitwise.)
    """

    RESOLVED_STEPS = 2.0**26

    def __init__(self, t_start: float, t_end: float):
        length = abs(t_end - t_start)
        largest = max(abs(t_start), abs(t_end))
        if t_start * t_end <= 0 or length >= self.RESOLVED_STEPS * math.ulp(largest):
            self.origin = 0.0  # public times resolve the interval (or it holds 0, where they are finest)
        else:
            self.origin = t_start if abs(t_start) <= abs(t_end) else t_end
        self._exact: dict = {}

    def offset(self, t: float) -> float:
        """``t - origin``; remembers ``t`` so that :meth:`public` gives it back exactly."""
        if self.origin == 0.0:
            return t
        s = t - self.origin
        self._exact.setdefault(s, t)
        return s

    def offsets(self, times: Sequence[float]) -> List[float]:
        """:meth:`offset` of each time (the output times: thousands for a long series)."""
        if self.origin == 0.0:
            return list(times)
        return [self.offset(t) for t in times]

    def public(self, s: float) -> float:
        if self.origin == 0.0:
            return s
        t = self._exact.get(s)
        return self.origin + s if t is None else t


def check_interval(t_start: float, t_end: float, label: str = "forward") -> None:
    """Refuse an interval whose length overflows float64 (e.g. [-1e308, 1e308]): no
    step size could be measured along it."""
    if not math.isfinite(t_end - t_start):
        raise ValueError(
            f"the {label} interval from t={t_start:.6g} to t={t_end:.6g} is longer than the largest float64 "
            f"({t_end - t_start}): its length overflows. Rescale time (solve over t/c with f multiplied by c) "
            f"so that t[-1] - t[0] is finite"
        )


def fixed_grid(t_start: float, t_end: float, step_size: float) -> List[float]:
    """Grid ``t_start + k·step_size`` towards ``t_end``, ending exactly at ``t_end``."""
    direction = 1.0 if t_end >= t_start else -1.0
    n = max(1, math.ceil(abs(t_end - t_start) / step_size - 1e-9))
    return [t_start + direction * k * step_size for k in range(1, n)] + [t_end]


# Over 80 lines: 35 of them are the signature and the docstring of its twelve keywords; the loop
# itself is the thirty lines under `while`, each concern behind one call.
def integrate(
    f: FlatFunc, y0: torch.Tensor, t_start: float, t_end: float, out_times: Sequence[float], tableau: ButcherTableau,
    *, controller: Union[PIController, StepSizeController, None] = None, grid: Optional[Sequence[float]] = None,
    landings: Sequence[Landing] = (), max_num_steps: int = DEFAULT_MAX_NUM_STEPS, linear_interpolation: bool = False,
    first_step: Optional[float] = None, controller_state: float = 1.0, f0: Optional[torch.Tensor] = None,
    on_accept: Optional[Callable[[StepInfo], Optional[bool]]] = None, label: str = "forward", compiled=None,
    keep_steps: Optional[RecordedSteps] = None,
) -> IntegrateResult:
    """Integrate ``dy/dt = f(t, y)`` from ``t_start`` to ``t_end``. Times are public (the
    caller's) here; the loop's own clock is a :class:`TimeFrame` (``t_start = 1e12`` loses
    no step-size resolution).

    Args:
        f: ``f(t: float, y: (n,)) -> (n,)``; ``y0``: (n,), the state at ``t_start``.
        out_times: times in ``[t_start, t_end]``, monotone along the direction of
            integration; the result holds the state at each (dense output inside steps).
        tableau: the method. An adaptive one needs ``controller``, the error-control rule
            (see :class:`~torchadjoint.step_size.AdaptiveSteps`); a fixed-step one ``grid``,
            times after ``t_start`` ending at ``t_end`` (:class:`~torchadjoint.step_size.GridSteps`).
            A :class:`~torchadjoint.step_size.StepSizeController` (new for this solve) as
            ``controller`` replaces either (explicit methods: an implicit one needs the PI rule).
        landings: times steps must land on, with callbacks (see :class:`Landing`); those
            at ``t_end`` run after the last step, those at ``t_start`` are ignored.
        max_num_steps: most steps (accepted and rejected), plus one for each landing
            before ``t_end`` (a landing may cut one step in two).
        first_step: signed first step (skips automatic selection); with
            ``controller_state`` and ``f0`` it continues an earlier solve seamlessly.
        on_accept: called after each accepted step with a :class:`StepInfo`; returning
            True ends the solve at that step's end (``t_end`` of the result says where).
        label: "forward" or "backward", for error messages.
        compiled: a :class:`~torchadjoint.compiled.CompiledSteps` to take the steps as compiled graphs.
        keep_steps: a :class:`~torchadjoint.compiled_loop.RecordedSteps` to keep the steps the
            loop graphs take in (marked incomplete if any is taken otherwise).

    Raises:
        SolveError: step-size underflow, ``max_num_steps`` exceeded, or non-finite values.
        ValueError: an interval whose length overflows float64.
    """
    check_interval(t_start, t_end, label)
    direction = 1.0 if t_end >= t_start else -1.0
    coeffs = tableau.as_tensors(y0.dtype, y0.device)
    # The loop runs on offsets s (see TimeFrame); `public` maps them back for f and callers.
    frame = TimeFrame(t_start, t_end)
    public, s_start, s_end = frame.public, frame.offset(t_start), frame.offset(t_end)
    outputs = _Outputs(frame.offsets(out_times), y0, s_start, direction,
                       DenseOutput(tableau, y0.dtype, y0.device, linear_interpolation))
    stops = _stops_after(landings, t_start, t_end, direction)
    stop_s = [frame.offset(stop.t) for stop in stops]
    sizes = _step_size_controller(tableau, controller, grid, y0.dtype, frame, t_start, t_end, stops, first_step,
                                  controller_state, label)
    # Implicit and multistep methods keep state for the solve (Newton's Jacobian, the history
    # of f) in a stepper called like rk_step (torchadjoint.implicit, torchadjoint.multistep).
    stepper = tableau.make_stepper(controller, f) if hasattr(tableau, "make_stepper") else None
    if stepper is None and compiled is not None:
        stepper = compiled.stepper(tableau, controller)
    take_step = rk_step if stepper is None else stepper
    f = CountedCalls(f)
    budget = StepBudget(max_num_steps, len(stops) - 1, tableau, t_end, sizes.adaptive, label)
    if t_start == t_end:
        return IntegrateResult(outputs.ys, y0, f0, t_start, first_step or 0.0, controller_state,
                               dict(nfe=0, **budget.stats()))
    if f0 is None:
        f0 = f(t_start, y0)
    # Ordinary steps inside loop graphs, where the solve allows it (compiled_loop); the host
    # takes each step they leave to it, and any step where they do not apply.
    graph = in_graph = graph_loop(compiled, tableau, controller, y0, outputs.out_s, s_start, s_end, len(stops),
                                  frame.origin, on_accept, keep_steps)
    if keep_steps is not None and graph is None:
        keep_steps.complete = False
    if graph is None:
        sizes.start(f, t_start, y0, f0)
    else:  # (AdaptiveSteps: the loop graphs only run under the PI rule) the first graph selects the first step
        sizes.start(f, t_start, y0, f0, init=graph.first_step)
    s, y, next_stop = s_start, y0, 0
    while s != s_end:
        if in_graph is not None:
            ran = in_graph.advance(f, s, y, f0, s_end, sizes, budget, outputs, public)
            if ran is None:
                in_graph = None  # did not compile (said in stats): step by step from here
            else:
                s, y, f0, to_host = ran
                if s == s_end:
                    y, f0 = _land(stops[next_stop], y, f0, True, f, direction)
                    next_stop += 1
                    break
                if not to_host:
                    continue
        t = public(s)
        if f0 is None:
            f0 = f(t, y)
        s1 = sizes.end_of_step(s, stop_s[next_stop], t)
        budget.take(t)
        t1 = public(s1)
        # A step ending on a discontinuity of f (a restart landing) evaluates its end stages
        # just before it, on this side: f on the far side belongs to the next step.
        t1_side = beside(t1, t, y0.dtype) if (s1 == stop_s[next_stop] and stops[next_stop].restart) else t1
        step = take_step(f, t, y, f0, s1 - s, t1_side, tableau, coeffs)
        f.calls += step.evaluations  # made inside a compiled graph, past the counter
        if not sizes.judge(step, y, s, s1, t):
            continue
        budget.accept(s1 - s, step, t1, s_end - s1)
        if keep_steps is not None:
            keep_steps.complete = False  # a step the loop graphs did not record
        f1 = outputs.fill(step, s, s1, y, f, t1_side)
        ended = on_accept is not None and on_accept(
            StepInfo(t, t1, y, step.y1, step.stages, f1, sizes.h, sizes.state, s1 - s))
        s, y, f0 = s1, step.y1, f1
        if ended:
            # The caller has what it came for (an event inside this step): end the solve at
            # t1, before any landing there; outputs not reached are NaN.
            outputs.abandon()
            break
        if s == stop_s[next_stop]:
            y, f0 = _land(stops[next_stop], y, f0, s == s_end, f, direction)
            next_stop += 1

    if not sizes.adaptive:
        # Fixed steps are not checked one by one (a host sync per step): once, at the end.
        outputs.check_finite(y, public, t_start, s, label)
    stats = {"nfe": f.calls, **budget.stats(), **(stepper.stats if stepper is not None else {})}
    if graph is not None:
        stats = graph.merged_stats(stats)
    return IntegrateResult(outputs.ys, y, f0, public(s), sizes.h, sizes.state, stats)


def _stops_after(landings: Sequence[Landing], t_start: float, t_end: float, direction: float) -> List[Landing]:
    """The landings in ``(t_start, t_end]``, merged and in order, ending with one at ``t_end``."""
    stops = [
        l for l in merge_landings(landings, direction)
        if direction * (l.t - t_start) > 0 and direction * (l.t - t_end) <= 0
    ]
    if not stops or stops[-1].t != t_end:
        stops.append(Landing(t_end))
    return stops


def _step_size_controller(tableau: ButcherTableau, controller: Union[PIController, StepSizeController, None],
                          grid: Optional[Sequence[float]],
                          dtype: torch.dtype, frame: TimeFrame, t_start: float, t_end: float, stops: Sequence[Landing],
                          first_step: Optional[float], state: float, label: str) -> StepSizeController:
    """The solve's step-size controller: :class:`AdaptiveSteps` under ``controller`` for an
    adaptive method, :class:`GridSteps` over ``grid`` and the landings for a fixed-step one."""
    if controller is not None and not isinstance(controller, PIController):
        return controller  # the caller's own (a test's stub, say)
    direction = 1.0 if t_end >= t_start else -1.0
    if tableau.adaptive:
        if controller is None:
            raise ValueError(f"method {tableau.name!r} is adaptive and needs a step-size controller")
        length = abs(frame.offset(t_end) - frame.offset(t_start))
        return AdaptiveSteps(controller, dtype, tableau.order, direction, length, first_step, state,
                             getattr(tableau, "implicit", False), label)
    if grid is None:
        raise ValueError(f"method {tableau.name!r} has a fixed step: give step_size or a grid")
    # The grid and the landings together; the step sequence visits every point.
    points = sorted({*grid, *(stop.t for stop in stops)}, key=lambda x: direction * x)
    inside = [p for p in points if direction * (p - t_start) > 0 and direction * (p - t_end) <= 0]
    return GridSteps([frame.offset(p) for p in inside], first_step, state)


def beside(t: float, toward: float, dtype: torch.dtype) -> float:
    """The time next to ``t``, towards ``toward``, that ``f`` tells apart from ``t``: its
    neighbour in ``dtype``, the precision ``f`` receives times in. Where ``f`` jumps at ``t``
    (``jump_t``), a stage on one side is evaluated there. (``math.nextafter``'s float64
    neighbour rounds back to ``t`` in float32: f was evaluated at the jump itself, on the
    wrong side of it, and a step's worth of the new f was lost: 24 % of a gradient.)"""
    if dtype == torch.float64:
        return math.nextafter(t, toward)
    return float(torch.nextafter(torch.tensor(t, dtype=dtype), torch.tensor(toward, dtype=dtype)))


class CountedCalls:
    """``f`` counting its calls (the solve's ``nfe``)."""

    def __init__(self, f: FlatFunc):
        self.f, self.calls = f, 0

    def __call__(self, t: float, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.f(t, y)


class _PendingStep(NamedTuple):
    """An accepted step whose interior outputs (rows ``j0 … j1 - 1``) are not computed yet;
    ``versions``: the version counters of the tensors it holds, when they were taken."""

    j0: int
    j1: int
    s: float
    h: float
    y0: torch.Tensor
    y1: torch.Tensor
    stages: torch.Tensor
    f1: Optional[torch.Tensor]
    versions: Optional[tuple]


def _versions(*tensors: Optional[torch.Tensor]) -> Optional[tuple]:
    """The tensors' in-place version counters (None where one keeps none: inference tensors)."""
    try:
        return tuple(-1 if x is None else x._version for x in tensors)
    except RuntimeError:
        return None


class _Outputs:
    """The states at the output times, ``ys`` (N, n), filled as the steps pass them (dense
    output inside a step, the step's own end state on its end). ``out_s``: the output
    times on the loop's clock; those at the start get ``y0``. ``dense``: the interpolant.

    Without a graph they are written into one (N, n) buffer. While autograd records (Direct)
    they are kept as a list of pieces and concatenated once at the end: a write into a buffer
    would record a CopySlices node per step, whose backward copies the gradient of all N rows.
    Both paths compute the same products, in the same batches (Direct's ``ys`` are bitwise
    those of a plain solve).

    Batches: each eager op costs microseconds of dispatch whatever its size, and more between
    two compiled steps, whose code evicts the caches (measured on benchmark problem 1: ~8 µs
    a numpy or torch call inside the loop, ~2 µs in a loop of its own). So on the CPU the
    interior outputs of consecutive steps are computed together, in one product per batch
    of up to ``BATCH_STEPS`` steps and ``BATCH_NUMBERS`` numbers (and at once on a step end
    that is an output time, and when ``ys`` is read). The pending steps never hold more
    states than the rows of ``ys`` they will fill (else they are computed at once): the
    memory of a solve without a graph still grows with its outputs only, never with its
    steps (outputs few and far apart are computed step by step). A pending step holds its ``y0``,
    ``stages`` and ``f1``: the loop never changes them in place (a landing's callback changes
    the state at a step's end, before the next step starts from it), and a change by anyone
    else (an ``f`` that reuses its output tensor) is caught by their version counters and
    raises rather than interpolate from changed values. On a GPU (where a step may be a CUDA
    graph whose outputs the next replay overwrites), with linear interpolation, or under
    ``torch.inference_mode`` (no version counters), each step is computed at once."""

    BATCH_STEPS = 64
    BATCH_NUMBERS = 1 << 18

    def __init__(self, out_s: Sequence[float], y0: torch.Tensor, s_start: float, direction: float,
                 dense: DenseOutput):
        self.out_s, self.direction, self.dense = out_s, direction, dense
        self.out_s_array = np.asarray(out_s, dtype=np.float64)  # for the fractions, without a Python loop
        # The output times as increasing keys along the direction of integration: the outputs a
        # step passes are found by bisection (a Python loop over thousands of outputs cost more
        # than the step's interpolation).
        self._keys = list(out_s) if direction > 0 else [-x for x in out_s]
        self._keys_array = direction * self.out_s_array  # the same as an array (loop graphs' batches)
        self._shape = (len(out_s), y0.shape[0])
        self._pieces: Optional[List[torch.Tensor]] = [] if torch.is_grad_enabled() else None
        self._buffer = None if self._pieces is not None else y0.new_empty(self._shape)
        self._like = y0
        self._batch = y0.device.type == "cpu" and not dense.linear and not torch.is_inference_mode_enabled()
        self._pending: List[_PendingStep] = []
        self._pending_longest = 0  # most rows of one pending step (the batch pads every step to it)
        self._pending_rows = self._pending_held = 0  # rows of ys the pending steps fill; rows of states they hold
        self.filled = 0
        while self.filled < len(out_s) and out_s[self.filled] == s_start:
            self._put(self.filled, y0[None])
            self.filled += 1

    def _put(self, j0: int, rows: torch.Tensor) -> None:
        """Rows ``j0 … j0 + len(rows) - 1`` of ``ys`` (they arrive in order)."""
        if self._pieces is not None:
            self._pieces.append(rows)
        else:
            self._buffer[j0 : j0 + rows.shape[0]] = rows

    @property
    def ys(self) -> torch.Tensor:
        """(N, n): the rows filled so far, then (while the solve runs) rows not yet written."""
        self._flush()
        if self._pieces is None:
            return self._buffer
        if len(self._pieces) > 1:
            self._pieces = [torch.cat(self._pieces)]
        missing = self._shape[0] - self.filled
        if not missing:
            return self._pieces[0] if self._pieces else self._like.new_empty(self._shape)
        rest = self._like.new_full((missing, self._shape[1]), float("nan"))
        return torch.cat(self._pieces + [rest]) if self._pieces else rest

    def fill(self, step: StepResult, s: float, s1: float, y0: torch.Tensor, f: Callable, t1_side: float):
        """Fill the outputs in ``(s, s1]`` from the accepted step from ``(s, y0)``; returns
        ``f1`` = f at the step's end where the step or the interpolation computed it."""
        j0, f1 = self.filled, step.f1
        j1 = self.filled = bisect.bisect_right(self._keys, self.direction * s1, lo=j0)  # out_s up to s1, inclusive
        # Output times are strictly monotone: only the last one filled can lie on the step's end.
        on_end = j1 > j0 and self.out_s[j1 - 1] == s1
        inside_end = j1 - on_end
        if inside_end > j0:  # an output strictly inside the step: the interpolant
            stages = step.stages
            if stages._is_view() and not torch.is_grad_enabled():
                # A one-stage method's stage is f's own output (a view of it), and f may write
                # its next result into the same tensor (the call just below, or later ones):
                # a copy. (Under a graph such an f breaks autograd itself.)
                stages = stages.clone()
            if f1 is None and self.dense.needs_f1:
                f1 = f(t1_side, step.y1)
                if self._batch:
                    # Held past later calls of f, which may write into the tensor this one
                    # returned: a copy (one op, beside a call of f).
                    f1 = f1.clone()
            versions = _versions(y0, stages, f1) if self._batch else None
            self._pending.append(_PendingStep(j0, inside_end, s, s1 - s, y0, step.y1, stages, f1, versions))
            longest = self._pending_longest = max(self._pending_longest, inside_end - j0)
            self._pending_rows += inside_end - j0
            self._pending_held += step.stages.shape[0] + 2  # the stages, y0, f1
            # The batch's padded product (c, longest, n) and what it holds (c, s + 2, n).
            numbers = len(self._pending) * (longest + step.stages.shape[0] + 2) * self._shape[1]
            if (versions is None or self._pending_held > self._pending_rows or len(self._pending) >= self.BATCH_STEPS
                    or numbers >= self.BATCH_NUMBERS):
                self._flush()
        if on_end:
            # The rows arrive in order: the pending ones first. The step's own end state needs
            # no interpolant, hence no f there: a non-FSAL method evaluates f(t1, y1) as the
            # next step's first stage, if there is a next step (evaluating it here wasted one
            # call at the end of the solve).
            self._flush()
            self._put(j1 - 1, step.y1[None])
        return f1

    def took(self, ys: torch.Tensor, s1: float) -> None:
        """``ys`` (N, n), computed elsewhere (a loop graph), holds every output up to clock time
        ``s1`` (inclusive): it becomes the buffer."""
        self._flush()
        self._buffer = ys
        self.filled = bisect.bisect_right(self._keys, self.direction * s1, lo=self.filled)

    def fill_steps(self, starts: Sequence[float], states: torch.Tensor, stages: torch.Tensor, y_end: torch.Tensor):
        """Fill the outputs in ``(starts[0], starts[-1]]`` from ``c`` consecutive accepted steps
        taken in a loop graph (:mod:`~torchadjoint.compiled_loop`), at once: step ``i`` from
        ``starts[i]`` to ``starts[i + 1]`` (clock times), from ``states[i]`` (n,) with ``stages[i]``
        (s, n) (an FSAL method's: f at its end is its last stage); the last one ends in ``y_end``.
        The same products as :meth:`fill` of each (one batched product), without a graph."""
        self._flush()
        c, j0 = len(starts) - 1, self.filled
        at = place_outputs(self.out_s_array, self._keys_array, self.direction, np.asarray(starts, dtype=np.float64), j0)
        if at.last[-1] == j0:
            return
        self.filled = int(at.last[-1])
        if at.steps.size:
            chosen = torch.from_numpy(at.steps)
            ks = stages.index_select(0, chosen)
            # FSAL: f at a step's end is its last stage (the cubic Hermite interpolant reads it).
            padded = self.dense.states_of_steps(states.index_select(0, chosen), ks, ks[:, -1], at.hs, at.fractions)
            self._buffer.index_copy_(0, torch.from_numpy(at.window[at.kept]),
                                     padded.view(-1, padded.shape[2])[torch.from_numpy(np.flatnonzero(at.kept))])
        ended = np.flatnonzero(at.on_end)
        if ended.size:
            # Step i ends in step i + 1's start state; the last one in y_end.
            end_states = torch.cat([states[1:c], y_end[None]])
            self._buffer.index_copy_(0, torch.from_numpy(at.last[ended] - 1),
                                     end_states.index_select(0, torch.from_numpy(ended)))

    def _flush(self) -> None:
        """Compute the pending steps' interior outputs (rows ``j0`` of the first to ``j1`` of
        the last: consecutive, since an output on a step's end flushes)."""
        pending, longest = self._pending, self._pending_longest
        if not pending:
            return
        self._pending, self._pending_longest, self._pending_rows, self._pending_held = [], 0, 0, 0
        for p in pending:
            if p.versions is not None and _versions(p.y0, p.stages, p.f1) != p.versions:
                raise RuntimeError(
                    "a tensor the dense output still needed was changed in place during the solve (does f return a "
                    "tensor that it modifies again in a later call? return a new tensor each call)")
        j0, j1 = pending[0].j0, pending[-1].j1
        out = None if self._buffer is None else self._buffer[j0:j1]
        if len(pending) == 1:
            p = pending[0]
            rows = self.dense.states(p.y0, p.y1, p.stages, p.f1, p.h, (self.out_s_array[j0:j1] - p.s) / p.h, out=out)
        else:
            # Step i's rows padded to the longest (m) with the outputs that follow them (their
            # fractions clipped to 1, their states dropped): no scatter into a padded array.
            # (first row, rows, s, h) of each step; np.fromiter over floats is several times
            # faster than np.array over tuples.
            steps = np.fromiter((x for p in pending for x in (p.j0, p.j1 - p.j0, p.s, p.h)), np.float64,
                                4 * len(pending)).reshape(-1, 4)
            place = np.arange(longest)
            window = np.minimum(steps[:, :1] + place, len(self.out_s_array) - 1).astype(np.intp)
            fractions = np.minimum((self.out_s_array[window] - steps[:, 2:3]) / steps[:, 3:4], 1.0)
            padded = self.dense.states_of_steps([p.y0 for p in pending], [p.stages for p in pending],
                                                [p.f1 for p in pending], steps[:, 3], fractions)
            kept = torch.from_numpy(np.flatnonzero(place < steps[:, 1:2]))  # batches are on the CPU
            flat = padded.view(-1, padded.shape[2])
            rows = torch.index_select(flat, 0, kept) if out is None else torch.index_select(flat, 0, kept, out=out)
        if self._pieces is not None:
            self._pieces.append(rows)

    def abandon(self) -> None:
        """The solve ends early: the outputs not reached are NaN (rows past ``filled``)."""
        self._flush()
        if self._pieces is None:
            self._buffer[self.filled :] = float("nan")

    def check_finite(self, y: torch.Tensor, public: Callable[[float], float], t_start: float, s: float,
                     label: str) -> None:
        """SolveError if the end state ``y`` (at clock time ``s``) is not finite, saying
        between which filled outputs the state stopped being finite (``.t``: the last finite one)."""
        if bool(torch.isfinite(y).all()):
            return
        finite = torch.isfinite(self.ys[:self.filled]).all(dim=1).tolist()
        first_bad = finite.index(False) if False in finite else self.filled
        last_good = public(self.out_s[first_bad - 1]) if first_bad > 0 else t_start
        seen_bad = public(self.out_s[first_bad]) if first_bad < self.filled else public(s)
        raise SolveError(
            last_good, f"the state became non-finite (NaN or inf) between t={last_good:.6g} and t={seen_bad:.6g}; "
            "use a smaller step_size or an adaptive method", label)


def _land(stop: Landing, y: torch.Tensor, f_end: Optional[torch.Tensor], at_end: bool, f: Callable,
          direction: float):
    """Run ``stop``'s callbacks on the state ``y`` that just landed there (``f_end``: f
    there, or None). Returns the state to go on from and f there (None: evaluate it)."""
    changed, f_new = False, None
    for callback in stop.callbacks:
        new_y = callback(stop.t, y)
        if new_y is not None:
            # A (y, f) pair brings f at the new state along, sparing a re-evaluation.
            y, f_new = new_y if isinstance(new_y, tuple) else (new_y, None)
            changed = True
    if stop.restart and not at_end:
        return y, f(beside(stop.t, stop.t + direction, y.dtype), y)
    return y, (f_new if changed else f_end)

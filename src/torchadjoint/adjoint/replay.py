"""Checkpoints of a forward solve, and exact replays of the steps between them.

The checkpointed adjoint and ``Direct(checkpoints=K)`` keep a bounded number of states
during the forward solve and, on the way back, recompute the steps between two
checkpoints. The recomputation must take *the same* steps as the forward did, so:

- a checkpoint stores the step the controller proposed there and its state, and the
  replay starts with them (no new initial-step selection; the very first checkpoint,
  the start, selects its step exactly as the forward did);
- the replay keeps the forward's end time, grid and landings in view and stops after the
  recorded number of accepted steps. (A replay that ended at the next checkpoint instead
  would clamp its last step to it and differ from the forward in the last bits.)

Then the replay's states are bitwise the forward's; :meth:`ForwardSetup.replay` checks
the time it arrives at and reports the largest state difference (zero in practice; a
non-deterministic ``f`` would show there).

Memory stays bounded whatever the number of steps ``N``: the forward keeps at most ``K``
checkpoints (their spacing doubles whenever they overflow), and on the way back a
segment longer than ``K`` steps is not held at once but replayed once more to place at
most ``K`` checkpoints inside it, recursively (:meth:`ForwardSetup.segments`). At most
``K`` states per level are alive, ``ceil(log_K(N / K))`` levels deep, plus one segment of
at most ``K`` steps; every extra level costs one more forward solve. Up to ``K²`` steps
(for ``K`` a power of two; the doubling spacing reaches ``K`` at about ``K²/2`` steps
otherwise) this is the classical scheme: ``K`` checkpoints and one replay.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch

from ..integrate import IntegrateResult, Landing, StepInfo, TimeFrame, beside, integrate
from ..options import SolverOptions
from ..problem import Problem, direction_of, make_controller, make_flat_func, make_grid
from .base import forward_stats
from .vjp import checked_first_stage

FlatFunc = Callable[[float, torch.Tensor], torch.Tensor]


def check_checkpoints(value, owner: str) -> int:
    """Validate a checkpoint count (an int ≥ 2) for ``owner`` (e.g. ``"Checkpointed"``)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}(checkpoints=...) must be an int >= 2, got {type(value).__name__} {value!r}")
    if value < 2:
        raise ValueError(f"{owner}(checkpoints=...) must be at least 2 (the start and one more), got {value}")
    return value


@dataclass
class Checkpoint:
    """A point of the forward solve to replay from.

    ``step``: accepted steps before it (from the start); ``y`` (n,) the state, no graph;
    ``h``: the signed step the controller proposed from here (None at the start: select
    it as the forward did); ``controller_state``: the controller's state here.
    """

    step: int
    t: float
    y: torch.Tensor
    h: Optional[float]
    controller_state: float


class _Recorder:
    """``on_accept`` hook keeping a checkpoint every ``stride`` accepted steps.

    With ``thin=True`` it keeps at most ``capacity`` of them by doubling the stride and
    dropping every other one whenever they overflow (the forward does not know its
    number of steps in advance).
    """

    def __init__(self, first: Checkpoint, capacity: int, stride: int = 1, thin: bool = True):
        self.checkpoints = [first]
        self.capacity, self.stride, self.thin = capacity, stride, thin
        self.base = self.steps = first.step

    def __call__(self, info: StepInfo) -> None:
        self.steps += 1
        if (self.steps - self.base) % self.stride:
            return
        self.checkpoints.append(Checkpoint(self.steps, info.t1, info.y1.detach(), info.h_next, info.controller_state))
        if self.thin and len(self.checkpoints) > self.capacity:
            self.stride *= 2
            self.checkpoints = [c for c in self.checkpoints if (c.step - self.base) % self.stride == 0]


class ForwardSetup:
    """Everything that fixes the forward's step sequence, built once per solve: the
    function, tableau, controller, grid (fixed-step methods) and landings.

    ``f`` counts its evaluations in ``nfe``.
    """

    def __init__(self, problem: Problem, options: SolverOptions, flat_func: FlatFunc, y0: torch.Tensor):
        times = problem.times
        self.problem, self.options = problem, options
        self.t_start, self.t_end = times[0], times[-1]
        self.direction = direction_of(times)
        self.tableau = options.method
        self.controller = make_controller(problem, options)
        # Built once: a grid_constructor is then called once, as in a plain solve.
        self.grid = make_grid(problem, options, y0, self.t_start, self.t_end)
        self.landings = [Landing(t) for t in options.step_t] + [Landing(t, restart=True) for t in options.jump_t]
        self.jump_times = frozenset(options.jump_t)
        self.nfe = 0  # every evaluation of f, forward and replays
        self.replay_error = 0.0
        self._flat_func = flat_func

    def f(self, t: float, y: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        return self._flat_func(t, y)

    def f0_time(self, t: float) -> float:
        """Where the forward evaluated ``f`` to start the step after time ``t``: just past
        ``t`` at a discontinuity (``jump_t``), else at ``t``."""
        if t in self.jump_times and t != self.t_end:
            return beside(t, t + self.direction, self.problem.dtype)
        return t

    def end_time_side(self, t0: float, t1: float) -> float:
        """Where the forward evaluated ``f`` at the end of its step ``t0 → t1``: just before
        ``t1`` when ``f`` jumps there (``jump_t``), else at ``t1``."""
        return beside(t1, t0, self.problem.dtype) if t1 in self.jump_times else t1

    def _integrate(self, y: torch.Tensor, start: Checkpoint, out_times, on_accept, f0) -> IntegrateResult:
        return integrate(
            self.f, y, start.t, self.t_end, out_times, self.tableau,
            controller=self.controller, grid=self.grid, landings=self.landings,
            max_num_steps=self.options.max_num_steps,
            linear_interpolation=self.options.interpolation == "linear",
            first_step=start.h, controller_state=start.controller_state, f0=f0,
            on_accept=on_accept,
        )

    def forward(
        self, y0: torch.Tensor, capacity: int, f0: Optional[torch.Tensor] = None
    ) -> Tuple[IntegrateResult, List[Checkpoint], Checkpoint]:
        """The forward solve from ``y0`` (n,) over all output times, keeping at most
        ``capacity`` checkpoints; ``f0`` = f(t_0, y0) if known. Returns the result, the
        checkpoints (the first at the start) and the end (accepted steps, time and state;
        no step size)."""
        recorder = _Recorder(Checkpoint(0, self.t_start, y0.detach(), None, 1.0), capacity)
        result = self._integrate(y0, recorder.checkpoints[0], self.problem.times, recorder, f0)
        end = Checkpoint(recorder.steps, result.t_end, result.y_end.detach(), None, 1.0)
        checkpoints = [c for c in recorder.checkpoints if c.step < end.step]  # none at the very end
        return result, checkpoints, end

    def replay(
        self,
        start: Checkpoint,
        end: Checkpoint,
        on_step: Optional[Callable[[StepInfo], None]] = None,
        y: Optional[torch.Tensor] = None,
    ) -> StepInfo:
        """Retake the forward's accepted steps from ``start`` to ``end``, calling
        ``on_step`` after each; return the last step. ``y`` replaces ``start.y`` (e.g. a
        leaf that requires grad: the replay then builds a graph from it; ``f`` at the
        start is recomputed from it, where the forward had it from the step before).

        Raises RuntimeError if the replay does not arrive at ``end.t``; the largest
        difference from ``end.y`` is kept in ``replay_error``.
        """
        y = start.y if y is None else y
        num_steps = end.step - start.step
        count = 0
        last: List[StepInfo] = []

        def on_accept(info: StepInfo) -> bool:
            nonlocal count
            count += 1
            if on_step is not None:
                on_step(info)
            if count == num_steps:
                last.append(info)
                return True  # the replay's last step: integrate ends the solve here
            return False

        f0 = None if start.h is None else self.f(self.f0_time(start.t), y)
        self._integrate(y, start, (), on_accept, f0)
        if not last or last[0].t1 != end.t:
            reached = last[0].t1 if last else self.t_end
            if TimeFrame(self.t_start, self.t_end).origin != 0.0:
                # Far from t = 0 the loop steps on offsets from an endpoint; a restart from a
                # stored public time rounds that clock, so the replay cannot retake the steps.
                raise RuntimeError(
                    f"replaying the forward solve from t={start.t:.17g} reached t={reached:.17g} after {count} steps, "
                    f"expected t={end.t:.17g} after {num_steps}: the interval [{self.t_start:.17g}, {self.t_end:.17g}] "
                    f"lies so far from t = 0 that a restart from a stored time cannot retake the forward's steps "
                    f"bitwise; shift the time origin (solve over t - t[0] and add t[0] back inside f), or use "
                    f"gradient=Backsolve() or Direct() without checkpoints"
                )
            raise RuntimeError(
                f"replaying the forward solve from t={start.t:.17g} reached t={reached:.17g} after {count} steps, "
                f"expected t={end.t:.17g} after {num_steps}: the function is not deterministic (same inputs must "
                f"give bitwise the same outputs for a checkpointed gradient); use gradient=Backsolve() or Direct()"
            )
        difference = float((last[0].y1.detach() - end.y).abs().max()) if end.y.numel() else 0.0
        self.replay_error = max(self.replay_error, difference)
        return last[0]

    def checkpoint_segment(self, start: Checkpoint, end: Checkpoint, capacity: int) -> List[Checkpoint]:
        """Replay the steps from ``start`` to ``end`` (no graph), keeping at most
        ``capacity`` evenly spaced checkpoints (``start`` the first): every ``capacity``
        steps when that suffices, so the segments between them need no further level."""
        num_steps = end.step - start.step
        stride = max(capacity, -(-num_steps // capacity))
        recorder = _Recorder(start, capacity, stride=stride, thin=False)
        with torch.no_grad():
            self.replay(start, end, recorder)
        return [c for c in recorder.checkpoints if c.step < end.step]

    def segments(
        self,
        checkpoints: Sequence[Checkpoint],
        end: Checkpoint,
        capacity: int,
        needed: Optional[Callable[[Checkpoint, Checkpoint], bool]] = None,
        depth: int = 1,
    ) -> Iterator[Tuple[Checkpoint, Checkpoint, int]]:
        """Segments of at most ``capacity`` steps, from the last to the first, as
        ``(start, end, depth)`` checkpoints.

        ``checkpoints`` cover the steps up to ``end``. Consecutive checkpoints are merged
        into segments as long as ``capacity`` allows (fewer segment boundaries: the
        backward solve must land on each). A gap longer than ``capacity`` steps is split
        by :meth:`checkpoint_segment` when it is reached, so at most one list of
        checkpoints per depth is alive at a time. ``needed(start, end)``, asked when a gap
        is reached, may skip it whole (no gradient flows there yet): no replay at all.
        """
        stops = [*checkpoints, end]
        j = len(stops) - 1
        while j > 0:
            i = j - 1
            if needed is not None and not needed(stops[i], stops[j]):
                pass
            elif stops[j].step - stops[i].step > capacity:
                inner = self.checkpoint_segment(stops[i], stops[j], capacity)
                yield from self.segments(inner, stops[j], capacity, needed, depth + 1)
            else:
                while i > 0 and stops[j].step - stops[i - 1].step <= capacity:
                    i -= 1
                if stops[j].step > stops[i].step:
                    yield stops[i], stops[j], depth
            j = i


def checkpointed_forward(problem: Problem, options: SolverOptions, y0: torch.Tensor, capacity: int,
                         method_name: str) -> Tuple[ForwardSetup, IntegrateResult, List[Checkpoint], Checkpoint, dict]:
    """The forward pass of the checkpointing gradients (Checkpointed, Direct(checkpoints=K)):
    the params check, whose evaluation is the first stage, then a solve without a graph that
    keeps at most ``capacity`` checkpoints. Returns the setup, the result, the checkpoints,
    the end (see :meth:`ForwardSetup.forward`) and the forward stats."""
    flat_func = make_flat_func(problem)
    setup = ForwardSetup(problem, options, flat_func, y0)
    # Refuses f closing over undeclared tensors; the evaluation is the first stage.
    f0 = checked_first_stage(flat_func, problem, y0, method_name)
    with torch.no_grad():
        result, checkpoints, end = setup.forward(y0.detach(), capacity, f0)
    return setup, result, checkpoints, end, forward_stats(result.stats, f0)

"""A validated ODE problem and the pieces every solve builds from it.

``Problem`` holds the user's function and state structure; :func:`make_flat_func`,
:func:`make_controller` and :func:`solve_flat` turn it into a call of
:func:`~torchadjoint.integrate.integrate` on a flat state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .compiled import compiled_steps
from .controller import PIController, norm_value, rms_norm
from .flat_views import flat_view, shaped
from .integrate import IntegrateResult, Landing, StepInfo, fixed_grid, integrate
from .options import SolverOptions
from .pytree import Flattener, concat_leaves


@dataclass
class Problem:
    """``func(t, y) -> dy/dt`` with ``y`` in the structure of ``flattener``; ``times`` the
    output times as host floats (the first is the start time); ``params`` the tensors
    ``func`` depends on that gradients are wanted for; ``integrals`` how many trailing
    state tensors are integrals riding along (a running cost's, see
    :mod:`torchadjoint.running_cost`): they never feed back into the dynamics."""

    func: Callable
    flattener: Flattener
    times: Tuple[float, ...]
    params: Tuple[torch.Tensor, ...]
    dtype: torch.dtype
    device: torch.device
    integrals: int = 0

    def checked_size(self) -> int:
        """How many leading flat entries the adjoints' reconstruction check judges: all
        but the trailing ``integrals`` (their drift says nothing about the gradient)."""
        k = self.integrals
        return self.flattener.numel - sum(self.flattener.sizes[len(self.flattener.sizes) - k:]) if k else self.flattener.numel

    def time_tensor(self, t: float) -> torch.Tensor:
        # scalar_tensor: the same 0-dim tensor as torch.tensor(t), at half the dispatch cost
        # (it runs once per evaluation of f).
        return torch.scalar_tensor(t, dtype=self.dtype, device=self.device)


def make_flat_func(problem: Problem) -> Callable[[float, torch.Tensor], torch.Tensor]:
    """``F(t: float, y: (n,)) -> (n,)``: the user's ``func`` on flat states, its output
    checked for structure, shape and dtype on every call (cheap tuple comparisons)."""
    func, flat, dtype = problem.func, problem.flattener, problem.dtype
    make_t = problem.time_tensor
    if flat.is_tensor:
        shape = torch.Size(flat.shapes[0])

        def flat_func(t: float, y: torch.Tensor) -> torch.Tensor:
            # shaped/flat_view: no autograd view node per call while a graph is recorded.
            out = func(make_t(t), shaped(y, shape))
            if not isinstance(out, torch.Tensor) or out.shape != shape or out.dtype != dtype:
                _bad_output(out, t, [shape], dtype)
            return flat_view(out)

        return flat_func

    shapes = [torch.Size(s) for s in flat.shapes]

    def flat_tree_func(t: float, y: torch.Tensor) -> torch.Tensor:
        out = func(make_t(t), flat.unflatten(y))
        leaves = flat.leaves_of(out)  # dict entries by key, whatever their order in out
        if leaves is None or any(x.shape != s or x.dtype != dtype for x, s in zip(leaves, shapes)):
            _bad_output(out, t, shapes, dtype)
        return concat_leaves(leaves)

    return flat_tree_func


def _bad_output(out, t: float, shapes, dtype) -> None:
    if isinstance(out, torch.Tensor):
        got = f"a tensor of shape {tuple(out.shape)} and dtype {out.dtype}"
    elif isinstance(out, (tuple, list, dict)):
        got = f"a {type(out).__name__} of {len(out)} entries"
    else:
        got = type(out).__name__
    want = ", ".join(str(tuple(s)) for s in shapes)
    raise TypeError(
        f"f(t, y) at t={t:.6g} returned {got}; it must return dy/dt in the structure of the state "
        f"(shapes {want}, dtype {dtype})"
    )


def flat_norm(problem: Problem, norm: Optional[Callable]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The error norm on flat scaled errors; a user norm sees the state's own structure."""
    if norm is None:
        return rms_norm
    unflatten = problem.flattener.unflatten

    def user_norm(x: torch.Tensor) -> torch.Tensor:
        return norm_value(norm(unflatten(x)), "norm")

    return user_norm


def make_controller(problem: Problem, options: SolverOptions, norm=None, rtol=None, atol=None) -> Optional[PIController]:
    """The step-size controller for ``options`` (None for fixed-step methods).

    ``norm``, ``rtol`` and ``atol`` override the options' (flat norm; float or (n,) tensor).
    """
    if not options.method.adaptive:
        return None
    if rtol is None:
        rtol = flat_tolerance(problem, options.rtol, "rtol")
    if atol is None:
        atol = flat_tolerance(problem, options.atol, "atol")
    return PIController(
        rtol, atol, norm if norm is not None else flat_norm(problem, options.norm),
        safety=options.safety, ifactor=options.ifactor, dfactor=options.dfactor,
        pcoeff=options.pcoeff, icoeff=options.icoeff, first_step=options.first_step,
        min_step=options.min_step, max_step=options.max_step,
    )


def flat_tolerance(problem: Problem, value, name: str):
    """A float stays a float (cheapest); anything else becomes a flat (n,) tensor."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return problem.flattener.leaves_like(value, name, problem.dtype, problem.device)


def make_grid(problem: Problem, options: SolverOptions, y0_flat: torch.Tensor, t_start: float, t_end: float) -> Optional[List[float]]:
    """Step grid for a fixed-step method between ``t_start`` and ``t_end`` (None if adaptive)."""
    if options.method.adaptive:
        return None
    if options.grid_constructor is not None:
        ts = torch.tensor([t_start, t_end], dtype=problem.dtype)
        grid = options.grid_constructor(problem.flattener.unflatten(y0_flat), ts)
        grid = [float(x) for x in torch.as_tensor(grid).reshape(-1).tolist()]
        direction = 1.0 if t_end >= t_start else -1.0
        if len(grid) < 2 or grid[0] != t_start or grid[-1] != t_end or any(
            direction * (b - a) <= 0 for a, b in zip(grid, grid[1:])
        ):
            raise ValueError(
                "grid_constructor must return strictly monotone times starting at the first and ending at the "
                f"last output time ({t_start:g} … {t_end:g})"
            )
        return grid[1:]
    return fixed_grid(t_start, t_end, options.step_size)


def option_landings(options: SolverOptions) -> List[Landing]:
    """The landings ``step_t`` and ``jump_t`` ask for (a jump restarts the step sequence)."""
    return [Landing(t) for t in options.step_t] + [Landing(t, restart=True) for t in options.jump_t]


def solve_flat(
    problem: Problem,
    options: SolverOptions,
    y0: torch.Tensor,
    func: Optional[Callable] = None,
    on_accept: Optional[Callable[[StepInfo], None]] = None,
    extra_landings: Sequence[Landing] = (),
    out_times: Optional[Sequence[float]] = None,
    f0: Optional[torch.Tensor] = None,
    keep_steps=None,
) -> IntegrateResult:
    """The forward solve of ``problem`` from ``y0`` (n,) over all its output times
    (``f0``: f at the start when already known; its evaluation is not in the stats;
    ``keep_steps``: see :func:`~torchadjoint.integrate.integrate`)."""
    times = problem.times if out_times is None else tuple(out_times)
    t_start, t_end = times[0], times[-1]
    return integrate(
        func if func is not None else make_flat_func(problem),
        y0, t_start, t_end, times, options.method,
        controller=make_controller(problem, options),
        grid=make_grid(problem, options, y0, t_start, t_end),
        landings=option_landings(options) + list(extra_landings),
        max_num_steps=options.max_num_steps,
        linear_interpolation=options.interpolation == "linear",
        on_accept=on_accept,
        f0=f0,
        compiled=compiled_steps(problem, options),
        keep_steps=keep_steps,
    )


def direction_of(times: Sequence[float]) -> float:
    return 1.0 if len(times) < 2 or times[-1] >= times[0] else -1.0


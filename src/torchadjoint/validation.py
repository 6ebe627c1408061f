"""Checks on the user's arguments, with messages that name the argument, the value and the fix."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Set, Tuple

import torch
from torch import nn

from .options import OPTION_NAMES
from .pytree import Flattener, tree_leaves


def check_func(func: Any, name: str = "func") -> None:
    if not callable(func):
        raise TypeError(f"{name} must be callable as {name}(t, y) -> dy/dt, got {type(func).__name__}")


def check_has_values(x: torch.Tensor, name: str) -> None:
    """A tensor on the meta device has a shape but no values: nothing can be solved with it."""
    if x.device.type == "meta":
        raise ValueError(f"{name} is on the meta device, which holds shapes but no values; create it on a real device "
                         f"or move it with {name}.to('cpu')")


def check_state(y0: Any, name: str = "y0") -> Tuple[Flattener, torch.dtype, torch.device]:
    """Validate a state pytree; returns its flattener, dtype and device."""
    leaves, spec = tree_leaves(y0, name)
    for x in leaves:
        check_has_values(x, name)
    dtypes = {x.dtype for x in leaves}
    devices = {x.device for x in leaves}
    if len(dtypes) > 1:
        raise TypeError(f"all tensors of {name} must share one dtype, got {sorted(map(str, dtypes))}; cast them with .to(dtype)")
    if len(devices) > 1:
        raise ValueError(f"all tensors of {name} must be on one device, got {sorted(map(str, devices))}")
    dtype = leaves[0].dtype
    if not dtype.is_floating_point or dtype.is_complex:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {dtype}; convert it with {name}.to(torch.float32) or .double()")
    if any(x.numel() == 0 for x in leaves):
        raise ValueError(f"{name} has a tensor with no elements (shape {[tuple(x.shape) for x in leaves]}); the state must not be empty")
    if not all(bool(torch.isfinite(x).all()) for x in leaves):
        raise ValueError(f"{name} contains NaN or inf; the initial state must be finite")
    return Flattener(spec), dtype, leaves[0].device


def check_times(t: Any, name: str = "t") -> Tuple[float, ...]:
    """Validate output times: a 1-D floating tensor, strictly monotone, finite."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a 1-D torch.Tensor of times, got {type(t).__name__}; use torch.tensor([...])")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must have a floating-point dtype, got {t.dtype}; use {name}.float() or .double()")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty; give at least the start time")
    check_has_values(t, name)
    as_double = t.detach().cpu().double()
    # Checked as tensors: a time series of thousands of outputs is validated at every solve.
    if not bool(torch.isfinite(as_double).all()):
        raise ValueError(f"{name} must contain finite times, got {t}")
    times = tuple(as_double.tolist())
    steps = as_double.diff()
    if steps.numel() and not (bool((steps > 0).all()) or bool((steps < 0).all())):
        diffs = steps.tolist()
        i = next(i for i, d in enumerate(diffs) if d == 0 or (d > 0) != (diffs[0] > 0))
        what = "repeats" if diffs[i] == 0 else "changes direction"
        raise ValueError(
            f"{name} must be strictly increasing or strictly decreasing; it {what} at index {i + 1} "
            f"({times[i]!r} -> {times[i + 1]!r})"
        )
    return times


def check_times_inside(times: Sequence[float], others: Sequence[float], name: str) -> None:
    lo, hi = min(times[0], times[-1]), max(times[0], times[-1])
    outside = [x for x in others if not lo <= x <= hi]
    if outside:
        raise ValueError(f"{name} has times {outside[:5]} outside the solve's interval [{lo:g}, {hi:g}]")


def resolve_params(func: Callable, params: Optional[Sequence[torch.Tensor]], name: str = "params") -> Tuple[torch.Tensor, ...]:
    """The tensors whose gradients an adjoint computes: ``params`` if given, else the
    trainable parameters of ``func`` when it is an ``nn.Module`` (or a bound method of
    one). Duplicates (shared parameters) appear once."""
    if params is None:
        owner = func if isinstance(func, nn.Module) else getattr(func, "__self__", None)
        found = list(owner.parameters()) if isinstance(owner, nn.Module) else []
        params = [p for p in found if p.requires_grad]
    else:
        if isinstance(params, torch.Tensor):
            params = [params]
        try:
            params = list(params)
        except TypeError:
            raise TypeError(f"{name} must be a sequence of tensors, got {type(params).__name__}") from None
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(p).__name__}")
    unique, seen = [], set()
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            unique.append(p)
    return tuple(unique)


def check_entry(caller: str, func, y0, options: dict, refuse: Callable[[Set[str]], None],
                **callables) -> Tuple[Flattener, torch.dtype, torch.device]:
    """The checks every entry point starts with, in the order their errors are reported:
    the option names (``caller`` names the function in the message), ``func`` and the other
    ``callables`` (argument name -> value), the ``torch.func`` transforms the call runs
    under (``refuse(kinds)`` raises for those it cannot; called only under some), then the
    state (its checks read values, which a vmapped tensor has none of). Returns
    ``check_state(y0)``."""
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(f"{caller} got unknown option(s) {unknown}; valid options are {sorted(OPTION_NAMES)}")
    check_func(func)
    for name, value in callables.items():
        check_func(value, name)
    kinds = function_transforms()
    if kinds:
        refuse(kinds)
    return check_state(y0)


def function_transforms() -> Set[str]:
    """The names of the ``torch.func`` transforms the call runs under (empty outside any)."""
    get_stack = getattr(getattr(torch._C, "_functorch", None), "get_interpreter_stack", None)
    stack = get_stack() if get_stack is not None else None
    return {str(getattr(i.key(), "name", i.key())) for i in stack} if stack else set()

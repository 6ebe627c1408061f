"""torchdiffeq's error norms, forward and adjoint, on this library's flat states.

Forward: a tensor state is measured by RMS, a tuple state by the largest RMS of its
tensors (torchdiffeq's ``_mixed_norm``); a user norm receives the state's own structure.

Adjoint (backsolve): the backward state is ``(y, a_y, a_θ)``. torchdiffeq measures it by
``max(norm(y), norm(a_y), mixed(a_θ))`` by default, and by ``max(norm(y), norm(a_y))`` with
``adjoint_options=dict(norm="seminorm")`` (``norm`` the forward norm). A user's adjoint
norm receives ``(t, y, a_y, *a_θ)`` (tuple states: ``(t, *y, *a_y, *a_θ)``), ``a_θ`` one
tensor per adjoint parameter. ``t`` is the error of torchdiffeq's time adjoint; this
library computes time gradients without integrating one, so it is a zero scalar here.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ..controller import norm_value, rms_norm
from ..pytree import Flattener


def mixed_norm(tensors) -> torch.Tensor:
    """The largest RMS over a sequence of tensors (0 for an empty one)."""
    tensors = list(tensors)
    if not tensors:
        return torch.zeros(())
    return torch.stack([rms_norm(x.reshape(-1)) for x in tensors]).max()


def default_state_norm(y0) -> Optional[Callable]:
    """torchdiffeq's default norm for this state: ``None`` (RMS) for a tensor, mixed for a tuple."""
    if isinstance(y0, torch.Tensor):
        return None
    if isinstance(y0, dict):
        return lambda y: mixed_norm(y.values())
    return mixed_norm


def adjoint_norm(choice, state_norm: Optional[Callable], flattener: Flattener, params: Sequence[torch.Tensor]) -> Callable:
    """A norm for :class:`~torchadjoint.Backsolve` (it receives flat ``(y, a_y, a_θ)``) with
    torchdiffeq's meaning of ``choice``: ``None`` (default), ``"seminorm"`` or a callable."""
    sizes = [p.numel() for p in params]
    shapes = [p.shape for p in params]

    def measure(flat: torch.Tensor) -> torch.Tensor:
        if state_norm is None:
            return rms_norm(flat)
        return torch.as_tensor(state_norm(flattener.unflatten(flat)))

    def split(a_theta: torch.Tensor):
        return [piece.view(shape) for piece, shape in zip(torch.split(a_theta, sizes), shapes)]

    if choice is None or choice == "seminorm":
        with_params = choice is None

        def norm(parts) -> torch.Tensor:
            y, a_y, a_theta = parts
            values = [measure(y), measure(a_y)]
            if with_params and sizes:
                values.append(mixed_norm(split(a_theta)).to(y.dtype))
            return torch.stack(values).max()

        return norm

    if not callable(choice):
        raise ValueError(f"adjoint_options['norm'] must be 'seminorm' or a callable, got {choice!r}")

    def user_norm(parts) -> torch.Tensor:
        y, a_y, a_theta = parts
        t_error = y.new_zeros(())
        y_s, a_s = flattener.unflatten(y), flattener.unflatten(a_y)
        if isinstance(y_s, torch.Tensor):
            args = (t_error, y_s, a_s, *split(a_theta))
        else:
            leaves = list(y_s.values()) if isinstance(y_s, dict) else list(y_s)
            a_leaves = list(a_s.values()) if isinstance(a_s, dict) else list(a_s)
            args = (t_error, *leaves, *a_leaves, *split(a_theta))
        return norm_value(choice(args), "adjoint_options['norm']")

    return user_norm

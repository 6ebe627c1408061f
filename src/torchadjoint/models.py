"""Ready-made modules: an ODE block usable inside any network, and the classic ODE classifier.

``NeuralODE`` wraps a vector field ``f(t, y)`` into a layer ``y0 -> y(T)`` (or the whole
trajectory), trained by the gradient method of your choice (the continuous adjoint,
``Backsolve()``, by default). ``ODEClassifier`` is input layer -> ODE block -> affine
layer, returning logits for a softmax/cross-entropy loss.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from .adjoint import GradientMethod, gradient_method
from .solve import solve

GradientChoice = Union[None, str, GradientMethod]


def _as_gradient(gradient: GradientChoice) -> Optional[GradientMethod]:
    if gradient is None or isinstance(gradient, GradientMethod):
        return gradient
    if isinstance(gradient, str):
        return gradient_method(gradient)
    raise TypeError(
        f"gradient must be a gradient method name (see torchadjoint.GRADIENT_METHODS) or an object such as "
        f"torchadjoint.Backsolve(), got {type(gradient).__name__}"
    )


def _as_times(t: Union[torch.Tensor, Sequence[float]], name: str) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return t.detach().clone()
    try:
        times = torch.tensor([float(x) for x in t])
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a 1-D tensor or a sequence of times, got {t!r}") from None
    return times


class NeuralODE(nn.Module):
    """An ODE block: ``y(t) = y0 + ∫ func(s, y(s)) ds``.

    Args:
        func: the vector field, ``func(t, y) -> dy/dt`` with ``t`` a 0-dim tensor and ``y``
            shaped like the input (batch dimensions included). An ``nn.Module`` here is a
            submodule: its parameters are this block's parameters and are trained.
        t: default integration times used when ``forward`` gets none: (N,) or a pair
            ``(t0, T)``; default ``(0, 1)``.
        method: solver name (see ``torchadjoint.METHODS``); default ``"dopri5"``.
        rtol, atol: tolerances of the adaptive solver.
        gradient: ``"backsolve"`` (default: the continuous adjoint), ``"direct"`` or any
            name in ``torchadjoint.GRADIENT_METHODS``, or a gradient-method object.
        **options: further solver options passed to :func:`torchadjoint.solve`
            (``step_size`` for fixed-step methods, ``max_num_steps``, ``norm``, ...).

    After each call, ``self.stats`` is the solve's statistics dict: ``stats["forward"]``
    (function evaluations ``nfe``, steps, rejections) at once, ``stats["backward"]`` after
    ``loss.backward()`` (for adjoint methods).
    """

    def __init__(
        self,
        func: Any,
        t: Union[torch.Tensor, Sequence[float]] = (0.0, 1.0),
        *,
        method: str = "dopri5",
        rtol: float = 1e-6,
        atol: float = 1e-8,
        gradient: GradientChoice = None,
        **options: Any,
    ):
        super().__init__()
        if not callable(func):
            raise TypeError(f"func must be callable as func(t, y) -> dy/dt, got {type(func).__name__}")
        self.func = func
        times = _as_times(t, "t")
        if times.dim() != 1 or times.numel() < 2:
            raise ValueError(f"t must hold at least a start and an end time, got {times.tolist()}")
        # A buffer: moves with .to(device) and is saved with the state dict.
        self.register_buffer("t", times, persistent=False)
        self.method = method
        self.rtol = rtol
        self.atol = atol
        self.gradient = _as_gradient(gradient)
        self.options = dict(options)
        self.stats: dict = {"forward": None, "backward": None}
        # ∫ ℓ dt of the last call when options hold running_cost=ℓ (a regulariser), else None.
        self.last_running_cost: Optional[torch.Tensor] = None

    def forward(self, y0: torch.Tensor, t: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``y0`` (*state shape) -> the final state ``y(t[-1])`` (*state shape) when ``t``
        is None (the block's own times are used); the trajectory ``ys`` (N, *state shape)
        at every time of ``t`` (N,) when ``t`` is given."""
        times = self.t if t is None else t
        times = times.to(dtype=y0.dtype, device=y0.device)
        solution = solve(
            self.func, y0, times, method=self.method, gradient=self.gradient,
            rtol=self.rtol, atol=self.atol, **self.options,
        )
        self.stats = solution.stats
        self.last_running_cost = solution.running_cost
        return solution.ys[-1] if t is None else solution.ys

    def extra_repr(self) -> str:
        return f"t={self.t.tolist()}, method={self.method!r}, rtol={self.rtol:g}, atol={self.atol:g}, gradient={self.gradient!r}"


class MLPField(nn.Module):
    """A small time-dependent vector field: ``f(t, y) = W2 tanh(W1 [y, t] + b1) + b2``.

    ``y``: (batch, dim) -> (batch, dim).
    """

    def __init__(self, dim: int, hidden: int, time_dependent: bool = True):
        super().__init__()
        self.time_dependent = time_dependent
        self.inner = nn.Linear(dim + int(time_dependent), hidden)
        self.outer = nn.Linear(hidden, dim)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.time_dependent:
            y = torch.cat([y, t.expand(*y.shape[:-1], 1)], dim=-1)
        return self.outer(torch.tanh(self.inner(y)))


class ODEClassifier(nn.Module):
    """Input layer -> ODE block -> affine layer: logits for ``num_classes`` classes.

    ``x`` (batch, in_features) is mapped to ``y(0) = input(x)`` (batch, hidden), evolved by
    ``dy/dt = MLPField(y, t)`` to ``y(T)``, and classified by ``output(y(T))`` (batch,
    num_classes). The input layer is trained through ``dL/dy(0)``, which every gradient
    method returns.

    Args:
        in_features, hidden, num_classes: layer sizes (``hidden`` is the ODE state size).
        field_hidden: width of the vector field's hidden layer (default ``2 * hidden``).
        T: integration time.
        method, rtol, atol, gradient, **options: as for :class:`NeuralODE`.
    """

    def __init__(
        self,
        in_features: int,
        hidden: int,
        num_classes: int,
        *,
        field_hidden: Optional[int] = None,
        T: float = 1.0,
        method: str = "dopri5",
        rtol: float = 1e-3,
        atol: float = 1e-4,
        gradient: GradientChoice = None,
        **options: Any,
    ):
        super().__init__()
        for value, name in ((in_features, "in_features"), (hidden, "hidden"), (num_classes, "num_classes")):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not T > 0:
            raise ValueError(f"T must be a positive integration time, got {T!r}")
        self.input = nn.Linear(in_features, hidden)
        field = MLPField(hidden, field_hidden or 2 * hidden)
        self.ode = NeuralODE(field, (0.0, float(T)), method=method, rtol=rtol, atol=atol, gradient=gradient, **options)
        self.output = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (batch, in_features) -> logits (batch, num_classes)."""
        return self.output(self.ode(self.input(x)))

    def trajectory(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Hidden states along the way: (N, batch, hidden) at the times ``t`` (N,) in [0, T]."""
        return self.ode(self.input(x), t)

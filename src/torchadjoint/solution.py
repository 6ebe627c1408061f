"""The result of a solve."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch


@dataclass
class Solution:
    """Outputs of :func:`~torchadjoint.solve`.

    Attributes:
        ts: (N,) the output times, as given.
        ys: the state at each output time: a tensor (N, *state shape), or the state's
            pytree structure with leaves (N, *leaf shape).
        stats: ``stats["forward"]`` holds ``nfe`` (function evaluations), ``steps``
            (attempted), ``accepted`` and ``rejected``; ``stats["backward"]`` is filled in
            when gradients are computed by an adjoint method (same keys plus
            method-specific ones such as ``reconstruction_error``), else ``None``.
        running_cost: ``∫_{t_0}^{t_N} ℓ(t, y, f) dt`` for ``solve(..., running_cost=ℓ)``
            (shaped like ``ℓ``'s result, differentiable), else ``None``.
    """

    ts: torch.Tensor
    ys: Any
    stats: dict = field(default_factory=lambda: {"forward": None, "backward": None})
    running_cost: Optional[torch.Tensor] = None

    @property
    def y_final(self) -> Any:
        """The state at the last output time (same structure as ``y0``)."""
        if isinstance(self.ys, torch.Tensor):
            return self.ys[-1]
        from .pytree import tree_leaves, tree_unflatten

        leaves, spec = tree_leaves(self.ys, "ys")
        return tree_unflatten([x[-1] for x in leaves], spec)

    def __repr__(self) -> str:
        fwd: Optional[dict] = self.stats.get("forward")
        bwd: Optional[dict] = self.stats.get("backward")
        return f"Solution(ts: {tuple(self.ts.shape)}, forward={fwd}, backward={bwd})"

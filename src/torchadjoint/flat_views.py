"""Flat states that remember the shaped tensor they view.

The loop works on flat (n,) states; ``f`` works on the user's shape. With no graph
recorded, reshaping costs nothing worth counting. While a graph is recorded (``Direct``),
every ``y.view(shape)`` into ``f`` and every ``out.reshape(-1)`` out of it is an autograd
node, twice per call of ``f``: as many as the whole Euler step of autograd through
torchdiffeq, which never reshapes. So a flat tensor made by :func:`flat_view` carries the
shaped tensor it views, and :func:`shaped` hands that tensor back instead of a new view.

Safe by construction: the alias is kept only for a true view (same memory, so an in-place
write to either is seen by both, and autograd's version counter is shared), and it is an
attribute of that Python tensor object alone: ``detach()``, ``clone()`` or any arithmetic
make a new tensor without it, so a graph the caller cut stays cut.
"""
from __future__ import annotations

import torch

_ALIAS = "_torchadjoint_shaped"


def flat_view(x: torch.Tensor) -> torch.Tensor:
    """``x.reshape(-1)``, remembering ``x`` when the result is a view of it that records a graph."""
    flat = x.reshape(-1)
    if flat.requires_grad and x.is_contiguous():  # reshape of a contiguous tensor is a view
        setattr(flat, _ALIAS, x)
    return flat


def shaped(flat: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``flat`` (n,) as a tensor of ``shape``: the tensor it was made from by :func:`flat_view`
    when that has this shape (no new autograd node), else ``flat.view(shape)``."""
    alias = flat.__dict__.get(_ALIAS) if flat.requires_grad else None
    if alias is not None and alias.shape == shape:
        return alias
    return flat.view(shape)


def alias(flat: torch.Tensor):
    """The shaped tensor ``flat`` was made from by :func:`flat_view`, or None."""
    return flat.__dict__.get(_ALIAS) if flat.requires_grad else None
